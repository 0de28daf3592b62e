"""The Celery app, ``config.celery_app:app``, with safe defaults for I/O jobs.

``celery -A config.celery_app worker -P gevent -c 500`` works as well as ``loopline worker``:
everything pool-dependent is decided in the ``celeryd_init`` handler below, which runs in
every worker whatever started it.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, celeryd_init

from config.pools import PoolProfile, profile_for
from config.settings import ConfigError, Settings, redact_url

__all__ = ["BrokerNotFound", "app", "settings"]

logger = logging.getLogger(__name__)


class BrokerNotFound(ConfigError):
    """No broker is configured and no embedded Redis is running."""


def _broker_url(settings: Settings) -> str:
    if settings.broker_url:
        return settings.broker_url
    from embedded_redis import running_url

    url = running_url(settings.home)
    if url is None:
        raise BrokerNotFound(
            f"no broker: LOOPLINE_BROKER_URL is unset and no loopline Redis is running under {settings.home}/. "
            "Start one with `loopline redis up`, or set LOOPLINE_BROKER_URL=redis://host:6379/0"
        )
    return url


def _result_backend(settings: Settings, broker_url: str) -> str:
    if settings.result_backend:
        return settings.result_backend
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return broker_url
    raise ConfigError(
        f"LOOPLINE_RESULT_BACKEND must be set when the broker is not Redis (broker is {redact_url(broker_url)})"
    )


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://"))


def _broker_transport_options(settings: Settings, broker_url: str) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if not _is_redis(broker_url):
        return options
    return {
        **options,
        # kombu.transport.redis.Transport.register_with_event_loop sweeps for messages whose visibility timeout
        # ran out every ``unacked_restore_interval`` s, but QoS.restore_visible scans only on every
        # ``unacked_restore_throttle``-th call (default 10 x 10 s); throttle 1 makes the interval the one knob
        # (deadletter.transport.Poller runs at most one sweep per interval, in both event loops).
        "unacked_restore_interval": settings.restore_interval_s,
        "unacked_restore_throttle": 1,
        # Bounded waits: a Redis that vanishes without closing the socket is noticed, and the connection
        # replaced, within about twice this (kombu's BRPOP health check uses health_check_interval).
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_socket_timeout_s,
        "health_check_interval": settings.redis_socket_timeout_s,
        "max_message_bytes": settings.max_message_bytes,
    }


def _tls_defaults(url: object) -> dict[str, Any] | None:
    """Certificate checks for a ``rediss://`` URL that does not choose them itself.

    Without ``ssl_*`` query parameters kombu connects to a ``rediss://`` broker in plain text, and Celery's
    Redis backend refuses to start; both verify the server against the system CAs here instead.
    """
    if not isinstance(url, str) or not url.startswith("rediss://") or "ssl_cert_reqs=" in url:
        return None
    return {"ssl_cert_reqs": ssl.CERT_REQUIRED}


settings = Settings.from_env()
_broker = _broker_url(settings)

class LooplineCelery(Celery):
    """Celery with loopline's Redis result backend (config/result_backend.py) for redis:// and rediss://."""

    def _get_backend(self) -> Any:
        # celery.app.base.Celery._get_backend resolves the URL's scheme to celery.backends.redis:RedisBackend.
        url = self.conf.result_backend
        if self.backend_cls is None and isinstance(url, str) and _is_redis(url):
            from config.result_backend import RedisBackend

            return RedisBackend(app=self, url=url)
        return super()._get_backend()


# task_cls: every task of this app, a user's ``async def`` included, runs its coroutine to completion.
app = LooplineCelery("loopline", broker=_broker, backend=_result_backend(settings, _broker), include=["tasks"],
             task_cls="tasks.base:LooplineTask")
