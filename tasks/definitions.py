"""The three I/O tasks: ``fetch_url``, ``deliver_webhook`` and ``io_sleep``."""

from __future__ import annotations

import time
from typing import Any

from config.celery_app import app, settings
from tasks import http_sync
from tasks.base import IOTask
from tasks.errors import FetchFailed, WebhookRejected
from tasks.specs import FetchRequest, SleepRequest, WebhookRequest, WebhookResult, now_s
from tasks.webhook_policy import (
    Verdict,
    encode_payload,
    parse_retry_after,
    retry_delay_s,
    signature_headers,
    verdict_for_status,
)

__all__ = ["deliver_webhook", "fetch_url", "io_sleep"]


def _fetch_spec(url: object, method: object = "GET", headers: object = None, timeout_s: object = None,
                max_bytes: object = None) -> FetchRequest:
    return FetchRequest.build(settings, url, method, headers, timeout_s, max_bytes)


def _webhook_spec(url: object, payload: object, secret: object = None, headers: object = None,
                  timeout_s: object = None) -> WebhookRequest:
    return WebhookRequest.build(settings, url, payload, secret, headers, timeout_s)


@app.task(base=IOTask, bind=True, name="tasks.fetch_url", validate=staticmethod(_fetch_spec))
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
    return http_sync.fetch(_fetch_spec(url, method, headers, timeout_s, max_bytes)).as_dict()


@app.task(base=IOTask, bind=True, name="tasks.deliver_webhook", max_retries=None,
          validate=staticmethod(_webhook_spec))
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

    5xx, 408, 429, timeouts and connection errors are retried with jittered exponential backoff
    (429 waits for ``Retry-After``) up to ``LOOPLINE_WEBHOOK_MAX_RETRIES`` times; other 4xx fail at once.
    """
    req = _webhook_spec(url, payload, secret, headers, timeout_s)
    started_at, t0 = now_s(), time.perf_counter()
    body = encode_payload(req.payload)
    send_headers = {"Content-Type": "application/json", **req.headers, **signature_headers(req.secret, body)}
    retry_after_s = None
    try:
        response = http_sync.post(req, body, send_headers)
    except FetchFailed as exc:
        problem: Exception = exc
    else:
        verdict = verdict_for_status(response.status_code)
        if verdict is Verdict.DELIVERED:
            return WebhookResult(
                url=req.url, status=response.status_code, attempts=self.request.retries + 1,
                elapsed_ms=round((time.perf_counter() - t0) * 1000, 3), started_at=started_at, finished_at=now_s(),
            ).as_dict()
        if verdict is Verdict.REJECTED:
            raise WebhookRejected(f"POST {req.url} was rejected with {response.status_code}; not retried")
        retry_after_s = parse_retry_after(response.headers.get("retry-after"))
        problem = FetchFailed(f"POST {req.url} answered {response.status_code}")
    delay_s = retry_delay_s(
        self.request.retries, base_s=settings.webhook_backoff_base_s, max_s=settings.webhook_backoff_max_s,
        retry_after_s=retry_after_s,
    )
    raise self.retry(exc=problem, countdown=delay_s, max_retries=settings.webhook_max_retries)


@app.task(base=IOTask, bind=True, name="tasks.io_sleep", validate=staticmethod(SleepRequest.build))
def io_sleep(self: IOTask, ms: float) -> dict[str, Any]:
    """Wait ``ms`` milliseconds: pure latency, the synthetic job for measuring a pool."""
    req = SleepRequest.build(ms)
    started_at = now_s()
    time.sleep(req.ms / 1000)
    return req.result(started_at)
