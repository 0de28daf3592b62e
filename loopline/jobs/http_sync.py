"""The blocking HTTP bodies (requests), used where the pool runs sync code: prefork, threads, gevent, solo."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Iterator
from urllib.parse import urljoin

import requests

from loopline.errors import BodyTooLarge, FetchFailed, GuardRefused
from loopline.jobs.guarded_adapter import GuardedAdapter
from loopline.jobs.specs import FetchRequest, FetchResult, WebhookRequest, now_s
from loopline.jobs.urlguard import Allowlist, HostUnresolvable, UrlRefused, check_url
from loopline.politeness import http as polite

__all__ = ["CHUNK_BYTES", "MAX_REDIRECTS", "REDIRECT_CODES", "close_sessions", "fetch", "guard_errors", "post"]

MAX_REDIRECTS = 10
CHUNK_BYTES = 64 * 1024
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
# Sessions between jobs, per allowlist: a connection checked under one allowlist never serves a job under another.
_idle: dict[Allowlist, list[requests.Session]] = {}
_idle_lock = threading.Lock()


def _new_session(allowlist: Allowlist) -> requests.Session:
    # Its adapter guards every request and connects to the addresses it checked.
    session = requests.Session()
    session.trust_env = False
    adapter = GuardedAdapter(allowlist)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@contextlib.contextmanager
def _lent_session(allowlist: Allowlist) -> Iterator[requests.Session]:
    """A session for one job under ``allowlist``: one job at a time per session, reused by later jobs.

    requests.Session is not documented as thread-safe, so a session is never used by two jobs at once; but it
    is not kept per thread either: the gevent pool runs every task in a new greenlet, where a thread-local
    (greenlet-local once patched) was a new Session, connection pool and TCP connection per job.
    """
    with _idle_lock:
        idle = _idle.get(allowlist)
        session = idle.pop() if idle else None
    lent = session or _new_session(allowlist)
    try:
        yield lent
    finally:
        with _idle_lock:
            _idle.setdefault(allowlist, []).append(lent)


def close_sessions() -> None:
    """Close the idle sessions and their kept-alive connections (sessions lent now go back idle after)."""
    with _idle_lock:
        idle = [session for sessions in _idle.values() for session in sessions]
        _idle.clear()
    for session in idle:
        session.close()


@contextlib.contextmanager
def guard_errors() -> Iterator[None]:
    """Turn the guard's refusals into the task errors: GuardRefused, or FetchFailed (worth retrying) for a
    host that does not resolve."""
    try:
        yield
    except HostUnresolvable as exc:
        raise FetchFailed(str(exc)) from None
    except UrlRefused as exc:
        raise GuardRefused(str(exc)) from None


def fetch(req: FetchRequest) -> FetchResult:
    """Fetch ``req.url``, following redirects itself so that every hop passes the URL guard."""
    with _lent_session(req.allowlist) as session:
        return _fetch(req, session)


def post(req: WebhookRequest, body: bytes, headers: dict[str, str]) -> tuple[int, str | None]:
    """POST one webhook attempt; returns (status, Retry-After header). No redirects."""
    with _lent_session(req.allowlist) as session:
        return _post(req, session, body, headers)


def _fetch(req: FetchRequest, session: requests.Session) -> FetchResult:
    started_at = now_s()
    t0 = time.perf_counter()
    deadline = t0 + req.timeout_s
    url, method = req.url, req.method
    for hop in range(MAX_REDIRECTS + 1):
        try:
            with guard_errors():
                check_url(url, req.allowlist)  # what requests might not parse is refused as the guard words it
                response = polite.send(
                    session, method, url, first=hop == 0, lease_s=req.timeout_s, headers=req.headers,
                    timeout=_remaining(deadline, req.url), allow_redirects=False, stream=True,
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


def _post(req: WebhookRequest, session: requests.Session, body: bytes, headers: dict[str, str]
          ) -> tuple[int, str | None]:
    try:
        with guard_errors():
            check_url(req.url, req.allowlist)
            response = polite.send(session, "POST", req.url, first=True, lease_s=req.timeout_s,
                                   data=body, headers=headers, timeout=req.timeout_s, allow_redirects=False)
        with response:
            return response.status_code, response.headers.get("retry-after")
    except requests.RequestException as exc:
        raise FetchFailed(f"POST {req.url} failed: {exc.__class__.__name__}: {exc}") from None


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
