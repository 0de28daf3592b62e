"""loopline.bench.runner against real parts: the session's Redis, a real target with latency, real worker processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from loopline.bench.jobs import PoolResult, Workload
from loopline.bench.procs import start_target
from loopline.bench.runner import JobsMissing, PoolFailed, run_pool

LATENCY_MS = 50.0


@pytest.fixture(scope="module")
def slow_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    target, url = start_target(LATENCY_MS, log_path=tmp_path_factory.mktemp("target") / "target.log")
    yield url
    target.stop(5)


def bench_keys(client: redis.Redis, pool: str) -> list[bytes]:
    """The pool's bench queues and kombu's binding tables for them."""
    return list(client.scan_iter(f"*bench.{pool}.*"))


def test_run_pool_times_every_job_and_leaves_nothing_behind(slow_target: str, tmp_path: Path,
                                                             redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    results_before = len(list(client.scan_iter("celery-task-meta-*")))
    seen: list[int] = []
    workload = Workload("fetch_url", 24, LATENCY_MS, slow_target)
    result = run_pool("threads", 4, workload, log_dir=tmp_path, on_progress=lambda r: seen.append(len(r.jobs)))
    assert (result.jobs_ok, result.jobs_failed, result.total) == (24, 0, 24)
    assert seen == sorted(seen) and seen[-1] == 24
    for job in result.jobs:
        assert job.started is not None and job.enqueued < job.started < job.finished
        # The target waits LATENCY_MS before it answers (its event loop's timers may fire a millisecond early).
        assert (job.finished - job.started) * 1000 >= LATENCY_MS - 2
    assert result.throughput_per_s <= result.little_limit_per_s(LATENCY_MS) * 1.05
    assert result.cpu_s > 0 and result.peak_rss_mb > 10
    assert bench_keys(client, "threads") == []  # the queue is gone, and so are the 24 results
    assert len(list(client.scan_iter("celery-task-meta-*"))) == results_before


def test_jobs_that_vanish_from_the_queue_fail_the_run_and_are_counted(slow_target: str, tmp_path: Path,
                                                                      redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)

    def lose_the_queue(result: PoolResult) -> None:
        for key in bench_keys(client, "gevent"):
            client.delete(key)

    workload = Workload("fetch_url", 30, LATENCY_MS, slow_target)
    with pytest.raises(JobsMissing) as caught:
        run_pool("gevent", 1, workload, log_dir=tmp_path, on_progress=lose_the_queue, stall_timeout_s=2.0)
    message = str(caught.value)
    missing = int(message.split(": ", 1)[1].split(" of ", 1)[0])
    assert 0 < missing < 30
    assert f"{missing} of 30 jobs never finished (no job finished for 2 s)" in message


def test_a_worker_that_cannot_start_fails_with_its_reason(slow_target: str, tmp_path: Path) -> None:
    workload = Workload("fetch_url", 5, LATENCY_MS, slow_target)
    with pytest.raises(PoolFailed, match=r"the asyncio worker could not start: it exited with code \d+; "
                                         r"last log line: .*LOOPLINE_TASK_TIME_LIMIT_S"):
        run_pool("asyncio", 4, workload, log_dir=tmp_path, env={"LOOPLINE_TASK_TIME_LIMIT_S": "soon"})


def test_several_worker_processes_share_the_queue_and_the_limit_counts_them_all(slow_target: str,
                                                                                 tmp_path: Path) -> None:
    result = run_pool("asyncio", 2, Workload("fetch_url", 20, LATENCY_MS, slow_target), log_dir=tmp_path,
                      processes=2, env={"LOOPLINE_TASK_LOG": "0"})
    assert (result.jobs_ok, result.processes, result.slots) == (20, 2, 4)
    assert result.throughput_per_s <= result.little_limit_per_s(LATENCY_MS) * 1.05
    log = (tmp_path / "worker-asyncio-1.log").read_text()
    assert "supervisor" in log and log.count(" ready.") == 2
    # LOOPLINE_TASK_LOG=0, as `loopline bench` runs its workers: no line per job, the worker's own lines stay.
    assert "received" not in log and "succeeded in" not in log


def test_a_worker_logs_a_line_per_job_by_default(slow_target: str, tmp_path: Path) -> None:
    run_pool("asyncio", 4, Workload("fetch_url", 4, LATENCY_MS, slow_target), log_dir=tmp_path)
    log = (tmp_path / "worker-asyncio-1.log").read_text()
    assert log.count("] received") == 4 and log.count("] succeeded in") == 4
