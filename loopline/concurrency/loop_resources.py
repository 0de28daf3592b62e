"""Per-process async resources for the asyncio pool: startup/shutdown hooks and a shared HTTP session.

A task reuses one ``aiohttp.ClientSession`` (and so one connection pool) per worker process instead
of opening one per job::

    from loopline.concurrency.loop_resources import http_session

    @app.task
    async def ping(url):
        async with http_session().get(url) as response:
            return response.status

The session is guarded: every URL it requests (each redirect hop too) passes
:func:`tasks.urlguard.check_url`, and its connector resolves names only through the guard, which
refuses a name if any address is guarded, so the connection goes to the addresses that were checked.
Refusals raise :class:`tasks.urlguard.UrlRefused`; pass an :class:`~tasks.urlguard.Allowlist` to let
private addresses through (``http_session(Allowlist.parse(["10.0.0.0/8"]))``).

Own resources register with :func:`on_startup` / :func:`on_shutdown` (coroutine functions run on the
pool's loop when it starts and stops).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

if TYPE_CHECKING:
    from loopline.jobs.urlguard import Allowlist

# tasks.urlguard is imported where it is used, not here: importing the tasks package builds the reference
# pipeline's app, and Celery imports this module (through the asyncio pool) before the app it serves.

__all__ = ["GuardedResolver", "http_session", "on_shutdown", "on_startup", "shutdown", "startup"]

logger = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]
_startup_hooks: list[Hook] = []
_shutdown_hooks: list[Hook] = []
_sessions: dict[tuple[asyncio.AbstractEventLoop, Allowlist], aiohttp.ClientSession] = {}


class GuardedResolver(AbstractResolver):
    """An aiohttp resolver that is the URL guard: it resolves through the guard's resolver seam and hands
    the connector only addresses the guard checked, refusing the name if any of them is guarded."""

    def __init__(self, allowlist: Allowlist) -> None:
        self.allowlist = allowlist

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_UNSPEC) -> list[ResolveResult]:
        # UrlRefused is no OSError, so aiohttp (TCPConnector._create_direct_connection) lets it out as it is;
        # a name that does not resolve raises the resolver's OSError, which aiohttp wraps as usual.
        from loopline.jobs.urlguard import aresolve_host

        addresses = await aresolve_host(host, port, self.allowlist)
        results = [
            ResolveResult(hostname=host, host=str(ip), port=port, proto=0,
                          family=socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                          flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
            for ip in addresses
        ]
        results = [result for result in results if family in (socket.AF_UNSPEC, result["family"])]
        if not results:
            raise OSError(f"{host} has no address of family {family!r}")
        return results

    async def close(self) -> None:
        pass


async def _guard_each_request(allowlist: Allowlist, request: aiohttp.ClientRequest,
                              handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    # A client middleware runs for every request the session sends, each redirect aiohttp follows too.
    # It checks what the resolver never sees (IP literals: aiohttp connects to them without resolving),
    # and names the URL in the resolver's refusals, which know only the host.
    from loopline.jobs.urlguard import UrlRefused, check_url

    url = str(request.url)
    check_url(url, allowlist)
    try:
        return await handler(request)
    except UrlRefused as exc:
        if exc.url:
            raise
        raise type(exc)(url, exc.reason) from None


def on_startup(hook: Hook) -> Hook:
    """Register ``hook`` to run on the pool's loop before the first task (usable as a decorator)."""
    _startup_hooks.append(hook)
    return hook


def on_shutdown(hook: Hook) -> Hook:
    """Register ``hook`` to run on the pool's loop after the last task."""
    _shutdown_hooks.append(hook)
    return hook


def http_session(allowlist: Allowlist | None = None) -> aiohttp.ClientSession:
    """The running loop's guarded aiohttp session for ``allowlist`` (default: only public addresses).

    Created on first use, closed by :func:`shutdown`. One session per allowlist, so that a connection
    checked under one allowlist never serves a request under another.
    """
    from loopline.jobs.urlguard import Allowlist

    allow = allowlist or Allowlist()
    loop = asyncio.get_running_loop()
    session = _sessions.get((loop, allow))
    if session is None or session.closed:
        # No per-host cap: the pool's slot count is the limit. No DNS cache: every new connection asks the
        # guard, and the guard's answer is the one connected to. trust_env off: no proxies from the environment.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, use_dns_cache=False,
                                         resolver=GuardedResolver(allow))
        session = _sessions[loop, allow] = aiohttp.ClientSession(
            connector=connector, trust_env=False, middlewares=(functools.partial(_guard_each_request, allow),))
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
    loop = asyncio.get_running_loop()
    for key in [key for key in _sessions if key[0] is loop]:
        await _sessions.pop(key).close()
