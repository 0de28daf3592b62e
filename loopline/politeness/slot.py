"""``host_slot(url)``: take a host's turn before a request (sync ``with`` or ``async with``), give it back after.

Entering asks the limiter (one round trip) unless the host has no rule and no pause. When the host is not due,
the slot waits in place for a short moment; for longer waits inside :func:`loopline.politeness.deferring` (the
built-in tasks) it raises :class:`HostNotDue` so the job goes back to the broker instead of holding a worker
slot; elsewhere (a user's own task) it waits until the host is due. Leaving gives back the concurrency lease
and reports a 429/503 answer seen with :meth:`HostSlot.observe`, which pauses the host for every worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from types import TracebackType
from typing import Any

import redis

from loopline.jobs.webhook_policy import parse_retry_after
from loopline.politeness.engine import Engine, PolitenessUnavailable, engine_for
from loopline.politeness.limiter import Decision
from loopline.politeness.rules import host_of

__all__ = ["HostNotDue", "HostSlot", "LEASE_MARGIN_S", "SHORT_WAIT_MS", "host_slot"]

logger = logging.getLogger(__name__)

#: a host due within this long is waited for in place: cheaper than a trip through the broker (and more than
#: the head start a deferred job comes back with, ``defer.EARLY_S``)
SHORT_WAIT_MS = 150
#: the longest single sleep of a slot waiting in place; it asks again after
MAX_POLL_S = 1.0
#: a lease outlives its request's timeout by this much, then expires (a killed worker's lease)
LEASE_MARGIN_S = 2.0
DEFAULT_LEASE_S = 60.0
#: answers that may pause a host
PAUSE_STATUSES = frozenset({429, 503})

#: the task whose job may be deferred by a slot (set by ``deferring``)
deferrable: contextvars.ContextVar[Any] = contextvars.ContextVar("loopline_deferrable", default=None)


class HostNotDue(Exception):
    """The host's turn is more than a moment away; the job should come back in ``wait_ms``."""

    def __init__(self, host: str, wait_ms: int, reason: str) -> None:
        super().__init__(f"{host} is not due for {wait_ms} ms ({reason})")
        self.host, self.wait_ms, self.reason = host, wait_ms, reason


def _current_app() -> Any:
    from celery import current_app, current_task

    task = current_task._get_current_object() if current_task else None
    return task.app if task is not None else current_app._get_current_object()


