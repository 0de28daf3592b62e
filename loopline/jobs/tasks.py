"""The three I/O tasks: ``fetch_url``, ``deliver_webhook`` and ``io_sleep``.

Each has a sync body (requests, time.sleep) for prefork, threads, gevent and solo, and an async body
(aiohttp, asyncio.sleep) that the asyncio pool awaits; both go through the same spec, limits and
result shape from ``tasks.specs``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery import shared_task

from loopline.app.task import IOTask
from loopline.errors import FetchFailed, GuardRefused, WebhookRejected
from loopline.jobs import http_async, http_sync
from loopline.jobs.specs import FetchRequest, SleepRequest, WebhookRequest, WebhookResult, now_s
from loopline.jobs.webhook_policy import (
    Verdict,
    encode_payload,
    parse_retry_after,
    retry_delay_s,
    signature_headers,
    verdict_for_status,
)
from loopline.politeness import deferring, retry_when_paused
from loopline.settings import settings_for

__all__ = ["deliver_webhook", "fetch_url", "io_sleep"]


def _fetch_spec(task: IOTask, url: object, method: object = "GET", headers: object = None,
                timeout_s: object = None, max_bytes: object = None) -> FetchRequest:
    return FetchRequest.build(settings_for(task.app), url, method, headers, timeout_s, max_bytes)


def _webhook_spec(task: IOTask, url: object, payload: object, secret: object = None, headers: object = None,
                  timeout_s: object = None) -> WebhookRequest:
    return WebhookRequest.build(settings_for(task.app), url, payload, secret, headers, timeout_s)


def _sleep_spec(task: IOTask, ms: object) -> SleepRequest:
    return SleepRequest.build(ms)


# -- fetch_url --------------------------------------------------------------------------------------------

async def _fetch_url_async(self: IOTask, url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                           timeout_s: float | None = None, max_bytes: int | None = None) -> dict[str, Any]:
    with deferring(self):
        result = await http_async.fetch(_fetch_spec(self, url, method, headers, timeout_s, max_bytes))
    return retry_when_paused(self, result).as_dict()


@shared_task(base=IOTask, bind=True, name="tasks.fetch_url", validate=staticmethod(_fetch_spec),
          async_body=_fetch_url_async)
def fetch_url(
    self: IOTask,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
    max_bytes: int | None = None,
) -> dict[str, Any]:
    """Fetch ``url`` and return its status, size, content type and SHA-256 (never the body)."""
    with deferring(self):
        result = http_sync.fetch(_fetch_spec(self, url, method, headers, timeout_s, max_bytes))
    return retry_when_paused(self, result).as_dict()


# -- deliver_webhook --------------------------------------------------------------------------------------

class _Attempt:
    """One webhook delivery attempt: the request, its signed body and headers, and when it started."""

    def __init__(self, req: WebhookRequest) -> None:
        self.req = req
        self.started_at, self.t0 = now_s(), time.perf_counter()
        self.body = encode_payload(req.payload)
        self.headers = {"Content-Type": "application/json", **req.headers,
                        **signature_headers(req.secret, self.body)}

    def settle(self, task: IOTask, outcome: tuple[int, str | None] | FetchFailed) -> dict[str, Any]:
        """The result of a delivered attempt; otherwise raise: rejected, or retry with backoff."""
        retry_after_s = None
        if isinstance(outcome, GuardRefused):  # the address is refused; it will be on every try
            raise WebhookRejected(f"{outcome}; not retried")
        if isinstance(outcome, FetchFailed):
            problem: Exception = outcome
        else:
            status, retry_after = outcome
            verdict = verdict_for_status(status)
            if verdict is Verdict.DELIVERED:
                return WebhookResult(
                    url=self.req.url, status=status, attempts=task.request.retries + 1,
                    elapsed_ms=round((time.perf_counter() - self.t0) * 1000, 3), started_at=self.started_at,
                    finished_at=now_s(),
                ).as_dict()
            if verdict is Verdict.REJECTED and 300 <= status < 400:
                raise WebhookRejected(f"POST {self.req.url} answered {status}, a redirect; webhooks are not "
                                      "redirected, so it was not delivered; not retried")
            if verdict is Verdict.REJECTED:
                raise WebhookRejected(f"POST {self.req.url} was rejected with {status}; not retried")
            retry_after_s = parse_retry_after(retry_after)
            problem = FetchFailed(f"POST {self.req.url} answered {status}")
        settings = settings_for(task.app)
        delay_s = retry_delay_s(task.request.retries, base_s=settings.webhook_backoff_base_s,
                                max_s=settings.webhook_backoff_max_s, retry_after_s=retry_after_s)
        raise task.retry(exc=problem, countdown=delay_s, max_retries=settings.webhook_max_retries)


async def _deliver_webhook_async(self: IOTask, url: str, payload: Any, *, secret: str | None = None,
                                 headers: dict[str, str] | None = None,
                                 timeout_s: float | None = None) -> dict[str, Any]:
    attempt = _Attempt(_webhook_spec(self, url, payload, secret, headers, timeout_s))
    try:
        with deferring(self):
            outcome: tuple[int, str | None] | FetchFailed = await http_async.post(attempt.req, attempt.body,
                                                                                  attempt.headers)
    except FetchFailed as exc:
        outcome = exc
    return attempt.settle(self, outcome)


@shared_task(base=IOTask, bind=True, name="tasks.deliver_webhook", max_retries=None,
          validate=staticmethod(_webhook_spec), async_body=_deliver_webhook_async)
def deliver_webhook(
    self: IOTask,
    url: str,
    payload: Any,
    *,
    secret: str | None = None,
    headers: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """POST ``payload`` as JSON, signed with HMAC-SHA256 when ``secret`` is given.

    5xx, 408, 429, timeouts, connection errors and hosts that do not resolve are retried with jittered
    exponential backoff (a ``Retry-After`` answer waits that long, up to ``LOOPLINE_WEBHOOK_BACKOFF_MAX_S``)
    up to ``LOOPLINE_WEBHOOK_MAX_RETRIES`` times; other 4xx, redirects and addresses the URL guard refuses
    fail at once.
    """
    attempt = _Attempt(_webhook_spec(self, url, payload, secret, headers, timeout_s))
    try:
        with deferring(self):
            outcome: tuple[int, str | None] | FetchFailed = http_sync.post(attempt.req, attempt.body, attempt.headers)
    except FetchFailed as exc:
        outcome = exc
    return attempt.settle(self, outcome)


# -- io_sleep ---------------------------------------------------------------------------------------------

async def _io_sleep_async(self: IOTask, ms: float) -> dict[str, Any]:
    req = SleepRequest.build(ms)
    started_at = now_s()
    await asyncio.sleep(req.ms / 1000)
    return req.result(started_at)


@shared_task(base=IOTask, bind=True, name="tasks.io_sleep", validate=staticmethod(_sleep_spec),
          async_body=_io_sleep_async)
def io_sleep(self: IOTask, ms: float) -> dict[str, Any]:
    """Wait ``ms`` milliseconds: pure latency, the synthetic job for measuring a pool."""
    req = SleepRequest.build(ms)
    started_at = now_s()
    time.sleep(req.ms / 1000)
    return req.result(started_at)
