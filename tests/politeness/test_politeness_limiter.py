"""The limiter's Lua scripts against the session's Redis, driven by explicit timestamps (no sleeps)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from loopline.politeness.keys import PAUSED_KEY, host_key, leases_key, waiting_key
from loopline.politeness.limiter import BACKOFF_BASE_MS, STALE_MS, Limiter
from loopline.politeness.rules import ARRIVAL_ALLOWANCE_MS, Rule

T0 = 1_700_000_000_000.0


@pytest.fixture
def limiter(redis_client: redis.Redis) -> Limiter:
    return Limiter(redis_client)


@pytest.fixture
def host(redis_client: redis.Redis) -> Iterator[str]:
    name = f"h{uuid.uuid4().hex[:8]}.test"
    yield name
    redis_client.delete(host_key(name), leases_key(name), waiting_key(name))
    redis_client.hdel(PAUSED_KEY, name)


def test_gcra_allows_the_burst_then_one_per_interval(limiter: Limiter, host: str) -> None:
    rule = Rule(rate="10/s", burst=2)
    step = rule.interval_ms
    assert step == (1000 + ARRIVAL_ALLOWANCE_MS) / 10
    granted = [limiter.acquire(host, rule, job_id=f"j{n}", now_ms=T0).go for n in range(4)]
    assert granted == [True, True, True, False]  # 1 + burst at once
    assert not limiter.acquire(host, rule, job_id="j3", now_ms=T0 + step - 1).go
    assert limiter.acquire(host, rule, job_id="j3", now_ms=T0 + step).go
    assert not limiter.acquire(host, rule, job_id="j4", now_ms=T0 + 1.5 * step).go
    assert limiter.acquire(host, rule, job_id="j4", now_ms=T0 + 2 * step).go


def test_no_one_second_window_exceeds_rate_plus_burst(limiter: Limiter, host: str) -> None:
    rule = Rule(rate="20/s", burst=3)
    starts, job = [], 0
    for t in (T0 + ms for ms in range(0, 5000, 5)):  # one job at a time asks every 5 ms until it may start
        if limiter.acquire(host, rule, job_id=f"j{job}", now_ms=t).go:
            starts.append(t)
            job += 1
    # even with each start seen up to the allowance later (or earlier) than it was granted
    peak = max(sum(1 for s in starts if w <= s < w + 1000 + ARRIVAL_ALLOWANCE_MS) for w in starts)
    assert peak <= 20 + 3
    achieved = (len(starts) - 1 - 3) / ((starts[-1] - starts[0]) / 1000)
    assert achieved >= 0.85 * 20


def test_a_waiting_request_is_told_when_it_is_due_and_newcomers_queue_behind(limiter: Limiter, host: str) -> None:
    rule = Rule(rate="9/s")  # 9/s: (1000 + 100 ms allowance) / 9 = 122.2 ms apart
    step = rule.interval_ms
    assert limiter.acquire(host, rule, job_id="a", now_ms=T0).go
    b = limiter.acquire(host, rule, job_id="b", now_ms=T0)
    c = limiter.acquire(host, rule, job_id="c", now_ms=T0)
    assert (b.go, b.wait_ms, b.reason) == (False, 123, "rate")
    assert (c.go, c.wait_ms) == (False, 245)  # one interval behind b, not at the same moment
    assert limiter.acquire(host, rule, job_id="b", now_ms=T0 + step + 1).go
    early = limiter.acquire(host, rule, job_id="c", now_ms=T0 + 1.5 * step)
    assert (early.go, early.wait_ms) == (False, 63)  # back early: keeps its place
    # a newcomer while c is queued goes behind it
    d = limiter.acquire(host, rule, job_id="d", now_ms=T0 + 1.5 * step)
    assert (d.go, d.wait_ms) == (False, 184)
    assert limiter.acquire(host, rule, job_id="c", now_ms=T0 + 2 * step + 1).go
    # and once the queue has drained, a newcomer goes as soon as the rate allows
    assert limiter.acquire(host, rule, job_id="d", now_ms=T0 + 3 * step + 2).go
    assert limiter.acquire(host, rule, job_id="e", now_ms=T0 + 4 * step + 3).go


def test_waiting_jobs_are_counted_and_forgotten_when_they_never_come_back(
        limiter: Limiter, host: str, redis_client: redis.Redis) -> None:
    rule = Rule(rate="1/s")
    limiter.acquire(host, rule, job_id="a", now_ms=T0)
    for job in ("b", "c", "d"):
        limiter.acquire(host, rule, job_id=job, now_ms=T0)
    assert redis_client.zcard(waiting_key(host)) == 3
    limiter.acquire(host, rule, job_id="late", now_ms=T0 + 4 * rule.interval_ms + STALE_MS)
    assert redis_client.zrange(waiting_key(host), 0, -1) == []


def test_concurrency_leases_cap_in_flight_and_expire(limiter: Limiter, host: str) -> None:
    rule = Rule(concurrency=2)
    assert limiter.acquire(host, rule, lease_id="l1", lease_ttl_ms=5000, now_ms=T0).go
    assert limiter.acquire(host, rule, lease_id="l2", lease_ttl_ms=5000, now_ms=T0).go
    third = limiter.acquire(host, rule, lease_id="l3", lease_ttl_ms=5000, job_id="j3", now_ms=T0 + 1)
    assert (third.go, third.reason) == (False, "concurrency")
    limiter.release(host, lease_id="l1", elapsed_ms=40, now_ms=T0 + 2)
    assert limiter.acquire(host, rule, lease_id="l3", lease_ttl_ms=5000, job_id="j3", now_ms=T0 + 3).go
    assert not limiter.acquire(host, rule, lease_id="l4", lease_ttl_ms=5000, job_id="j4", now_ms=T0 + 4999).go
    # l2 and l3 were never given back (their worker died): they expire
    assert limiter.acquire(host, rule, lease_id="l4", lease_ttl_ms=5000, job_id="j4", now_ms=T0 + 5004).go


def test_retry_after_pauses_the_host_for_every_rule_and_none(limiter: Limiter, host: str) -> None:
    until = limiter.release(host, status=429, retry_after_ms=2000, now_ms=T0)
    assert until == T0 + 2000
    rules = {"none": None, "rate": Rule(rate="100/s"), "concurrency": Rule(concurrency=5)}
    for job, rule in rules.items():
        held = limiter.acquire(host, rule, job_id=job, now_ms=T0 + 1000)
        assert (held.go, held.reason) == (False, "paused")
        assert held.wait_ms >= 1000
    for job, rule in rules.items():  # back when the pause is over: each goes
        assert limiter.acquire(host, rule, job_id=job, now_ms=T0 + 2100).go


def test_a_shorter_retry_after_never_shortens_a_pause(limiter: Limiter, host: str) -> None:
    limiter.release(host, status=503, retry_after_ms=5000, now_ms=T0)
    limiter.release(host, status=429, retry_after_ms=1000, now_ms=T0 + 10)
    assert not limiter.acquire(host, None, now_ms=T0 + 3000).go


def test_repeated_429s_without_retry_after_back_off_exponentially(limiter: Limiter, host: str) -> None:
    pauses = []
    now = T0
    for _ in range(4):
        until = limiter.release(host, status=429, now_ms=now)
        pauses.append(until - now)
        now = until
    assert pauses == [BACKOFF_BASE_MS, 2 * BACKOFF_BASE_MS, 4 * BACKOFF_BASE_MS, 8 * BACKOFF_BASE_MS]
    assert limiter.release(host, status=503, now_ms=now) == 0  # a 503 without Retry-After pauses nothing


def test_production_calls_use_redis_time(limiter: Limiter, host: str, redis_client: redis.Redis) -> None:
    seconds, micros = redis_client.time()
    assert limiter.acquire(host, Rule(rate="1/h")).go
    second = limiter.acquire(host, Rule(rate="1/h"))
    assert (second.go, second.reason) == (False, "rate")
    assert 3_590_000 <= second.wait_ms <= 3_600_100
    tat = float(redis_client.hget(host_key(host), "tat") or 0)
    assert abs(tat - (seconds * 1000 + micros / 1000 + 3_600_100)) < 5_000