class HostSlot:
    """One request's turn at its host; see the module docstring. Use through :func:`host_slot`."""

    def __init__(self, url: str, *, app: Any = None, lease_s: float = DEFAULT_LEASE_S, defer: bool = False) -> None:
        self.host = host_of(url)
        self.app = app
        self.lease_s = lease_s
        self.defer = defer
        self.lease_id = ""
        self.status = 0
        self.retry_after_ms: float | None = None
        self._engine: Engine | None = None
        self._started = 0.0

    def observe(self, status: int, retry_after: str | None = None) -> None:
        """Record the answer's status and ``Retry-After`` header, reported to the limiter on leaving."""
        self.status = status
        if status in PAUSE_STATUSES:
            seconds = parse_retry_after(retry_after)
            self.retry_after_ms = None if seconds is None else seconds * 1000

    # -- what both flavours share ------------------------------------------------------------------------

    def _job_id(self) -> str:
        task = deferrable.get() if self.defer else None
        request_id = getattr(getattr(task, "request", None), "id", None) if task is not None else None
        return str(request_id) if request_id else uuid.uuid4().hex

    def _next(self, decision: Decision) -> float:
        """Seconds to sleep before asking again, or raise HostNotDue to defer the job."""
        if decision.wait_ms > SHORT_WAIT_MS and self.defer and deferrable.get() is not None:
            raise HostNotDue(self.host, decision.wait_ms, decision.reason)
        return min(decision.wait_ms / 1000, MAX_POLL_S)

    def _must_report(self) -> bool:
        return bool(self.lease_id) or self.status == 429 or (self.status == 503 and self.retry_after_ms is not None)

    def _release_args(self) -> dict[str, Any]:
        return {"lease_id": self.lease_id, "elapsed_ms": (time.perf_counter() - self._started) * 1000,
                "status": self.status if self.status in PAUSE_STATUSES else 0, "retry_after_ms": self.retry_after_ms}

    def _lease_args(self, engine: Engine, job_id: str) -> dict[str, Any]:
        rule = engine.rule_for(self.host, engine.snapshot)
        if rule is not None and rule.concurrency:
            self.lease_id = self.lease_id or uuid.uuid4().hex
        return {"lease_id": self.lease_id, "lease_ttl_ms": (self.lease_s + LEASE_MARGIN_S) * 1000, "job_id": job_id}

    def _unavailable(self, exc: Exception) -> PolitenessUnavailable:
        from loopline.settings import redact_url

        where = redact_url(self._engine.url) if self._engine is not None and self._engine.url else "?"
        return PolitenessUnavailable(f"cannot check the limits of {self.host} at {where}: {type(exc).__name__}: {exc}")

    # -- sync --------------------------------------------------------------------------------------------

    def __enter__(self) -> HostSlot:
        engine = self._engine = engine_for(self.app if self.app is not None else _current_app())
        snapshot = engine.refresh()
        if not engine.needs_check(self.host, snapshot):
            return self
        job_id = self._job_id()
        while True:
            try:
                decision = engine.limiter().acquire(self.host, engine.rule_for(self.host, engine.snapshot),
                                                    **self._lease_args(engine, job_id))
            except redis.RedisError as exc:
                raise self._unavailable(exc) from exc
            if decision.go:
                self._started = time.perf_counter()
                return self
            time.sleep(self._next(decision))

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        engine, self._engine = self._engine, None  # give back once, however often the response is closed
        if engine is None or not self._must_report():
            return
        try:
            until = engine.limiter().release(self.host, **self._release_args())
        except redis.RedisError as error:
            logger.warning("could not give back the slot of %s (its lease expires by itself): %s", self.host, error)
            return
        if until:
            engine.note_pause(self.host, until)

    # -- async -------------------------------------------------------------------------------------------

    async def __aenter__(self) -> HostSlot:
        engine = self._engine = engine_for(self.app if self.app is not None else _current_app())
        snapshot = await engine.arefresh()
        if not engine.needs_check(self.host, snapshot):
            return self
        job_id = self._job_id()
        while True:
            try:
                decision = await engine.async_limiter().acquire(
                    self.host, engine.rule_for(self.host, engine.snapshot), **self._lease_args(engine, job_id))
            except redis.RedisError as exc:
                raise self._unavailable(exc) from exc
            if decision.go:
                self._started = time.perf_counter()
                return self
            await asyncio.sleep(self._next(decision))

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        engine, self._engine = self._engine, None
        if engine is None or not self._must_report():
            return
        try:
            until = await engine.async_limiter().release(self.host, **self._release_args())
        except redis.RedisError as error:
            logger.warning("could not give back the slot of %s (its lease expires by itself): %s", self.host, error)
            return
        if until:
            engine.note_pause(self.host, until)


def host_slot(url: str, *, app: Any = None, lease_s: float = DEFAULT_LEASE_S) -> HostSlot:
    """Take ``url``'s host's turn for one request: ``with host_slot(url):`` or ``async with host_slot(url):``.

    Waits until the host's rate, concurrency cap and pause allow a request (a concurrency lease lasts at most
    ``lease_s`` + 2 s, for a process killed while holding it). Call ``slot.observe(status, retry_after)`` with
    the answer so that a 429/503 pauses the host for every worker. ``app`` defaults to the running task's app.
    """
    return HostSlot(url, app=app, lease_s=lease_s)
