"""The shared core of each task: argument validation, limits and the shape of results.

Sync and async bodies both build a spec here first and return a result built here, so a job
behaves the same under every pool.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from loopline.errors import InvalidJob
from loopline.jobs.urlguard import Allowlist, UrlRefused, check_url
from loopline.jobs.webhook_policy import encode_payload
from loopline.settings import Settings

__all__ = [
    "ALLOWED_METHODS",
    "FetchRequest",
    "FetchResult",
    "SleepRequest",
    "WebhookRequest",
    "WebhookResult",
    "now_s",
]

ALLOWED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
MAX_SLEEP_MS = 3_600_000


def now_s() -> float:
    """Wall-clock time in epoch seconds, as recorded in results (comparable across processes)."""
    return time.time()


@functools.lru_cache(maxsize=16)
def _allowlist(entries: tuple[str, ...]) -> Allowlist:
    # Parsed once per distinct setting, not once per job (parsing its networks was ~3 % of a worker's CPU).
    return Allowlist.parse(entries)


def _check_url(url: object, allowlist: Allowlist) -> str:
    if not isinstance(url, str) or not url:
        raise InvalidJob(f"url must be a non-empty string, got {url!r}")
    try:
        check_url(url, allowlist)
    except UrlRefused as exc:
        raise InvalidJob(str(exc)) from None
    return url


def _check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise InvalidJob(f"headers must map strings to strings, got {headers!r}")
    return dict(headers)


def _positive(name: str, value: object, default: float, upper: float) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= upper:
        raise InvalidJob(f"{name} must be a number in (0, {upper}], got {value!r}")
    return value


def _positive_int(name: str, value: object, default: int, upper: int) -> int:
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1000.0 from a JSON client that writes every number as a float
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= upper:
        raise InvalidJob(f"{name} must be a whole number in [1, {upper}], got {value!r}")
    return value


@dataclass(frozen=True)
class FetchRequest:
    """A validated ``fetch_url`` job."""

    url: str
    method: str
    headers: dict[str, str]
    timeout_s: float
    max_bytes: int
    allowlist: Allowlist = field(repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        url: object,
        method: object = "GET",
        headers: object = None,
        timeout_s: object = None,
        max_bytes: object = None,
    ) -> FetchRequest:
        allowlist = _allowlist(settings.url_allowlist)
        if not isinstance(method, str) or method.upper() not in ALLOWED_METHODS:
            raise InvalidJob(f"method must be one of {', '.join(sorted(ALLOWED_METHODS))}, got {method!r}")
        limit_s = settings.task_soft_time_limit_s
        return cls(
            url=_check_url(url, allowlist),
            method=method.upper(),
            headers=_check_headers(headers),
            timeout_s=_positive("timeout_s", timeout_s, min(settings.fetch_timeout_s, limit_s), limit_s),
            max_bytes=_positive_int("max_bytes", max_bytes, settings.fetch_max_bytes, 2**40),
            allowlist=allowlist,
        )


class _Result:
    """A task's return value: sent as a plain dict, so that any serializer and any client can read it."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class FetchResult(_Result):
    """What ``fetch_url`` returns (as a dict): the response's shape, never its body."""

    url: str
    final_url: str
    status: int
    elapsed_ms: float
    bytes: int
    content_type: str | None
    sha256: str
    started_at: float
    finished_at: float


@dataclass(frozen=True)
class WebhookRequest:
    """A validated ``deliver_webhook`` job."""

    url: str
    payload: Any
    secret: str | None
    headers: dict[str, str]
    timeout_s: float
    allowlist: Allowlist = field(repr=False)

    @classmethod
    def build(
        cls,
        settings: Settings,
        url: object,
        payload: object,
        secret: object = None,
        headers: object = None,
        timeout_s: object = None,
    ) -> WebhookRequest:
        allowlist = _allowlist(settings.url_allowlist)
        if secret is not None and (not isinstance(secret, str) or not secret):
            raise InvalidJob("secret must be a non-empty string or None")
        limit_s = settings.task_soft_time_limit_s
        encode_payload(payload)  # InvalidJob now, at .delay(), for a payload whose body would not be JSON
        return cls(
            url=_check_url(url, allowlist),
            payload=payload,
            secret=secret,
            headers=_check_headers(headers),
            timeout_s=_positive("timeout_s", timeout_s, min(settings.fetch_timeout_s, limit_s), limit_s),
            allowlist=allowlist,
        )


@dataclass(frozen=True)
class WebhookResult(_Result):
    """What ``deliver_webhook`` returns (as a dict) once the receiver accepted the delivery."""

    url: str
    status: int
    attempts: int
    elapsed_ms: float
    started_at: float
    finished_at: float


@dataclass(frozen=True)
class SleepRequest:
    """A validated ``io_sleep`` job: pure latency, no I/O."""

    ms: float

    @classmethod
    def build(cls, ms: object) -> SleepRequest:
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not 0 <= ms <= MAX_SLEEP_MS:
            raise InvalidJob(f"ms must be a number in [0, {MAX_SLEEP_MS}], got {ms!r}")
        return cls(ms=ms)

    def result(self, started_at: float) -> dict[str, Any]:
        return {"slept_ms": self.ms, "started_at": started_at, "finished_at": now_s()}
