"""loopline's asyncio pool beside taskiq on the same workload, in one run: jobs/s and worker CPU per job.

    pip install "taskiq>=0.13,<0.14" taskiq-redis        # into the venv; not a loopline dependency
    LOOPLINE_BROKER_URL=redis://127.0.0.1:PORT/0 .venv/bin/python scripts/bench_taskiq.py \\
        [--jobs 3000] [--latency-ms 100] [--concurrency 1000] [--repeat 3]

Both fetch a local target (``loopline.bench.target``) that answers after ``--latency-ms``, from a queue filled
before the worker starts, in one worker process at ``--concurrency`` jobs in flight:

- loopline: ``loopline worker --pool asyncio`` and the built-in ``fetch_url`` (aiohttp body, URL guard,
  result in the Redis backend), measured by ``loopline.bench.runner.run_pool`` as ``loopline bench`` does;
- taskiq 0.13: ``taskiq worker --workers 1 --max-async-tasks N`` on taskiq-redis's ``ListQueueBroker`` with its
  ``RedisAsyncResultBackend`` (JSON), a task that GETs the URL with one aiohttp session per worker process,
  at log level WARNING (taskiq logs a line per task at INFO).

Worker CPU counts from the moment the worker said it was ready; jobs/s from the first job started to the last
one finished. Prints the medians over repeats and loopline's ratio to taskiq.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from taskiq import TaskiqEvents, TaskiqState
from taskiq.serializers import JSONSerializer
from taskiq_redis import ListQueueBroker, RedisAsyncResultBackend

__all__ = ["broker", "fetch", "main"]

READY_LINE = "taskiq worker ready."
STALL_TIMEOUT_S = 60.0
POLL_S = 0.2
REDIS_URL = os.environ.get("LOOPLINE_BROKER_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_TASKIQ_QUEUE", "bench.taskiq")

broker = ListQueueBroker(REDIS_URL, queue_name=QUEUE).with_result_backend(
    RedisAsyncResultBackend(REDIS_URL, serializer=JSONSerializer(), result_ex_time=3600))


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def _startup(state: TaskiqState) -> None:
    state.session = aiohttp.ClientSession()
    print(READY_LINE, file=sys.stderr, flush=True)


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def _shutdown(state: TaskiqState) -> None:
    await state.session.close()


@broker.task(task_name="bench.fetch")
async def fetch(url: str) -> dict[str, Any]:
    session: aiohttp.ClientSession = broker.state.session
    started_at = time.time()
    async with session.get(url) as response:
        body = await response.read()
    return {"url": url, "status": response.status, "bytes": len(body), "started_at": started_at,
            "finished_at": time.time()}


def _tree_cpu_s(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            continue
    return total


async def _fill(url: str, jobs: int) -> list[str]:
    await broker.startup()
    try:
        return [(await fetch.kiq(url)).task_id for _ in range(jobs)]
    finally:
        await broker.shutdown()


def run_taskiq(target_url: str, jobs: int, concurrency: int, log_dir: Path) -> dict[str, float]:
    """Fill taskiq's queue, start one taskiq worker, wait for every result; jobs/s and CPU ms per job."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    ids = asyncio.run(_fill(f"{target_url}/job", jobs))
    log_path = log_dir / f"taskiq-{uuid.uuid4().hex[:6]}.log"
    root = Path(__file__).resolve().parent.parent
    with open(log_path, "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "taskiq", "worker", "scripts.bench_taskiq:broker", "--workers", "1",
             "--max-async-tasks", str(concurrency), "--log-level", "WARNING"],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root), "BENCH_TASKIQ_QUEUE": QUEUE},
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while READY_LINE not in log_path.read_text(errors="replace"):
            if worker.poll() is not None:
                raise RuntimeError(f"the taskiq worker exited: {log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        cpu0 = _tree_cpu_s(worker.pid)
        pending, last_change = list(ids), time.monotonic()
        raw: dict[str, bytes] = {}
        while pending:
            time.sleep(POLL_S)
            values = client.mget(pending)
            done = {task_id: value for task_id, value in zip(pending, values, strict=True) if value is not None}
            if done:
                raw.update(done)
                pending = [task_id for task_id in pending if task_id not in done]
                last_change = time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT_S:
                raise RuntimeError(f"taskiq: {len(pending)} of {jobs} jobs never finished; log: {log_path}")
        cpu_s = _tree_cpu_s(worker.pid) - cpu0
    finally:
        worker.terminate()
        try:
            worker.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
            worker.wait()
        client.delete(QUEUE, *ids)
        client.close()
    values = [json.loads(v)["return_value"] for v in raw.values()]
    started = min(v["started_at"] for v in values)
    finished = max(v["finished_at"] for v in values)
    latencies = sorted((v["finished_at"] - v["started_at"]) * 1000 for v in values)
    return {"jobs_per_s": len(values) / (finished - started), "cpu_ms_per_job": cpu_s * 1000 / len(values),
            "p50_ms": latencies[len(latencies) // 2]}


def run_loopline(target_url: str, jobs: int, latency_ms: float, concurrency: int, log_dir: Path,
                 repeat: int) -> dict[str, float]:
    from loopline.bench.jobs import Workload
    from loopline.bench.runner import run_pool

    result = run_pool("asyncio", concurrency, Workload("fetch_url", jobs, latency_ms, target_url), log_dir=log_dir,
                      repeat=repeat, env={"LOOPLINE_TASK_LOG": "0"})
    return {"jobs_per_s": result.throughput_per_s, "cpu_ms_per_job": result.cpu_ms_per_job,
            "p50_ms": result.latency_summary()["p50"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if "LOOPLINE_BROKER_URL" not in os.environ:
        sys.exit("set LOOPLINE_BROKER_URL to a Redis of your own (redis-server --port N --save '')")
    os.environ.setdefault("LOOPLINE_URL_ALLOWLIST", "127.0.0.1")

    from loopline.bench.procs import start_target

    log_dir = Path(tempfile.mkdtemp(prefix="bench-taskiq-"))
    target, url = start_target(args.latency_ms, log_path=log_dir / "target.log")
    runs: dict[str, list[dict[str, float]]] = {"loopline asyncio": [], "taskiq": []}
    try:
        for repeat in range(1, args.repeat + 1):
            runs["loopline asyncio"].append(run_loopline(url, args.jobs, args.latency_ms, args.concurrency, log_dir,
                                                         repeat))
            runs["taskiq"].append(run_taskiq(url, args.jobs, args.concurrency, log_dir))
            for name, results in runs.items():
                r = results[-1]
                print(f"repeat {repeat}: {name:<17} {r['jobs_per_s']:8.1f} jobs/s "
                      f"{r['cpu_ms_per_job']:6.2f} ms CPU/job", flush=True)
    finally:
        target.stop(5)
    print(f"\n{args.jobs} × fetch, {args.latency_ms:g} ms latency, c = {args.concurrency}, one worker process, "
          f"medians of {args.repeat}")
    print(f"{'system':<18} {'jobs/s':>9} {'CPU ms/job':>11} {'p50 ms':>8}")
    medians = {}
    for name, results in runs.items():
        medians[name] = {k: statistics.median(r[k] for r in results) for k in results[0]}
        m = medians[name]
        print(f"{name:<18} {m['jobs_per_s']:9.1f} {m['cpu_ms_per_job']:11.2f} {m['p50_ms']:8.0f}")
    ratios = [a["jobs_per_s"] / b["jobs_per_s"] for a, b in zip(runs["loopline asyncio"], runs["taskiq"], strict=True)]
    print(f"loopline ÷ taskiq, jobs/s: {statistics.median(ratios):.2f}× (per repeat: "
          + ", ".join(f"{r:.2f}" for r in ratios) + ")")


if __name__ == "__main__":
    main()
