"""Times one pool on one workload: fill the queue, start the worker, wait for every job, stop the worker."""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.procs import Child, start_worker

__all__ = ["JobsMissing", "PoolResult", "Workload", "run_pool"]

POLL_INTERVAL_S = 0.2
READY_POLL_S = 0.02
MGET_CHUNK = 500


class JobsMissing(RuntimeError):
    """The worker went quiet (or died) with jobs still unfinished."""


@dataclass(frozen=True)
class Workload:
    """What every pool is asked to do."""

    task: str
    jobs: int
    latency_ms: float
    target_url: str

    def call(self, index: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.task == "io_sleep":
            return (self.latency_ms,), {}
        if self.task == "deliver_webhook":
            return (f"{self.target_url}/job", {"n": index}), {}
        return (f"{self.target_url}/job",), {}


@dataclass
class PoolResult:
    """One pool's run, as measured."""

    pool: str
    concurrency: int
    jobs_ok: int = 0
    jobs_failed: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    finished_at: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def throughput_per_s(self) -> float:
        return (self.jobs_ok + self.jobs_failed) / self.wall_s if self.wall_s else 0.0

    def percentile_ms(self, q: float) -> float:
        if not self.latencies_ms:
            return 0.0
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]

    @property
    def cpu_ms_per_job(self) -> float:
        done = self.jobs_ok + self.jobs_failed
        return self.cpu_s * 1000 / done if done else 0.0


class _Sampler(threading.Thread):
    """Samples CPU seconds and RSS of a worker's process tree until stopped."""

    def __init__(self, child: Child, interval_s: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.child, self.interval_s = child, interval_s
        self.cpu_by_pid: dict[int, float] = {}
        self.peak_rss = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        rss = 0
        for proc in self.child.tree():
            try:
                with proc.oneshot():
                    times = proc.cpu_times()
                    self.cpu_by_pid[proc.pid] = times.user + times.system
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss = max(self.peak_rss, rss)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _fill(app: Any, task: Any, workload: Workload, queue: str) -> list[str]:
    ids = []
    with app.producer_or_acquire() as producer:
        for i in range(workload.jobs):
            args, kwargs = workload.call(i)
            ids.append(task.apply_async(args, kwargs, queue=queue, producer=producer).id)
    return ids


def run_pool(
    pool: str,
    concurrency: int,
    workload: Workload,
    *,
    log_dir: Path,
    on_progress: Callable[[int], None] = lambda done: None,
    stall_timeout_s: float = 60.0,
) -> PoolResult:
    """Run ``workload`` through a fresh ``pool`` worker on a queue of its own and measure it."""
    import tasks
    from config.celery_app import app

    task = getattr(tasks, workload.task)
    queue = f"bench.{pool}.{uuid.uuid4().hex[:8]}"
    pending = set(_fill(app, task, workload, queue))
    result = PoolResult(pool=pool, concurrency=concurrency)
    started: list[float] = []
    worker = start_worker(pool, concurrency, queues=[queue], log_path=log_dir / f"worker-{pool}.log")
    sampler = _Sampler(worker)
    sampler.start()
    backend = app.backend
    last_change = time.monotonic()
    baseline_cpu_s: float | None = None
    try:
        while pending:
            if baseline_cpu_s is None and " ready." in worker.log_text():
                # CPU spent booting the worker is not the pool's cost per job.
                sampler.sample()
                baseline_cpu_s = sum(sampler.cpu_by_pid.values())
            time.sleep(POLL_INTERVAL_S if baseline_cpu_s is not None else READY_POLL_S)
            done_now = _collect(backend, pending, result, started)
            if done_now:
                last_change = time.monotonic()
                on_progress(done_now)
            elif not worker.alive() or time.monotonic() - last_change > stall_timeout_s:
                why = "the worker exited" if not worker.alive() else f"no job finished for {stall_timeout_s:g} s"
                raise JobsMissing(f"{pool}: {len(pending)} of {workload.jobs} jobs never finished ({why}); "
                                  f"see {worker.log_path}")
        sampler.sample()
    finally:
        sampler.stop()
        worker.stop()
    result.cpu_s = sum(sampler.cpu_by_pid.values()) - (baseline_cpu_s or 0.0)
    result.peak_rss_mb = sampler.peak_rss / 2**20
    if started and result.finished_at:
        result.wall_s = max(result.finished_at) - min(started)
    return result


def _collect(backend: Any, pending: set[str], result: PoolResult, started: list[float]) -> int:
    """Read finished results of ``pending`` jobs from the Redis result backend in a few MGETs."""
    ids = list(pending)
    done = 0
    for lo in range(0, len(ids), MGET_CHUNK):
        chunk = ids[lo:lo + MGET_CHUNK]
        raw = backend.client.mget([backend.get_key_for_task(i) for i in chunk])
        for task_id, payload in zip(chunk, raw, strict=True):
            if payload is None:
                continue
            meta = backend.decode_result(payload)
            if meta["status"] not in ("SUCCESS", "FAILURE"):
                continue
            pending.discard(task_id)
            done += 1
            value = meta["result"]
            if meta["status"] == "SUCCESS":
                result.jobs_ok += 1
                started.append(value["started_at"])
                result.finished_at.append(value["finished_at"])
                result.latencies_ms.append((value["finished_at"] - value["started_at"]) * 1000)
            else:
                result.jobs_failed += 1
                kind = value.get("exc_type", "error") if isinstance(value, dict) else "error"
                result.errors[kind] = result.errors.get(kind, 0) + 1
    return done
