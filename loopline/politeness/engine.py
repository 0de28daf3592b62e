"""The politeness engine of one process: its Redis clients, created lazily, and the cached rules and pauses.

One engine per Celery app (its broker's Redis holds the rules). Every ``REFRESH_S`` it reads the rules, the
paused hosts and Redis' clock in one pipelined round trip; in between a request for a host with no rule and no
pause costs no round trip at all, so a deployment without rules pays nothing per request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio

from loopline.politeness.keys import PAUSED_KEY, RULES_KEY
from loopline.politeness.limiter import AsyncLimiter, Limiter
from loopline.politeness.rules import Rule, RuleError

__all__ = ["Engine", "PolitenessUnavailable", "Snapshot", "engine_for", "redis_url_of"]

logger = logging.getLogger(__name__)

#: how long a process trusts what it read about rules and pauses: rule changes reach it within this
REFRESH_S = 1.0
#: Redis connections per client (one sync client per process, one async client per event loop): hundreds of
#: greenlets or coroutines share them, each holding one only for its script call, and wait for a free one
#: rather than fail (redis-py's default pools raise MaxConnectionsError once they are exhausted)
MAX_CONNECTIONS = 128
POOL_WAIT_S = 10.0
SOCKET_TIMEOUT_S = 10.0
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


class PolitenessUnavailable(RuntimeError):
    """The politeness engine cannot work: the broker is not Redis, or its Redis cannot be reached."""


def redis_url_of(app: Any) -> str:
    """The broker URL of ``app`` if it is Redis (rules live there); PolitenessUnavailable otherwise."""
    url = app.conf.broker_url
    if isinstance(url, str) and url.startswith(_REDIS_SCHEMES):
        return url
    from loopline.settings import redact_url

    shown = redact_url(url) if isinstance(url, str) else repr(url)
    raise PolitenessUnavailable(f"per-host limits live in the broker's Redis, but the broker is {shown}; "
                                "use a redis:// (or rediss://, unix://) broker")


@dataclass
class Snapshot:
    """What a process knows about rules and pauses, read at ``fetched_at`` (monotonic)."""

    rules: dict[str, Rule] = field(default_factory=dict)
    paused_until_ms: dict[str, float] = field(default_factory=dict)
    clock_offset_ms: float = 0.0  # Redis' clock minus this process's wall clock
    fetched_at: float = float("-inf")

    def redis_now_ms(self) -> float:
        return time.time() * 1000 + self.clock_offset_ms


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Engine:
    """Rules, pauses and limiter clients for one broker, shared by every thread, greenlet and coroutine.

    ``url`` None: the broker is not Redis, so there can be no rules; every slot is free.
    """

    def __init__(self, url: str | None, default: Rule | None = None) -> None:
        self.url = url
        self.default = default
        self.snapshot = Snapshot()
        self._pid = os.getpid()
        self._client: redis.Redis | None = None
        self._limiter: Limiter | None = None
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncLimiter] = (
            weakref.WeakKeyDictionary())
        self._lock = threading.Lock()
        self._client_lock = threading.Lock()
        self._refreshing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Event] = (
            weakref.WeakKeyDictionary())

    # -- clients: one sync client per process, one async client per event loop ---------------------------------

    def limiter(self) -> Limiter:
        self._after_fork()
        if self.url is None:
            raise PolitenessUnavailable("per-host limits need a Redis broker")
        if self._limiter is None:
            with self._client_lock:
                if self._limiter is None:
                    self._client = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(
                        self.url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S,
                        socket_timeout=SOCKET_TIMEOUT_S, health_check_interval=30))
                    self._limiter = Limiter(self._client)
        return self._limiter

    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # a prefork child inherited the parent's engine: its sockets are not ours
            self._pid, self._client, self._limiter = os.getpid(), None, None
            self._async, self._refreshing = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
            self._lock, self._client_lock = threading.Lock(), threading.Lock()

    def async_limiter(self) -> AsyncLimiter:
        self._after_fork()
        loop = asyncio.get_running_loop()
        limiter = self._async.get(loop)
        if limiter is None:
            if self.url is None:
                raise PolitenessUnavailable("per-host limits need a Redis broker")
            client = redis.asyncio.Redis.from_pool(redis.asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, socket_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=30))
            limiter = self._async[loop] = AsyncLimiter(client)
        return limiter

    def close(self) -> None:
        """Close the sync client (made again if the engine is used after)."""
        client, self._client, self._limiter = self._client, None, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close the async client of the running loop: before that loop closes, or its sockets are leaked."""
        limiter = self._async.pop(asyncio.get_running_loop(), None)
        if limiter is not None:
            await limiter.client.aclose()

    # -- the cached view ---------------------------------------------------------------------------------

    def _stale(self) -> bool:
        if self.url is None:
            return False
        return time.monotonic() - self.snapshot.fetched_at >= REFRESH_S

    def _apply(self, started_s: float, reply: list[Any]) -> None:
        (seconds, micros), raw_rules, raw_paused = reply
        rules: dict[str, Rule] = {}
        for host, raw in raw_rules.items():
            try:
                rules[_text(host)] = Rule.from_json(raw)
            except (RuleError, ValueError, TypeError) as exc:  # written by hand around the CLI: skip, say so
                logger.error("ignoring the unreadable politeness rule for %s: %s", _text(host), exc)
        self.snapshot = Snapshot(
            rules=rules,
            paused_until_ms={_text(h): float(v) for h, v in raw_paused.items()},
            clock_offset_ms=(int(seconds) * 1000 + int(micros) / 1000) - started_s * 1000,
            fetched_at=time.monotonic(),
        )

    def _failed(self, exc: Exception) -> None:
        # Keep the last view and try again in a second; a request for a ruled host will say what is wrong.
        self.snapshot.fetched_at = time.monotonic()
        logger.warning("could not read the politeness rules from %s: %s", self.url, exc)

    def refresh(self) -> Snapshot:
        """The view, read again when it is a second old: by one caller; the others go on with the old view
        meanwhile (waiting for it would queue every request behind one round trip), except before the first
        read, when there is no view to go on with."""
        if self._stale() and self._lock.acquire(blocking=self._never_read()):
            try:
                if self._stale():
                    started = time.time()
                    try:
                        with self.limiter().client.pipeline(transaction=False) as pipe:
                            pipe.time()
                            pipe.hgetall(RULES_KEY)
                            pipe.hgetall(PAUSED_KEY)
                            self._apply(started, pipe.execute())
                    except redis.RedisError as exc:
                        self._failed(exc)
            finally:
                self._lock.release()
        return self.snapshot

    async def arefresh(self) -> Snapshot:
        """:meth:`refresh` on an event loop. The others wait on an Event, woken together (an asyncio.Lock would
        hand itself on one waiter per loop iteration: seconds, with hundreds of coroutines on a busy loop)."""
        if not self._stale():
            return self.snapshot
        loop = asyncio.get_running_loop()
        done = self._refreshing.get(loop)
        if done is None:
            done = self._refreshing[loop] = asyncio.Event()
            try:
                started = time.time()
                async with self.async_limiter().client.pipeline(transaction=False) as pipe:
                    pipe.time()
                    pipe.hgetall(RULES_KEY)
                    pipe.hgetall(PAUSED_KEY)
                    self._apply(started, await pipe.execute())
            except redis.RedisError as exc:
                self._failed(exc)
            finally:
                del self._refreshing[loop]
                done.set()
        elif self._never_read():
            await done.wait()
        return self.snapshot

    def _never_read(self) -> bool:
        return self.snapshot.fetched_at == float("-inf")

    def rule_for(self, host: str, snapshot: Snapshot) -> Rule | None:
        return snapshot.rules.get(host, self.default)

    def needs_check(self, host: str, snapshot: Snapshot) -> bool:
        """True when a request for ``host`` has to ask Redis: it has a rule, or it is (or may be) paused."""
        if self.url is None:
            return False
        return host in snapshot.rules or self.default is not None or host in snapshot.paused_until_ms

    def note_pause(self, host: str, until_ms: float) -> None:
        """Remember at once a pause this process caused, before the next refresh reads it back."""
        if until_ms > self.snapshot.paused_until_ms.get(host, 0.0):
            self.snapshot.paused_until_ms[host] = until_ms

    def pause_left_s(self, host: str) -> float:
        """Seconds until ``host``'s pause ends, as far as this process knows; 0 when it is not paused."""
        until = self.snapshot.paused_until_ms.get(host)
        if until is None:
            return 0.0
        return max(0.0, (until - self.snapshot.redis_now_ms()) / 1000)


_engines: weakref.WeakKeyDictionary[Any, Engine] = weakref.WeakKeyDictionary()


def engine_for(app: Any) -> Engine:
    """The engine of Celery ``app``: its broker's Redis, its default rule from its loopline settings.

    With a broker that is not Redis there are no rules and every request goes free, unless a default rule is
    configured: then PolitenessUnavailable says why it cannot be kept.
    """
    engine = _engines.get(app)
    if engine is None:
        from loopline.settings import settings_for

        settings = settings_for(app)
        default = None
        if settings.default_host_rate is not None or settings.default_host_concurrency:
            default = Rule(rate=settings.default_host_rate, concurrency=settings.default_host_concurrency)
        try:
            url: str | None = redis_url_of(app)
        except PolitenessUnavailable:
            if default is not None:
                raise
            url = None
        engine = _engines[app] = Engine(url, default)
    return engine
