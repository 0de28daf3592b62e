"""How webhooks are signed and when a failed delivery is retried (pure functions, no I/O)."""

from __future__ import annotations

import email.utils
import hashlib
import hmac
import json
import random
import time
from enum import Enum
from typing import Any

from loopline.errors import InvalidJob

__all__ = [
    "SIGNATURE_HEADER",
    "TIMESTAMP_HEADER",
    "Verdict",
    "encode_payload",
    "parse_retry_after",
    "retry_delay_s",
    "sign",
    "signature_headers",
    "verdict_for_status",
    "verify",
]

SIGNATURE_HEADER = "X-Loopline-Signature"
TIMESTAMP_HEADER = "X-Loopline-Timestamp"


class Verdict(Enum):
    """What a delivery attempt's outcome means for the job."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"


def encode_payload(payload: Any) -> bytes:
    """The exact bytes that are POSTed and signed: compact JSON with sorted keys.

    Raises InvalidJob for a payload that has no such bytes: NaN or Infinity (Python's ``json`` would write
    them, but they are not JSON), a value JSON cannot hold, or one nested too deeply to encode.
    """
    try:
        return json.dumps(payload, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    except RecursionError:
        raise InvalidJob("payload is nested too deeply to encode as JSON") from None
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"payload cannot be sent as JSON: {exc}") from None


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over ``"<timestamp>.<body>"``; binding the timestamp stops replays of old deliveries."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver runs: constant-time comparison of the expected and the given signature."""
    try:
        return hmac.compare_digest(sign(secret, timestamp, body).encode(), signature.encode())
    except (UnicodeEncodeError, AttributeError):
        return False


def signature_headers(secret: str | None, body: bytes, now_s: float | None = None) -> dict[str, str]:
    """Headers for one attempt; empty when the job has no secret."""
    if secret is None:
        return {}
    timestamp = str(int(time.time() if now_s is None else now_s))
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verdict_for_status(status: int) -> Verdict:
    """2xx delivered; 5xx and 429 (and 408) are worth another try; a redirect (webhooks are not redirected)
    and any other 4xx will fail again."""
    if status < 300:
        return Verdict.DELIVERED
    if status >= 500 or status in (408, 429):
        return Verdict.RETRY
    return Verdict.REJECTED


def parse_retry_after(value: str | None, now_s: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now_s is None else now_s
    return max(0.0, when.timestamp() - now)


def retry_delay_s(
    retries: int,
    *,
    base_s: float,
    max_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Delay before attempt ``retries + 1``: full-jitter exponential backoff, or the server's Retry-After.

    A Retry-After from the server wins over backoff (it knows when it can take the request), but is
    capped at ``max_s`` so a hostile or broken receiver cannot park a job for days.
    """
    if retry_after_s is not None:
        return min(max(retry_after_s, 0.0), max_s)
    # The exponent is clamped: 2.0**1100 overflows a float, and the cap is reached long before.
    ceiling = min(max_s, base_s * (2.0 ** min(retries, 64)))
    return (rng or random).uniform(ceiling / 2, ceiling)
