"""The async HTTP bodies (aiohttp), awaited by the asyncio pool; same rules and results as ``http_sync``."""

from __future__ import annotations

import hashlib
import time
from urllib.parse import urljoin

import aiohttp

from loopline.concurrency.loop_resources import http_session
from loopline.errors import BodyTooLarge, FetchFailed
from loopline.jobs.http_sync import CHUNK_BYTES, MAX_REDIRECTS, REDIRECT_CODES, guard_errors
from loopline.jobs.specs import FetchRequest, FetchResult, WebhookRequest, now_s
from loopline.jobs.urlguard import check_url
from loopline.politeness import http as polite

__all__ = ["fetch", "post"]

# The session checks each URL again and resolves through the guard when it connects (see
# loopline.concurrency.loop_resources.http_session): the name is resolved once, by the guard, per new connection.


def _timeout(deadline: float, url: str) -> aiohttp.ClientTimeout:
    left = deadline - time.perf_counter()
    if left <= 0:
        raise FetchFailed(f"{url}: timed out")
    return aiohttp.ClientTimeout(total=left)


async def fetch(req: FetchRequest) -> FetchResult:
    """Fetch ``req.url``, following redirects itself so that every hop passes the URL guard."""
    started_at = now_s()
    t0 = time.perf_counter()
    deadline = t0 + req.timeout_s
    url, method = req.url, req.method
    session = http_session(req.allowlist)
    for hop in range(MAX_REDIRECTS + 1):
        try:
            with guard_errors():
                check_url(url, req.allowlist)
                async with polite.request(session, method, url, first=hop == 0, lease_s=req.timeout_s,
                                          headers=req.headers, allow_redirects=False,
                                          timeout=_timeout(deadline, req.url)) as response:
                    if response.status in REDIRECT_CODES and "location" in response.headers:
                        url = urljoin(url, response.headers["location"])
                        if response.status == 303 or (response.status in (301, 302) and method == "POST"):
                            method = "GET"
                        continue
                    declared = response.content_length
                    if declared is not None and declared > req.max_bytes:
                        raise BodyTooLarge(f"{req.url}: body of {declared} bytes exceeds max_bytes={req.max_bytes}")
                    digest = hashlib.sha256()
                    size = 0
                    async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                        size += len(chunk)
                        if size > req.max_bytes:
                            raise BodyTooLarge(f"{req.url}: body exceeds max_bytes={req.max_bytes}")
                        digest.update(chunk)
                    return FetchResult(
                        url=req.url, final_url=url, status=response.status,
                        elapsed_ms=round((time.perf_counter() - t0) * 1000, 3), bytes=size,
                        content_type=response.headers.get("content-type"), sha256=digest.hexdigest(),
                        started_at=started_at, finished_at=now_s(),
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise FetchFailed(f"{method} {url} failed: {exc.__class__.__name__}: {exc}") from None
    raise FetchFailed(f"{req.url}: more than {MAX_REDIRECTS} redirects")


async def post(req: WebhookRequest, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
    """POST one webhook attempt; returns (status, Retry-After header). No redirects."""
    try:
        with guard_errors():
            check_url(req.url, req.allowlist)
            async with polite.request(http_session(req.allowlist), "POST", req.url, first=True,
                                      lease_s=req.timeout_s, data=body, headers=headers, allow_redirects=False,
                                      timeout=aiohttp.ClientTimeout(total=req.timeout_s)) as response:
                await response.read()
                return response.status, response.headers.get("retry-after")
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise FetchFailed(f"POST {req.url} failed: {exc.__class__.__name__}: {exc}") from None
