"""The Celery app, ``config.celery_app:app``, with safe defaults for I/O jobs.

``celery -A config.celery_app worker -P gevent -c 500`` works as well as ``loopline worker``:
everything pool-dependent is decided in the ``celeryd_init`` handler below, which runs in
every worker whatever started it.
"""

from __future__ import annotations

import logging
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


settings = Settings.from_env()
_broker = _broker_url(settings)

# task_cls: every task of this app, a user's ``async def`` included, runs its coroutine to completion.
app = Celery("loopline", broker=_broker, backend=_result_backend(settings, _broker), include=["tasks"],
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
    task_time_limit=settings.task_time_limit_s,
    task_soft_time_limit=settings.task_soft_time_limit_s,
    # Settings.from_env refuses a visibility timeout that is not above the time limit.
    broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
    result_expires=settings.result_expires_s,
    result_extended=True,
    # STARTED is not written to the result backend: Flower and `inspect active` see it from the
    # task-started event, and the backend write would cost a GET and a SET+PUBLISH per job.
    task_track_started=False,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_cancel_long_running_tasks_on_connection_loss=False,
)


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
    apply_profile(conf if conf is not None else app.conf, profile, keep_prefetch=opts.get("prefetch_multiplier"))
    _applied.append(profile)


@celeryd_after_setup.connect
def _log_profile(sender: str | None = None, **_: Any) -> None:
    # celeryd_init runs before Celery sets up logging, so the chosen sizing is logged here.
    for profile in _applied:
        logger.info("loopline: %s", profile.describe())


_applied: list[PoolProfile] = []


def apply_profile(conf: Any, profile: PoolProfile, *, keep_prefetch: object = None) -> None:
    """Write a pool profile into a Celery configuration (an explicit --prefetch-multiplier wins)."""
    if not keep_prefetch:
        conf.worker_prefetch_multiplier = profile.prefetch_multiplier
    conf.broker_transport_options = {**conf.broker_transport_options, "max_connections": profile.max_connections}
    conf.redis_max_connections = profile.max_connections
    conf.broker_pool_limit = max(conf.broker_pool_limit or 0, profile.producer_pool_limit)