app.conf.update(
    # JSON only: a pickle message is refused by the worker instead of being executed.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    # At-least-once: ack after the body ran; a worker that dies mid-job leaves the message to be redelivered.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # No task_time_limit / task_soft_time_limit: Celery would fill each one separately into every task, and
    # the worker would give the hard one to its pool as the limit of any job without its own. The pair of
    # LOOPLINE_TASK_*TIME_LIMIT_S defaults goes to the tasks that set neither limit (LooplineTask.bind).
    # Settings.from_env refuses a visibility timeout that is not above the default time limit.
    broker_transport_options=_broker_transport_options(settings, _broker),
    result_expires=settings.result_expires_s,
    result_extended=True,
    # STARTED is not written to the result backend: Flower and `inspect active` see it from the
    # task-started event, and the backend write would cost a round trip per job.
    task_track_started=False,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_cancel_long_running_tasks_on_connection_loss=False,
    # A producer rides out a Redis restart: the result subscription retries as result_backend_max_retries says
    # (about 20 s), the publish 5 times; then tasks.base.LooplineTask.apply_async raises RedisUnavailable.
    task_publish_retry_policy={"max_retries": 5, "interval_start": 0, "interval_step": 0.5, "interval_max": 2},
    # A worker storing a result while Redis restarts retries for about 20 s instead of failing the job.
    result_backend_always_retry=True,
    result_backend_max_retries=20,
    result_backend_max_sleep_between_retries_ms=1000,
    redis_socket_timeout=settings.redis_socket_timeout_s,
    redis_socket_connect_timeout=settings.redis_socket_timeout_s,
    redis_backend_health_check_interval=settings.redis_socket_timeout_s,
    # Undecodable, invalid, unknown and poison messages go to the dead-letter store instead of being
    # dropped or killing the consumer (deadletter/consumer.py); task events go out in batches on a
    # timer (workers/consumer.py).
    worker_consumer="workers.consumer:Consumer",
)
if _is_redis(_broker):
    # kombu's Redis transport, fetching so that a killed worker loses nothing, and dead-lettering queue entries
    # that are not JSON envelopes or are oversized instead of stopping the worker (deadletter/transport.py).
    app.conf.broker_transport = "deadletter.transport:Transport"
    app.conf.broker_use_ssl = _tls_defaults(_broker)
app.conf.redis_backend_use_ssl = _tls_defaults(app.conf.result_backend)

import deadletter.hooks  # noqa: E402, F401 - counts starts of redelivered jobs, dead-letters exhausted retries


@celeryd_init.connect
def _size_for_pool(sender: str | None = None, conf: Any = None, options: dict[str, Any] | None = None,
                   **_: Any) -> None:
    """Size prefetch and Redis connection pools from the pool and concurrency this worker was started with.

    Celery sends ``celeryd_init`` from ``celery.apps.worker.Worker.on_before_init``, before the consumer
    opens a broker connection or the backend is built, with the command-line options in ``options``.
    """
    opts = options or {}
    # The click CLI passes the resolved pool class as ``pool``; programmatic callers may pass ``pool_cls``.
    profile = profile_for(opts.get("pool_cls") or opts.get("pool"), opts.get("concurrency"))
    apply_profile(conf if conf is not None else app.conf, profile)
    _applied.append(profile)


@celeryd_after_setup.connect
def _apply_prefetch(sender: str | None = None, instance: Any = None, **_: Any) -> None:
    """Give the worker its pool's prefetch multiplier, unless the operator chose one.

    Celery's CLI always passes ``--prefetch-multiplier`` (filled from the config when not given), and
    ``WorkController.setup_defaults`` prefers it to the config, so the profile cannot go through ``conf``.
    ``celeryd_after_setup`` is sent from ``celery.apps.worker.Worker.on_start``: after the Consumer bootstep
    (``celery.worker.components.Consumer.create``) built the consumer with the CLI's multiplier, before
    the consumer starts and sets its prefetch window from ``initial_prefetch_count``. Both are set here.
    """
    chosen = "--prefetch-multiplier" in " ".join(sys.argv) or "CELERY_WORKER_PREFETCH_MULTIPLIER" in os.environ
    for profile in _applied:
        if instance is not None and not chosen:
            multiplier = profile.prefetch_multiplier
            instance.prefetch_multiplier = multiplier
            consumer = getattr(instance, "consumer", None)
            if consumer is not None:
                slots = max(getattr(instance, "max_concurrency", None) or instance.concurrency or 1, 1)
                consumer.prefetch_multiplier = multiplier
                consumer.initial_prefetch_count = slots * multiplier
        # celeryd_init runs before Celery sets up logging, so the chosen sizing is logged here.
        logger.info("loopline: %s", profile.describe())


@celeryd_after_setup.connect
def _quiet_task_lines(sender: str | None = None, **_: Any) -> None:
    """With LOOPLINE_TASK_LOG=0, leave out Celery's INFO lines for each received, retried and finished task.

    They come from the ``celery.worker.strategy`` and ``celery.app.trace`` loggers, which decide once, when
    the consumer builds its strategies and tracers (after this signal), whether INFO is on; warnings and
    errors (a failed task) are still logged. Events, Flower and the result backend are unaffected.
    """
    if not settings.task_log:
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


_applied: list[PoolProfile] = []


def apply_profile(conf: Any, profile: PoolProfile) -> None:
    """Write a pool profile's connection-pool sizes and prefetch into a Celery configuration."""
    conf.worker_prefetch_multiplier = profile.prefetch_multiplier
    conf.broker_transport_options = {**conf.broker_transport_options, "max_connections": profile.max_connections,
                                     "fetch_when_free": profile.fetch_when_free}
    conf.redis_max_connections = profile.max_connections
    conf.broker_pool_limit = max(conf.broker_pool_limit or 0, profile.producer_pool_limit)
