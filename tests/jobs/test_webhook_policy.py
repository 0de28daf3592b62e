"""Tests for tasks.webhook_policy: signatures, verdicts per status, Retry-After and backoff (pure functions)."""

from __future__ import annotations

import hashlib
import hmac
import random
from datetime import UTC, datetime

import pytest

from loopline.errors import InvalidJob
from loopline.jobs.webhook_policy import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    Verdict,
    encode_payload,
    parse_retry_after,
    retry_delay_s,
    sign,
    signature_headers,
    verdict_for_status,
    verify,
)

SECRET = "s3cret"
BODY = encode_payload({"event": "order.paid", "id": 42})
TIMESTAMP = "1700000000"
# A fixed "now" for HTTP-date arithmetic: Wed, 21 Oct 2015 07:28:00 GMT.
NOW_S = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC).timestamp()


def test_signature_is_hmac_sha256_over_timestamp_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{TIMESTAMP}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, TIMESTAMP, BODY) == f"sha256={expected}"


def test_sign_verify_round_trip() -> None:
    assert verify(SECRET, TIMESTAMP, BODY, sign(SECRET, TIMESTAMP, BODY))


@pytest.mark.parametrize(
    ("secret", "timestamp", "body"),
    [
        ("other", TIMESTAMP, BODY),
        (SECRET, TIMESTAMP, BODY.replace(b"42", b"43")),
        (SECRET, TIMESTAMP, BODY + b" "),
        (SECRET, str(int(TIMESTAMP) + 1), BODY),
    ],
    ids=["wrong-secret", "tampered-body", "appended-byte", "other-timestamp"],
)
def test_tampering_is_detected(secret: str, timestamp: str, body: bytes) -> None:
    assert not verify(secret, timestamp, body, sign(SECRET, TIMESTAMP, BODY))


@pytest.mark.parametrize("signature", ["", "sha256=", "sha256=" + "0" * 64, "md5=abc"])
def test_malformed_signatures_do_not_verify(signature: str) -> None:
    assert not verify(SECRET, TIMESTAMP, BODY, signature)


def test_non_ascii_signature_is_rejected_not_raised() -> None:
    assert verify(SECRET, TIMESTAMP, BODY, "sha256=\u00e9") is False


def test_timestamp_is_bound_into_the_signature() -> None:
    # Moving the body and signature under a fresh timestamp (a replay) must not verify.
    old = sign(SECRET, "1600000000", BODY)
    assert old != sign(SECRET, TIMESTAMP, BODY)
    assert not verify(SECRET, TIMESTAMP, BODY, old)


def test_signature_headers_carry_timestamp_and_matching_signature() -> None:
    headers = signature_headers(SECRET, BODY, now_s=1700000000.9)
    assert set(headers) == {TIMESTAMP_HEADER, SIGNATURE_HEADER}
    assert headers[TIMESTAMP_HEADER] == "1700000000"
    assert verify(SECRET, headers[TIMESTAMP_HEADER], BODY, headers[SIGNATURE_HEADER])


def test_signature_headers_without_a_secret_are_empty() -> None:
    assert signature_headers(None, BODY, now_s=1700000000) == {}


def test_payload_encoding_is_canonical() -> None:
    assert encode_payload({"b": 1, "a": [1, 2]}) == b'{"a":[1,2],"b":1}'
    assert encode_payload({"a": 1, "b": 2}) == encode_payload({"b": 2, "a": 1})


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.DELIVERED),
        (204, Verdict.DELIVERED),
        (299, Verdict.DELIVERED),
        (301, Verdict.REJECTED),
        (302, Verdict.REJECTED),
        (308, Verdict.REJECTED),
        (400, Verdict.REJECTED),
        (401, Verdict.REJECTED),
        (404, Verdict.REJECTED),
        (408, Verdict.RETRY),
        (429, Verdict.RETRY),
        (500, Verdict.RETRY),
        (503, Verdict.RETRY),
    ],
)
def test_verdict_for_status(status: int, verdict: Verdict) -> None:
    assert verdict_for_status(status) is verdict


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        ("Wed, 21 Oct 2015 07:29:30 GMT", 90.0),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
        ("Tue, 20 Oct 2015 07:28:00 GMT", 0.0),  # in the past: retry now, never a negative delay
    ],
)
def test_parse_retry_after(value: str, seconds: float) -> None:
    assert parse_retry_after(value, now_s=NOW_S) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [None, "", "   ", "soon", "-5", "1.5", "Wed, 99 Foo 2015 07:29:30 GMT"])
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, now_s=NOW_S) is None


