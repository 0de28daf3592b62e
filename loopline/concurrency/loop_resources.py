"""Per-process async resources for the asyncio pool: startup/shutdown hooks and a shared HTTP session.

A task reuses one ``aiohttp.ClientSession`` (and so one connection pool) per worker process instead
of opening one per job::

    from loopline.concurrency.loop_resources import http_session

    @app.task
    async def ping(url):
        async with http_session().get(url) as response:
            return response.status

Own resources register with :func:`on_startup` / :func:`on_shutdown` (coroutine functions run on the
pool's loop when it starts and stops).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

__all__ = ["http_session", "on_shutdown", "on_startup", "shutdown", "startup"]

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
_startup_hooks: list[Hook] = []
_shutdown_hooks: list[Hook] = []
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def on_startup(hook: Hook) -> Hook:
    """Register ``hook`` to run on the pool's loop before the first task (usable as a decorator)."""
    _startup_hooks.append(hook)
    return hook


def on_shutdown(hook: Hook) -> Hook:
    """Register ``hook`` to run on the pool's loop after the last task."""
    _shutdown_hooks.append(hook)
    return hook


def http_session() -> aiohttp.ClientSession:
    """The aiohttp session of the running loop, created on first use; closed by :func:`shutdown`."""
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        # No per-host cap: the pool's slot count is the limit. trust_env off: no proxies from the environment.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60)
        session = _sessions[loop] = aiohttp.ClientSession(connector=connector, trust_env=False)
    return session


async def startup() -> None:
    for hook in _startup_hooks:
        await hook()


async def shutdown() -> None:
    for hook in reversed(_shutdown_hooks):
        try:
            await hook()
        except Exception:
            logger.exception("asyncio pool: shutdown hook %r failed", hook)
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()
