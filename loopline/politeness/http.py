"""The built-in HTTP jobs' requests, each inside its host's slot: ``send`` (requests) and ``request`` (aiohttp).

Each takes the host's turn before the request and gives it back when the response is closed, reporting its
status so that a 429 or 503 pauses the host. ``first`` marks a job's first request: only that one may defer the
job (a later redirect hop waits in place, rather than fetch the earlier hops again).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import requests

from loopline.politeness.slot import HostSlot

__all__ = ["request", "send"]


def send(session: requests.Session, method: str, url: str, *, first: bool, lease_s: float,
         **kwargs: Any) -> requests.Response:
    """``session.request(method, url, **kwargs)`` in ``url``'s host slot, held until the response is closed."""
    slot = HostSlot(url, lease_s=lease_s, defer=first)
    slot.__enter__()
    try:
        response = session.request(method, url, **kwargs)
    except BaseException:
        slot.__exit__(*sys.exc_info())
        raise
    slot.observe(response.status_code, response.headers.get("retry-after"))
    close = response.close

    def close_and_release() -> None:
        try:
            close()
        finally:
            slot.__exit__(None, None, None)

    response.close = close_and_release  # type: ignore[method-assign]
    return response


@asynccontextmanager
async def request(session: aiohttp.ClientSession, method: str, url: str, *, first: bool, lease_s: float,
                  **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
    """``async with session.request(method, url, **kwargs)`` in ``url``'s host slot."""
    async with HostSlot(url, lease_s=lease_s, defer=first) as slot, session.request(method, url, **kwargs) as response:
        slot.observe(response.status, response.headers.get("retry-after"))
        yield response
