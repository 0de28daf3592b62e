"""Times one pool on one workload: fill the queue, start the worker, wait for every job, stop the worker.

How jobs count: a job is *ok* when its task succeeded and, for ``fetch_url``, the target answered below
400; it is *failed* when the task failed (``FAILURE``: a rejected webhook, retries exhausted, a time
limit) or ``fetch_url`` got an HTTP error status back as data. Both are finished work and count towards
throughput; ``errors`` says what kind each failure was. A job with no final result is *missing*.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from kombu import Exchange, Queue

from loopline.bench.baseline import LOOPLINE, System
from loopline.bench.jobs import JobTimes, PoolResult, Workload
from loopline.bench.procs import Child

__all__ = ["JobsMissing", "PoolFailed", "PoolResult", "RunFailed", "Workload", "run_pool"]

POLL_INTERVAL_S = 0.2
READY_POLL_S = 0.02
MGET_CHUNK = 500
READY_TIMEOUT_S = 90.0
STALL_TIMEOUT_S = 60.0
SAMPLE_INTERVAL_S = 0.25


class RunFailed(RuntimeError):
    """A pool's run did not finish; ``result`` holds what it measured until then (set by :func:`run_pool`)."""

    result: PoolResult | None = None


class JobsMissing(RunFailed):
    """The worker went quiet (or died) with jobs still unfinished; the message says how many."""


class PoolFailed(RunFailed):
    """A pool's worker did not come up; the message holds its exit code and last log line."""


class _Sampler(threading.Thread):
    """Samples CPU seconds (user+sys) and RSS of a worker's whole process tree until stopped."""

    def __init__(self, child: Child, interval_s: float = SAMPLE_INTERVAL_S) -> None:
        super().__init__(daemon=True)
        self.child, self.interval_s = child, interval_s
        self.cpu_by_pid: dict[int, float] = {}
        self.peak_rss = 0
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def sample(self) -> float:
        """Take one sample; returns the tree's CPU seconds so far (processes that exited keep their last value)."""
        rss = 0
        with self._lock:
            for proc in self.child.tree():
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        self.cpu_by_pid[proc.pid] = times.user + times.system
                        rss += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            return sum(self.cpu_by_pid.values())

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.sample()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _fill(app: Any, task: Any, workload: Workload, queue: str, enqueued: dict[str, float] | None = None) -> list[str]:
    """Send every job of ``workload`` to ``queue``; ``enqueued`` receives each job's send time."""
    ids = []
    with app.producer_or_acquire() as producer:
        for i in range(workload.jobs):
            args, kwargs = workload.call(i)
            task_id = task.apply_async(args, kwargs, queue=queue, producer=producer).id
            ids.append(task_id)
            if enqueued is not None:
                enqueued[task_id] = time.time()
    return ids


def _ready_count(worker: Child) -> int:
    return worker.log_text().count(" ready.")


def _why_not_started(worker: Child, pool: str) -> PoolFailed:
    lines = [line.strip() for line in worker.log_text().splitlines() if line.strip()]
    last = lines[-1] if lines else "(no output)"
    state = f"exited with code {worker.popen.returncode}" if not worker.alive() else "was not ready in time"
    return PoolFailed(f"the {pool} worker could not start: it {state}; last log line: {last}")


def run_pool(
    pool: str,
    concurrency: int,
    workload: Workload,
    *,
    log_dir: Path,
    processes: int = 1,
    repeat: int = 1,
    on_progress: Callable[[PoolResult], None] = lambda result: None,
    stall_timeout_s: float = STALL_TIMEOUT_S,
    ready_timeout_s: float = READY_TIMEOUT_S,
    env: dict[str, str] | None = None,
    system: System = LOOPLINE,
) -> PoolResult:
    """Run ``workload`` through a fresh ``pool`` worker of ``system`` on a queue of its own and measure it.

    The queue is full before the worker starts; CPU counts from the moment every worker process logged
    ``ready.``, so booting Celery is not charged to the jobs. A run that fails raises :class:`RunFailed`
    carrying what it measured.
    """
    app = system.app()
    task = app.tasks[system.task_name(pool, workload.task)]
    queue = f"bench.{pool}.{uuid.uuid4().hex[:8]}" if system is LOOPLINE else \
        f"bench.{system.name}.{pool}.{uuid.uuid4().hex[:8]}"
    result = PoolResult(pool=pool, concurrency=concurrency, processes=processes, repeat=repeat, total=workload.jobs)
    enqueued: dict[str, float] = {}
    try:
        pending = set(_fill(app, task, workload, queue, enqueued))
        log_name = f"worker-{pool}-{repeat}.log" if system is LOOPLINE else f"worker-{system.name}-{pool}-{repeat}.log"
        worker = system.start_worker(pool, concurrency, queues=[queue], log_path=log_dir / log_name, env=env,
                                     processes=processes)
        _measure(worker, result, pending, enqueued, app.backend, on_progress=on_progress,
                 stall_timeout_s=stall_timeout_s, ready_timeout_s=ready_timeout_s)
    except RunFailed as exc:
        exc.result = result
        raise
    finally:
        _forget(app, queue, list(enqueued))
    return result