def test_parse_retry_after_superscript_digit_is_none() -> None:
    assert parse_retry_after("\u00b2", now_s=NOW_S) is None


@pytest.mark.parametrize("retries", range(8))
def test_backoff_jitter_stays_within_half_to_full_ceiling(retries: int) -> None:
    rng = random.Random(retries)
    ceiling = 0.5 * 2**retries
    delays = [retry_delay_s(retries, base_s=0.5, max_s=1000.0, rng=rng) for _ in range(200)]
    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling / 4, "the delay is not jittered"


def test_backoff_grows_exponentially() -> None:
    rng = random.Random(7)
    delays = [retry_delay_s(r, base_s=1.0, max_s=10_000.0, rng=rng) for r in range(10)]
    for retries, delay in enumerate(delays):
        assert delay >= 2**retries / 2
    # Each ceiling is twice the last, so the next delay's floor is the last delay's ceiling.
    assert delays == sorted(delays)
    assert delays[9] >= 64 * delays[2]


def test_backoff_is_capped_at_max() -> None:
    rng = random.Random(3)
    delays = [retry_delay_s(r, base_s=1.0, max_s=30.0, rng=rng) for r in range(5, 60)]
    assert all(15.0 <= d <= 30.0 for d in delays)


def test_backoff_is_reproducible_with_a_seeded_rng() -> None:
    first = [retry_delay_s(r, base_s=1.0, max_s=300.0, rng=random.Random(11)) for r in range(6)]
    second = [retry_delay_s(r, base_s=1.0, max_s=300.0, rng=random.Random(11)) for r in range(6)]
    assert first == second


def test_backoff_cap_holds_for_any_retry_count() -> None:
    assert 150.0 <= retry_delay_s(1100, base_s=1.0, max_s=300.0, rng=random.Random(0)) <= 300.0


@pytest.mark.parametrize("retries", [0, 3, 10])
def test_retry_after_wins_over_backoff(retries: int) -> None:
    assert retry_delay_s(retries, base_s=1.0, max_s=300.0, retry_after_s=7.0, rng=random.Random(0)) == 7.0


def test_retry_after_is_capped_at_max() -> None:
    assert retry_delay_s(0, base_s=1.0, max_s=300.0, retry_after_s=86_400.0, rng=random.Random(0)) == 300.0


def test_negative_retry_after_means_now() -> None:
    assert retry_delay_s(2, base_s=1.0, max_s=300.0, retry_after_s=-5.0, rng=random.Random(0)) == 0.0


def test_parsed_http_date_feeds_the_delay() -> None:
    after = parse_retry_after("Wed, 21 Oct 2015 07:28:45 GMT", now_s=NOW_S)
    assert retry_delay_s(0, base_s=1.0, max_s=300.0, retry_after_s=after, rng=random.Random(0)) == pytest.approx(45.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_payload_with_nan_or_infinity_is_refused_since_its_body_would_not_be_json(value: float) -> None:
    with pytest.raises(InvalidJob, match="JSON"):
        encode_payload({"amount": [1, value]})


def test_a_payload_nested_too_deeply_is_an_invalid_job() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidJob, match="nested too deeply"):
        encode_payload(deep)
