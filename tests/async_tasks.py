"""Test-only tasks for the asyncio pool and the bridge; workers import them with ``CELERY_WORKER_INCLUDE``.

Celery's command line reads every ``celery worker`` option from ``CELERY_WORKER_<OPTION>`` too (click's
``auto_envvar_prefix="CELERY"``), so ``loopline worker`` picks this module up from its environment.
Executions are recorded in the test session's Redis so a test can tell whether a body ran and how often.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any

import aiohttp
import redis
import redis.asyncio
from celery import Task, current_task
from celery.exceptions import SoftTimeLimitExceeded

from config.celery_app import app

__all__ = [
    "GATE_TIMEOUT_S",
    "GateTimeout",
    "always_value_error",
    "arrive",
    "arrive_async",
    "async_fetch",
    "blocker",
    "context_probe",
    "gather",
    "hard_limit_only",
    "hard_sleep",
    "marked_sleep",
    "open_gate",
    "retry_twice",
    "soft_cleanup",
    "soft_limit_only",
    "sync_gather",
    "sync_nap",
]

#: How long a task waits at a gate for the rest of its group; below the tests' own timeouts.
GATE_TIMEOUT_S = 60

_clients: dict[int, redis.Redis] = {}


def store() -> redis.Redis:
    """A Redis client for this process (a prefork child gets its own)."""
    client = _clients.get(os.getpid())
    if client is None:
        client = _clients[os.getpid()] = redis.Redis.from_url(os.environ["LOOPLINE_BROKER_URL"])
    return client


class GateTimeout(Exception):
    """Fewer jobs than a gate waits for were ever in flight together."""


def open_gate(client: redis.Redis, key: str, n: int) -> None:
    """Let the ``n`` tasks waiting at ``key`` through (what the ``n``-th arrival does)."""
    client.rpush(f"{key}:open", *["1"] * n)


def arrive(key: str, n: int) -> int:
    """Count one arrival at the gate ``key`` and wait until ``n`` have arrived; returns the arrivals seen.

    Only ``n`` jobs in flight at the same moment get through, so a test of concurrency that waits for them
    passes on any machine, fast or slow, and fails (GateTimeout) only if they never overlapped.
    """
    client = store()
    arrived = int(client.incr(key))
    if arrived == n:
        open_gate(client, key, n)
    if client.blpop([f"{key}:open"], timeout=GATE_TIMEOUT_S) is None:
        raise GateTimeout(f"only {int(client.get(key) or 0)} of {n} jobs were in flight at once at {key}")
    return arrived


async def arrive_async(key: str, n: int) -> int:
    """:func:`arrive` for coroutines: the wait does not hold the event loop."""
    async with redis.asyncio.Redis.from_url(os.environ["LOOPLINE_BROKER_URL"]) as client:
        arrived = int(await client.incr(key))
        if arrived == n:
            await client.rpush(f"{key}:open", *["1"] * n)
        if await client.blpop([f"{key}:open"], timeout=GATE_TIMEOUT_S) is None:
            raise GateTimeout(f"only {int(await client.get(key) or 0)} of {n} jobs were in flight at once at {key}")
    return arrived



def _snapshot(task: Task) -> dict[str, Any]:
    current = current_task.request.id if current_task else None
    return {"id": task.request.id, "retries": task.request.retries, "args": list(task.request.args or ()),
            "current_id": current}


@app.task(bind=True, name="async_tasks.context_probe")
async def context_probe(self: Task, n: int, key: str | None = None, count: int = 1) -> list[dict[str, Any]]:
    """The request seen before and after each of several awaits; with ``key``, ``count`` of them run at once."""
    seen = [_snapshot(self)]
    if key is not None:
        await arrive_async(key, count)
        seen.append(_snapshot(self))
    await asyncio.sleep(0)
    seen.append(_snapshot(self))
    await asyncio.sleep(random.uniform(0.01, 0.05))
    seen.append(_snapshot(self))
    return seen


@app.task(name="async_tasks.gather")
async def gather(key: str, n: int) -> int:
    """Return once ``n`` of these are in flight at once at ``key``."""
    return await arrive_async(key, n)


@app.task(name="async_tasks.sync_gather")
def sync_gather(key: str, n: int) -> int:
    """A sync task that returns once ``n`` of these (or the test, through open_gate) are in flight at ``key``."""
    return arrive(key, n)


@app.task(name="async_tasks.hard_limit_only", time_limit=1)
async def hard_limit_only() -> str:
    """Sets only a hard limit: it must be enforced, and no default soft limit above it may refuse the call."""
    await asyncio.sleep(3)
    return "slept through the hard limit"


@app.task(name="async_tasks.soft_limit_only", soft_time_limit=400)
async def soft_limit_only(s: float) -> str:
    """Sets only a soft limit, above the default hard limit (300 s): no default may refuse or cut it."""
    await asyncio.sleep(s)
    return "done"


@app.task(name="async_tasks.sync_nap")
def sync_nap(s: float) -> dict[str, float]:
    started_at = time.time()
    time.sleep(s)
    return {"started_at": started_at, "finished_at": time.time()}


@app.task(bind=True, name="async_tasks.retry_twice")
async def retry_twice(self: Task) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    if self.request.retries < 2:
        raise self.retry(countdown=0.1)
    return {"retries": self.request.retries, "id": self.request.id}


@app.task(name="async_tasks.always_value_error", autoretry_for=(ValueError,), retry_backoff=False, max_retries=2,
          default_retry_delay=0.1)
async def always_value_error(key: str) -> None:
    store().incr(key)
    await asyncio.sleep(0.01)
    raise ValueError(f"attempt failed ({key})")


@app.task(name="async_tasks.soft_cleanup", soft_time_limit=1, time_limit=3)
async def soft_cleanup() -> str:
    try:
        await asyncio.sleep(10)
    except SoftTimeLimitExceeded:
        await asyncio.sleep(0.01)
        return "cleaned up"
    return "slept through the soft limit"


@app.task(name="async_tasks.hard_sleep", soft_time_limit=0.5, time_limit=1.5)
async def hard_sleep() -> str:
    """Ignores its soft limit; only the hard one can stop it."""
    try:
        await asyncio.sleep(10)
    except SoftTimeLimitExceeded:
        await asyncio.sleep(10)
    return "slept through the hard limit"


@app.task(name="async_tasks.marked_sleep")
async def marked_sleep(s: float, key: str | None = None) -> dict[str, float]:
    """Sleep ``s`` seconds; with ``key``, first count the execution in Redis."""
    if key is not None:
        store().incr(key)
    started_at = time.time()
    await asyncio.sleep(s)
    return {"started_at": started_at, "finished_at": time.time()}


@app.task(name="async_tasks.blocker")
async def blocker() -> str:
    time.sleep(0.3)  # deliberately blocking: the pool must report it
    await asyncio.sleep(0)
    return "blocked"


@app.task(name="async_tasks.async_fetch")
async def async_fetch(url: str, pause_s: float = 0.0) -> dict[str, Any]:
    """An ``async def`` task doing real I/O: an aiohttp GET, then an optional pause."""
    started_at = time.time()
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        body = await response.read()
    await asyncio.sleep(pause_s)
    return {"status": response.status, "bytes": len(body), "started_at": started_at, "finished_at": time.time()}


@app.task(name="async_tasks.retry_sleep_is_cooperative")
def retry_sleep_is_cooperative() -> bool:
    """True when the sleep between the result backend's retries (kombu's retry_over_time) is the patched one."""
    import kombu.utils.functional

    return kombu.utils.functional.sleep is time.sleep
