"""loopline.bench.jobs: percentiles, the completed-jobs timeline and the numbers a PoolResult derives from its jobs."""

from __future__ import annotations

import math

import pytest

from loopline.bench.jobs import JobTimes, PoolResult, Workload, percentile, timeline


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) == 0.0


def test_timeline_counts_completions_up_to_the_last_one() -> None:
    points = timeline([0.5, 1.0, 1.0, 2.0], points=4)
    assert points == [{"t_s": 0.0, "completed": 0}, {"t_s": 0.5, "completed": 1}, {"t_s": 1.0, "completed": 3},
                      {"t_s": 1.5, "completed": 3}, {"t_s": 2.0, "completed": 4}]
    assert timeline([]) == []


def slotted(pool: str, concurrency: int, jobs: int, latency_s: float, t0: float = 1000.0) -> PoolResult:
    """Jobs run ``concurrency`` at a time, each taking exactly ``latency_s``: a pool at its Little's-law limit."""
    result = PoolResult(pool=pool, concurrency=concurrency, total=jobs)
    for i in range(jobs):
        start = t0 + (i // concurrency) * latency_s
        result.add(JobTimes(t0 - 1, start, start + latency_s))
    return result


def test_a_pool_at_full_concurrency_reaches_but_never_passes_the_little_limit() -> None:
    result = slotted("asyncio", 10, 100, 0.1)
    assert result.wall_s == pytest.approx(1.0)
    assert result.throughput_per_s == pytest.approx(100.0)
    assert result.little_limit_per_s(100.0) == pytest.approx(100.0)
    assert result.latency_summary() == pytest.approx({"p50": 100.0, "p95": 100.0, "p99": 100.0, "max": 100.0})


def test_failures_count_as_finished_work_and_are_broken_down_by_kind() -> None:
    result = PoolResult(pool="threads", concurrency=2, total=4)
    result.add(JobTimes(0.0, 1.0, 1.2))
    result.add(JobTimes(0.0, 1.0, 1.1, "HTTP 500"))
    result.add(JobTimes(0.0, None, 1.5, "WebhookRejected", retries=2))
    result.add(JobTimes(0.0, 1.2, 1.4, "HTTP 500"))
    result.cpu_s = 0.02
    assert (result.jobs_ok, result.jobs_failed) == (1, 3)
    assert result.errors == {"HTTP 500": 2, "WebhookRejected": 1}
    assert result.retries == 2
    assert result.wall_s == pytest.approx(0.5)  # first start 1.0 → last finish 1.5, the failure included
    assert len(result.latencies_ms) == 3  # a failed task reports no start time
    assert result.cpu_ms_per_job == pytest.approx(5.0)


def test_the_limit_counts_every_process_and_is_unbounded_without_latency() -> None:
    result = PoolResult(pool="asyncio", concurrency=100, processes=2)
    assert result.little_limit_per_s(100.0) == pytest.approx(2000.0)
    assert math.isinf(result.little_limit_per_s(0.0))


def test_workload_calls_match_each_task() -> None:
    w = Workload("fetch_url", 3, 50.0, "http://127.0.0.1:1")
    assert w.call(0) == (("http://127.0.0.1:1/job",), {})
    assert Workload("io_sleep", 3, 50.0, "").call(1) == ((50.0,), {})
    hook = Workload("deliver_webhook", 3, 50.0, "http://127.0.0.1:1")
    assert hook.call(2) == (("http://127.0.0.1:1/job", {"n": 2}), {})
    assert w.as_dict() == {"task": "fetch_url", "jobs": 3, "latency_ms": 50.0, "jitter_ms": 0.0, "error_rate": 0.0,
                           "payload_bytes": 256}
