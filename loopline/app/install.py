"""``loopline.install(app)``: loopline's engine for any Celery app, through its configuration and signals.

What it gives the app (each part is named where it is configured, so ``app.conf`` shows it):

- ``broker_transport``: loopline's Redis transport (``loopline.transport.redis``) for ``redis://`` and
  ``rediss://`` brokers: an atomic fetch that a killed worker cannot lose, bad queue entries dead-lettered.
- ``result_backend``: the Redis result backend of ``loopline.backends.redis``, named in the URL as
  ``loopline.backends.redis:RedisBackend+redis://...`` (``celery.app.backends.by_url``).
- ``worker_consumer``: the consumer of ``loopline.worker.consumer`` (bad messages and poison jobs
  dead-lettered, task events in batches) and the dead-letter signal handlers, for this app's tasks only.
- Per-pool sizing of prefetch and Redis connection pools (``celeryd_init``), whatever started the worker.
- ``task_cls``: :class:`loopline.app.task.LooplineTask`, so ``async def`` tasks run under every pool, and a task
  that sets neither time limit gets loopline's default pair (``task_time_limit_s``, ``task_soft_time_limit_s``).
- Safe defaults for I/O jobs, as defaults: what the app configured itself wins.

Nothing happens at import; :func:`install` reads only the app's configuration and its keyword overrides.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
import weakref
from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup, celeryd_init

from loopline.settings import Settings, settings_for, use_settings
from loopline.worker.sizing import PoolProfile, profile_for

__all__ = ["BACKEND_CLASS", "TASK_CLASS", "TRANSPORT", "apply_profile", "backend_url", "install"]

logger = logging.getLogger(__name__)

TRANSPORT = "loopline.transport.redis:Transport"
BACKEND_CLASS = "loopline.backends.redis:RedisBackend"
CONSUMER = "loopline.worker.consumer:Consumer"
TASK_CLASS = "loopline.app.task:LooplineTask"
_REDIS_SCHEMES = ("redis://", "rediss://")


def _is_redis(url: object) -> bool:
    return isinstance(url, str) and url.startswith(_REDIS_SCHEMES)


def _defaults(settings: Settings) -> dict[str, Any]:
    """Celery settings for I/O jobs; ``app.add_defaults`` puts them under whatever the app sets itself."""
    return {
        # JSON only: a pickle message is refused by the worker instead of being executed.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once: ack after the body ran; a worker that dies mid-job leaves the message to be redelivered.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "result_expires": settings.result_expires_s,
        "result_extended": True,
        # STARTED is not written to the result backend: Flower and `inspect active` see it from the
        # task-started event, and the backend write would cost a round trip per job.
        "task_track_started": False,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "broker_connection_retry_on_startup": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # A producer rides out a Redis restart: the result subscription retries as result_backend_max_retries
        # says (about 20 s), the publish 5 times; then LooplineTask.apply_async raises RedisUnavailable.
        "task_publish_retry_policy": {"max_retries": 5, "interval_start": 0, "interval_step": 0.5,
                                      "interval_max": 2},
        # A worker storing a result while Redis restarts retries for about 20 s instead of failing the job.
        "result_backend_always_retry": True,
        "result_backend_max_retries": 20,
        "result_backend_max_sleep_between_retries_ms": 1000,
        "redis_socket_timeout": settings.redis_socket_timeout_s,
        "redis_socket_connect_timeout": settings.redis_socket_timeout_s,
        "redis_backend_health_check_interval": settings.redis_socket_timeout_s,
    }


def _broker_transport_options(settings: Settings, broker_url: object) -> dict[str, Any]:
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_s}
    if not _is_redis(broker_url):
        return options
    return {
        **options,
        # kombu.transport.redis.Transport.register_with_event_loop sweeps for messages whose visibility timeout
        # ran out every ``unacked_restore_interval`` s, but QoS.restore_visible scans only on every
        # ``unacked_restore_throttle``-th call (default 10 x 10 s); throttle 1 makes the interval the one knob
        # (loopline.transport.redis.Poller runs at most one sweep per interval, in both event loops).
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


@dataclass
class _Installed:
    """What install() was given for one app, and the sizing its worker chose (``celeryd_init``)."""

    settings: Settings | None
    overrides: dict[str, Any]
    profile: PoolProfile | None = None


# Weak: an app that is dropped takes its record with it, and no signal handler below holds an app.
_installed: weakref.WeakKeyDictionary[Celery, _Installed] = weakref.WeakKeyDictionary()


def install(app: Celery, *, settings: Settings | None = None, **overrides: Any) -> Settings:
    """Give ``app`` loopline's engine; returns the loopline settings it runs with.

    Settings come from ``settings`` if given, else from the app's ``loopline_*`` configuration keys with
    ``overrides`` on top (``loopline.install(app, max_deliveries=3)``); a bad value raises ConfigError
    naming the key. Installing twice is harmless (the overrides of both calls apply), and so is configuring the
    app after installing: a later ``config_from_object`` rebuilds Celery's configuration from scratch, and the
    ``on_after_configure`` signal it sends (``celery.app.base.Celery._load_config``) installs loopline again.
    """
    if settings is not None and overrides:
        raise TypeError("install() takes either settings= or keyword overrides, not both")
    record = _installed.get(app)
    if record is None:
        record = _installed[app] = _Installed(settings, dict(overrides))
    else:
        record.settings, record.overrides = settings, {**record.overrides, **overrides}
    applied = _apply(app, record)
    # The app's own signal: it holds the handler, not the other way round.
    app.on_after_configure.connect(_reapply, sender=app, weak=False, dispatch_uid="loopline-configure")
    _connect_signals()
    return applied


def is_installed(app: object) -> bool:
    """Whether ``install`` was called for ``app`` (the signal handlers serve installed apps only)."""
    try:
        return app in _installed
    except TypeError:  # not weak-referenceable: not a Celery app
        return False


def _reapply(sender: Celery, **_: Any) -> None:
    record = _installed.get(sender)
    if record is not None:
        _apply(sender, record)


def _apply(app: Celery, record: _Installed) -> Settings:
    settings = record.settings if record.settings is not None else Settings.from_conf(app.conf, record.overrides)
    use_settings(app, settings)
    conf = app.conf
    app.add_defaults(_defaults(settings))
    broker_url = conf.broker_url or settings.broker_url
    if broker_url and not conf.broker_url:
        conf.broker_url = broker_url
    if conf.result_backend is None or isinstance(conf.result_backend, str):  # a backend class is the app's choice
        backend = backend_url(app) or settings.result_backend or (broker_url if _is_redis(broker_url) else None)
        if _is_redis(backend):
            conf.result_backend = f"{BACKEND_CLASS}+{backend}"
            conf.redis_backend_use_ssl = conf.redis_backend_use_ssl or _tls_defaults(backend)
        elif backend and not conf.result_backend:
            conf.result_backend = backend
    conf.broker_transport_options = {**_broker_transport_options(settings, broker_url),
                                     **(conf.broker_transport_options or {})}
    if _is_redis(broker_url):
        conf.broker_transport = TRANSPORT
        conf.broker_use_ssl = conf.broker_use_ssl or _tls_defaults(broker_url)
    conf.worker_consumer = CONSUMER
    if "Task" not in app.__dict__:  # Celery.Task is a cached property: tasks made after this get the class
        app.task_cls = TASK_CLASS
    return settings


def _connect_signals() -> None:
    """Connect the worker-start handlers and the dead-letter hooks once per process, for installed apps."""
    from loopline.deadletter import hooks

    hooks.connect(is_installed)
    celeryd_init.connect(_size_for_pool, weak=False, dispatch_uid="loopline-size")
    celeryd_after_setup.connect(_after_setup, weak=False, dispatch_uid="loopline-setup")


def _record_for_conf(conf: Any) -> tuple[Celery, _Installed] | None:
    return next(((app, record) for app, record in list(_installed.items()) if app.conf is conf), None)


def _size_for_pool(sender: Any = None, conf: Any = None, options: dict[str, Any] | None = None, **_: Any) -> None:
    # Sent from celery.apps.worker.Worker.on_before_init, before the consumer opens a broker connection or
    # the backend is built, with the command-line options in ``options``.
    found = _record_for_conf(conf)
    if found is None:
        return
    opts = options or {}
    # The click CLI passes the resolved pool class as ``pool``; programmatic callers may pass ``pool_cls``.
    profile = profile_for(opts.get("pool_cls") or opts.get("pool"), opts.get("concurrency"))
    apply_profile(conf, profile)
    found[1].profile = profile
    if profile.pool == "gevent":
        _cooperative_retry_sleeps()


def _after_setup(sender: Any = None, instance: Any = None, **_: Any) -> None:
    record = _installed.get(instance.app) if instance is not None else None
    if record is None:
        return
    from loopline.app.task import run_coroutines

    app = instance.app
    run_coroutines(app)  # async def tasks of a base class of their own, under every pool
    if record.profile is not None:
        _apply_prefetch(instance, record.profile)
        # celeryd_init runs before Celery sets up logging, so the chosen sizing is logged here.
        logger.info("loopline: %s", record.profile.describe())
    if not settings_for(app).task_log:
        # The celery.worker.strategy and celery.app.trace loggers decide once, when the consumer builds its
        # strategies and tracers (after this signal), whether INFO is on; warnings and errors still show.
        for name in ("celery.worker.strategy", "celery.app.trace"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _apply_prefetch(instance: Any, profile: PoolProfile) -> None:
    """Give the worker its pool's prefetch multiplier, unless the operator chose one.

    Celery's CLI always passes ``--prefetch-multiplier`` (filled from the config when not given), and
    ``WorkController.setup_defaults`` prefers it to the config, so the profile cannot go through ``conf``.
    ``celeryd_after_setup`` is sent from ``celery.apps.worker.Worker.on_start``: after the Consumer bootstep
    (``celery.worker.components.Consumer.create``) built the consumer with the CLI's multiplier, before
    the consumer starts and sets its prefetch window from ``initial_prefetch_count``. Both are set here.
    """
    if "--prefetch-multiplier" in " ".join(sys.argv) or "CELERY_WORKER_PREFETCH_MULTIPLIER" in os.environ:
        return
    multiplier = profile.prefetch_multiplier
    instance.prefetch_multiplier = multiplier
    consumer = getattr(instance, "consumer", None)
    if consumer is not None:
        slots = max(getattr(instance, "max_concurrency", None) or instance.concurrency or 1, 1)
        consumer.prefetch_multiplier = multiplier
        consumer.initial_prefetch_count = slots * multiplier


def _cooperative_retry_sleeps() -> None:
    """Make the sleeps between the result backend's retries yield to gevent's hub instead of blocking it.

    Celery retries a result write through ``kombu.utils.functional.retry_over_time``, which sleeps with the
    ``sleep`` that ``from time import sleep`` bound when kombu was imported. gevent's ``patch_all`` imports
    kombu (through ``celery.local`` proxies it inspects in ``_patch_existing_locks``) before it patches
    ``time``, so that one is the real sleep: while Redis restarts, every retry froze every greenlet for a second.
    """
    import time

    import kombu.utils.functional

    kombu.utils.functional.sleep = time.sleep  # the patched (gevent) sleep, now


def apply_profile(conf: Any, profile: PoolProfile) -> None:
    """Write a pool profile's connection-pool sizes and prefetch into a Celery configuration."""
    conf.worker_prefetch_multiplier = profile.prefetch_multiplier
    conf.broker_transport_options = {**conf.broker_transport_options, "max_connections": profile.max_connections,
                                     "fetch_when_free": profile.fetch_when_free}
    conf.redis_max_connections = profile.max_connections
    conf.broker_pool_limit = max(conf.broker_pool_limit or 0, profile.producer_pool_limit)


def backend_url(app: Celery) -> str | None:
    """The app's result backend URL without the backend class ``install`` names in front of it."""
    url = app.conf.result_backend
    if isinstance(url, str) and url.startswith(f"{BACKEND_CLASS}+"):
        return url[len(BACKEND_CLASS) + 1:]
    return url if isinstance(url, str) else None
