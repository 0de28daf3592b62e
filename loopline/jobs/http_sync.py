"""The blocking HTTP bodies (requests), used where the pool runs sync code: prefork, threads, gevent, solo."""

from __future__ import annotations

import hashlib
import threading
import time
from urllib.parse import urljoin

import requests

from loopline.errors import BodyTooLarge, FetchFailed, GuardRefused
from loopline.jobs.specs import FetchRequest, FetchResult, WebhookRequest, now_s
from loopline.jobs.urlguard import HostUnresolvable, UrlRefused, resolve_and_check
from loopline.politeness import http as polite

__all__ = ["CHUNK_BYTES", "MAX_REDIRECTS", "REDIRECT_CODES", "fetch", "post"]

MAX_REDIRECTS = 10
CHUNK_BYTES = 64 * 1024
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_local = threading.local()


def _session() -> requests.Session:
    # One session per thread (per greenlet under gevent) keeps connections alive between jobs;
    # requests.Session is not documented as thread-safe, so it is never shared.
    session = getattr(_local, "session", None)
    if session is None:
        session = _local.session = requests.Session()
        session.trust_env = False
    return session


def fetch(req: FetchRequest) -> FetchResult:
    """Fetch ``req.url``, following redirects itself so that every hop passes the URL guard."""
    started_at = now_s()
    t0 = time.perf_counter()
    deadline = t0 + req.timeout_s
    url, method = req.url, req.method
    for hop in range(MAX_REDIRECTS + 1):
        _guard(url, req)
        try:
            response = polite.send(
                _session(), method, url, first=hop == 0, lease_s=req.timeout_s,
                headers=req.headers, timeout=_remaining(deadline, req.url), allow_redirects=False, stream=True,
            )
        except requests.RequestException as exc:
            raise FetchFailed(f"{method} {url} failed: {exc.__class__.__name__}: {exc}") from None
        with response:
            if response.status_code in REDIRECT_CODES and "location" in response.headers:
                url = urljoin(url, response.headers["location"])
                if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                    method = "GET"
                continue
            digest, size = _read_capped(response, req, deadline)
            return FetchResult(
                url=req.url,
                final_url=url,
                status=response.status_code,
                elapsed_ms=round((time.perf_counter() - t0) * 1000, 3),
                bytes=size,
                content_type=response.headers.get("content-type"),
                sha256=digest,
                started_at=started_at,
                finished_at=now_s(),
            )
    raise FetchFailed(f"{req.url}: more than {MAX_REDIRECTS} redirects")


def post(req: WebhookRequest, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
    """POST one webhook attempt; returns (status, Retry-After header). No redirects."""
    _guard(req.url, req)
    try:
        with polite.send(_session(), "POST", req.url, first=True, lease_s=req.timeout_s, data=body, headers=headers,
                         timeout=req.timeout_s, allow_redirects=False) as response:
            return response.status_code, response.headers.get("retry-after")
    except requests.RequestException as exc:
        raise FetchFailed(f"POST {req.url} failed: {exc.__class__.__name__}: {exc}") from None


def _guard(url: str, req: FetchRequest | WebhookRequest) -> None:
    try:
        resolve_and_check(url, req.allowlist)
    except HostUnresolvable as exc:
        raise FetchFailed(str(exc)) from None
    except UrlRefused as exc:
        raise GuardRefused(str(exc)) from None


def _remaining(deadline: float, url: str) -> float:
    left = deadline - time.perf_counter()
    if left <= 0:
        raise FetchFailed(f"{url}: timed out")
    return left


def _read_capped(response: requests.Response, req: FetchRequest, deadline: float) -> tuple[str, int]:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > req.max_bytes:
        raise BodyTooLarge(f"{req.url}: body of {declared} bytes exceeds max_bytes={req.max_bytes}")
    digest = hashlib.sha256()
    size = 0
    try:
        for chunk in response.iter_content(CHUNK_BYTES):
            size += len(chunk)
            if size > req.max_bytes:
                raise BodyTooLarge(f"{req.url}: body exceeds max_bytes={req.max_bytes}")
            digest.update(chunk)
            _remaining(deadline, req.url)
    except requests.RequestException as exc:
        raise FetchFailed(f"{req.url}: reading the body failed: {exc}") from None
    return digest.hexdigest(), size
