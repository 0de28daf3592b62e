"""One typed settings object: loopline's settings, read from ``LOOPLINE_*`` variables or from a Celery app.

Each setting has one name, a field of :class:`Settings` (``max_deliveries``). The reference pipeline and the
``loopline`` command read it from the environment as ``LOOPLINE_MAX_DELIVERIES``; a user's own app sets it
in its configuration as ``loopline_max_deliveries`` or passes ``max_deliveries=`` to ``loopline.install``.
Nothing here reads the environment until :meth:`Settings.from_env` is called.
"""

from __future__ import annotations

import contextvars
import ipaddress
import math
import os
import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CONF_PREFIX", "ConfigError", "ENVELOPE_ALLOWANCE_BYTES", "PREFIX", "Settings", "redact_url",
           "settings_for", "use_settings"]

PREFIX = "LOOPLINE_"
CONF_PREFIX = "loopline_"
_REDIS_SCHEMES = ("redis", "rediss", "unix")
_BROKER_SCHEMES = (*_REDIS_SCHEMES, "amqp", "amqps", "pyamqp")
# Room for a task message's headers and properties around its base64 body.
ENVELOPE_ALLOWANCE_BYTES = 64 * 1024
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


class ConfigError(ValueError):
    """A setting has a value loopline cannot use; the message names the setting as it was given."""


_naming: contextvars.ContextVar[Callable[[str], str]] = contextvars.ContextVar(
    "loopline_setting_naming", default=lambda attr: PREFIX + attr.upper())


def _env_name(attr: str) -> str:
    """The name a setting was given under (``LOOPLINE_X``, ``loopline_x`` or ``x=``), for error messages."""
    return _naming.get()(attr)


#: the settings that must be above zero, checked in this order
_POSITIVE = (
    "visibility_timeout_s", "task_time_limit_s", "task_soft_time_limit_s", "result_expires_s", "fetch_max_bytes",
    "max_arg_bytes", "asyncio_sync_threads", "asyncio_blocking_ms", "fetch_timeout_s", "webhook_backoff_base_s",
    "webhook_backoff_max_s", "max_deliveries", "max_message_bytes", "restore_interval_s", "redis_socket_timeout_s",
    "event_flush_ms",
)


