"""The reference pipeline's Celery app, built from ``LOOPLINE_*`` variables when first asked for.

``celery -A loopline.app.default worker`` and every ``loopline`` command without ``-A`` run this app: the
built-in tasks (``tasks.fetch_url``, ``tasks.deliver_webhook``, ``tasks.io_sleep``) on the configured broker,
or on the embedded Redis that ``loopline redis up`` started. The repository's ``config.celery_app`` is this
app. Importing the module builds nothing; ``app`` and ``settings`` are built on first access (PEP 562).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from loopline.settings import ConfigError, Settings, redact_url

__all__ = ["APP_NAME", "BrokerNotFound", "create_app"]

APP_NAME = "loopline"
BUILTIN_TASKS = "loopline.jobs.tasks"
_built: dict[str, Any] = {}


class BrokerNotFound(ConfigError):
    """No broker is configured and no embedded Redis is running."""


def broker_url(settings: Settings) -> str:
    """The configured broker, else the embedded Redis running under ``settings.home``."""
    if settings.broker_url:
        return settings.broker_url
    from loopline.embedded_redis import running_url

    url = running_url(settings.home)
    if url is None:
        raise BrokerNotFound(
            f"no broker: LOOPLINE_BROKER_URL is unset and no loopline Redis is running under {settings.home}/. "
            "Start one with `loopline redis up`, or set LOOPLINE_BROKER_URL=redis://host:6379/0"
        )
    return url


def _result_backend(settings: Settings, broker: str) -> str:
    if settings.result_backend:
        return settings.result_backend
    if broker.startswith(("redis://", "rediss://", "unix://")):
        return broker
    raise ConfigError(
        f"LOOPLINE_RESULT_BACKEND must be set when the broker is not Redis (broker is {redact_url(broker)})"
    )


def create_app(settings: Settings | None = None, *, include: list[str] | None = None) -> Celery:
    """A Celery app with loopline installed and the built-in tasks, from ``settings`` (default: the environment)."""
    import loopline.jobs.tasks  # noqa: F401 - shared tasks: registered on the app when it finalizes, producers too
    from loopline.app.install import install

    settings = settings or Settings.from_env()
    broker = broker_url(settings)
    app = Celery(APP_NAME, broker=broker, backend=_result_backend(settings, broker),
                 include=[BUILTIN_TASKS, *(include or [])])
    install(app, settings=settings)
    return app


def __getattr__(name: str) -> Any:
    if name not in ("app", "settings"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if "app" not in _built:
        settings = Settings.from_env()
        _built["settings"] = settings
        _built["app"] = create_app(settings)
    return _built[name]