def _measure(worker: Child, result: PoolResult, pending: set[str], enqueued: dict[str, float], backend: Any, *,
             on_progress: Callable[[PoolResult], None], stall_timeout_s: float, ready_timeout_s: float) -> None:
    """Wait for the worker to be ready, then for every pending job; always stops the worker."""
    sampler = _Sampler(worker)
    sampler.start()
    booted_at = time.monotonic()
    baseline_cpu_s: float | None = None
    try:
        while baseline_cpu_s is None:
            if _ready_count(worker) >= result.processes:
                baseline_cpu_s = sampler.sample()
            elif not worker.alive() or time.monotonic() - booted_at > ready_timeout_s:
                raise _why_not_started(worker, result.pool)
            else:
                time.sleep(READY_POLL_S)
        last_change = time.monotonic()
        while pending:
            time.sleep(POLL_INTERVAL_S)
            if _collect(backend, pending, enqueued, result):
                last_change = time.monotonic()
                on_progress(result)
            elif not worker.alive() or time.monotonic() - last_change > stall_timeout_s:
                why = "the worker exited" if not worker.alive() else f"no job finished for {stall_timeout_s:g} s"
                raise JobsMissing(f"{result.pool}: {len(pending)} of {result.total} jobs never finished ({why}); "
                                  f"worker log: {worker.log_path}")
        result.cpu_s = sampler.sample() - baseline_cpu_s
    except BaseException:
        # Ctrl-C or a failed run: the jobs in flight no longer matter, so no warm shutdown.
        worker.stop(grace_s=3, signum=signal.SIGQUIT)
        raise
    finally:
        sampler.stop()
        worker.stop(grace_s=10)
    result.peak_rss_mb = sampler.peak_rss / 2**20


def _forget(app: Any, queue: str, ids: list[str]) -> None:
    """Delete the run's queue (with anything left in it), its bindings and its results: a bench leaves no litter."""
    # The queue as Celery created it on demand (task_create_missing_queues). Declared on this channel first:
    # kombu's virtual transports only delete the bindings a channel knows about.
    bound = Queue(queue, Exchange(queue, type=app.conf.task_default_exchange_type), routing_key=queue)
    with app.connection_for_write() as conn:
        declared = bound.bind(conn.default_channel)
        declared.declare()
        declared.delete()
    backend = app.backend
    for lo in range(0, len(ids), MGET_CHUNK):
        backend.client.delete(*[backend.get_key_for_task(i) for i in ids[lo:lo + MGET_CHUNK]])


def _finished_at(meta: dict[str, Any]) -> float:
    done = meta.get("date_done")
    return datetime.fromisoformat(done).timestamp() if isinstance(done, str) else time.time()


def _collect(backend: Any, pending: set[str], enqueued: dict[str, float], result: PoolResult) -> int:
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
            if meta["status"] == "SUCCESS" and isinstance(value, dict):
                status = value.get("status")
                error = f"HTTP {status}" if isinstance(status, int) and status >= 400 else None
                result.add(JobTimes(enqueued[task_id], value["started_at"], value["finished_at"], error,
                                    retries=int(meta.get("retries") or 0)))
            else:
                kind = value.get("exc_type", "error") if isinstance(value, dict) else "error"
                result.add(JobTimes(enqueued[task_id], None, _finished_at(meta), kind,
                                    retries=int(meta.get("retries") or 0)))
    return done