@dataclass(frozen=True)
class Settings:
    """Everything loopline reads from the environment; each field maps to ``LOOPLINE_<FIELD>``."""

    broker_url: str | None = None
    result_backend: str | None = None
    home: Path = field(default_factory=lambda: Path(".loopline"))
    visibility_timeout_s: int = 3600
    task_time_limit_s: int = 300
    task_soft_time_limit_s: int = 270
    result_expires_s: int = 86400
    url_allowlist: tuple[str, ...] = ()
    fetch_timeout_s: float = 30.0
    fetch_max_bytes: int = 10 * 1024 * 1024
    webhook_max_retries: int = 5
    webhook_backoff_base_s: float = 1.0
    webhook_backoff_max_s: float = 300.0
    flower_auth: str | None = None
    max_arg_bytes: int = 1024 * 1024
    asyncio_sync_threads: int = 16
    asyncio_shutdown_grace_s: float = 30.0
    asyncio_blocking_ms: float = 100.0
    max_deliveries: int = 5
    restore_interval_s: float = 10.0
    max_message_bytes: int = 2 * 1024 * 1024
    redis_socket_timeout_s: float = 30.0
    event_flush_ms: float = 100.0
    task_log: bool = True
    default_host_rate: str | None = None
    default_host_concurrency: int = 0
    fetch_max_retries: int = 3

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``LOOPLINE_*`` variable; raise ConfigError naming the first bad one."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is None or raw.strip() == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw.strip())
        settings = cls(**values)  # type: ignore[arg-type]
        settings._check()
        return settings

    @classmethod
    def from_conf(cls, conf: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Settings:
        """Read ``loopline_<field>`` keys of a Celery app's configuration, then ``overrides`` (install's keywords).

        Values may be typed (``30``) or strings as in the environment (``"30"``); ConfigError names the key.
        """
        names = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for key, f in names.items():
            raw = conf.get(CONF_PREFIX + key)
            if raw is not None:
                values[key] = _coerce(CONF_PREFIX + key, f.type, raw)
        for key, raw in (overrides or {}).items():
            if key not in names:
                raise ConfigError(f"loopline.install() got an unknown setting {key!r}; known: {', '.join(names)}")
            values[key] = _coerce(key, names[key].type, raw)
        token = _naming.set(lambda attr: attr if attr in (overrides or {}) else CONF_PREFIX + attr)
        try:
            settings = cls(**values)  # type: ignore[arg-type]
            settings._check()
        finally:
            _naming.reset(token)
        return settings

    def _check(self) -> None:
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{_env_name(name)} must be positive, got {getattr(self, name)!r}")
        # Every job the producer accepts (LOOPLINE_MAX_ARG_BYTES of JSON) must fit in a message the worker accepts:
        # the body travels base64-encoded (4/3) inside an envelope of headers.
        smallest = self.max_arg_bytes * 4 // 3 + ENVELOPE_ALLOWANCE_BYTES
        if self.max_message_bytes < smallest:
            raise ConfigError(
                f"{_env_name('max_message_bytes')}={self.max_message_bytes} must be at least {smallest} for "
                f"{_env_name('max_arg_bytes')}={self.max_arg_bytes}, or workers would refuse jobs producers accept"
            )
        if self.asyncio_shutdown_grace_s < 0:
            raise ConfigError(f"{_env_name('asyncio_shutdown_grace_s')} must be >= 0")
        if self.webhook_backoff_max_s >= self.visibility_timeout_s:
            raise ConfigError(
                f"{_env_name('webhook_backoff_max_s')}={self.webhook_backoff_max_s} must be below "
                f"{_env_name('visibility_timeout_s')}: a retry waiting longer is redelivered early (celery #5935)"
            )
        if self.webhook_max_retries < 0:
            raise ConfigError(f"{_env_name('webhook_max_retries')} must be >= 0, got {self.webhook_max_retries!r}")
        if self.task_soft_time_limit_s >= self.task_time_limit_s:
            raise ConfigError(
                f"{_env_name('task_soft_time_limit_s')}={self.task_soft_time_limit_s} must be below "
                f"{_env_name('task_time_limit_s')}={self.task_time_limit_s}, or the soft limit never fires"
            )
        # A message whose task outlives the visibility timeout is redelivered to a second worker while the
        # first still runs it: the duplicate is silent. Refuse such a configuration outright.
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ConfigError(
                f"{_env_name('visibility_timeout_s')}={self.visibility_timeout_s} must be larger than "
                f"{_env_name('task_time_limit_s')}={self.task_time_limit_s}: Redis would redeliver running tasks"
            )
        if self.broker_url is not None:
            _check_url("broker_url", self.broker_url, _BROKER_SCHEMES)
        if self.result_backend is not None:
            _check_url("result_backend", self.result_backend, _REDIS_SCHEMES)
        if self.flower_auth is not None:
            user, _, password = self.flower_auth.partition(":")
            if not user or not password:
                raise ConfigError(f"{_env_name('flower_auth')} must look like user:password, both non-empty")
        for entry in self.url_allowlist:
            _check_allow_entry(entry)
        self._check_politeness()

    def _check_politeness(self) -> None:
        from loopline.politeness.rules import RuleError, parse_rate

        if self.default_host_rate is not None:
            try:
                parse_rate(self.default_host_rate)
            except RuleError as exc:
                raise ConfigError(f"{_env_name('default_host_rate')}: {exc}") from None
        if self.default_host_concurrency < 0:
            raise ConfigError(f"{_env_name('default_host_concurrency')} must be >= 0 (0: no cap), "
                              f"got {self.default_host_concurrency!r}")
        if self.fetch_max_retries < 0:
            raise ConfigError(f"{_env_name('fetch_max_retries')} must be >= 0, got {self.fetch_max_retries!r}")



_by_app: weakref.WeakKeyDictionary[Any, Settings] = weakref.WeakKeyDictionary()


def use_settings(app: Any, settings: Settings) -> None:
    """Make ``settings`` the loopline settings of Celery ``app`` (``loopline.install`` calls it)."""
    _by_app[app] = settings


def settings_for(app: Any) -> Settings:
    """The loopline settings of ``app``: those ``install`` gave it, else read from its configuration."""
    settings = _by_app.get(app)
    if settings is None:
        settings = _by_app[app] = Settings.from_conf(app.conf)
    return settings


def _coerce(name: str, type_: object, raw: object) -> object:
    if isinstance(raw, str):
        return _parse(name, type_, raw.strip(), named=True)
    type_s = str(type_)
    ok = {
        "int": isinstance(raw, int) and not isinstance(raw, bool),
        "float": isinstance(raw, int | float) and not isinstance(raw, bool) and math.isfinite(raw),
        "bool": isinstance(raw, bool),
        "Path": isinstance(raw, Path),
    }.get(type_s)
    if type_s.startswith("tuple") and isinstance(raw, list | tuple) and all(isinstance(v, str) for v in raw):
        return tuple(raw)
    if ok:
        return float(raw) if type_s == "float" else raw  # type: ignore[arg-type]
    raise ConfigError(f"{name}={raw!r} is not a valid {type_s}")


def redact_url(url: str) -> str:
    """Hide the password part of a URL; leave everything else as it was."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _parse(name: str, type_: object, raw: str, *, named: bool = False) -> object:
    var = name if named else _env_name(name)
    type_s = str(type_)
    try:
        if type_s == "int":
            return int(raw)
        if type_s == "float":
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
        if type_s == "bool":
            return _parse_bool(raw)
        if type_s == "Path":
            return Path(raw).expanduser()
        if type_s.startswith("tuple"):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a valid {type_s}") from None
    return raw


def _parse_bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _check_url(name: str, url: str, schemes: tuple[str, ...]) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in schemes:
        raise ConfigError(
            f"{_env_name(name)}={redact_url(url)!r} has scheme {scheme!r}; expected one of {', '.join(schemes)}"
        )


def _check_allow_entry(entry: str) -> None:
    try:
        ipaddress.ip_network(entry, strict=False)
        return
    except ValueError:
        pass
    host = entry.rstrip(".")
    if not _HOST_NAME.fullmatch(host) or any(len(part) > 63 for part in host.split(".")):
        raise ConfigError(f"{_env_name('url_allowlist')} entry {entry!r} is neither an IP, a CIDR nor a host name")
