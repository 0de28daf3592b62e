"""``loopline bench`` as a user runs it: real subprocesses, the session's Redis (or its own), real workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import psutil
import pytest

from loopline.bench.procs import Child, start_bench
from loopline.bench.schema import RUN_SCHEMA
from loopline.cli import build_parser
from loopline.cli.bench import DEFAULT_CONCURRENCY, parse_concurrency, plan_from_args

POOLS = ["prefork", "threads", "gevent", "asyncio"]
RUN_TIMEOUT_S = 90.0


def env_for(**changes: str | None) -> dict[str, str | None]:
    """Changes to the session's environment for a child; None unsets. Rich sizes tables from COLUMNS."""
    return {"COLUMNS": None, **changes}


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, child: Child) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if not child.alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"never saw {what}:\n{child.log_text()[-3000:]}")


def run_file(out: Path) -> dict[str, Any] | None:
    files = list(out.glob("*.json"))
    return json.loads(files[0].read_text()) if files else None


def progress_done(out: Path) -> int:
    doc = run_file(out)
    return doc["progress"]["done"] if doc and doc["progress"] else 0


def finish(child: Child, timeout_s: float = RUN_TIMEOUT_S) -> int:
    try:
        child.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.kill_tree()
        log = child.log_text()[-3000:]
        raise AssertionError(f"the bench did not finish within {timeout_s:.0f} s:\n{log}") from None
    return child.stop(grace_s=5)


def test_concurrency_spec_forms() -> None:
    assert parse_concurrency(None, POOLS) == {p: DEFAULT_CONCURRENCY[p] for p in POOLS}
    assert parse_concurrency("50", ["threads", "asyncio"]) == {"threads": 50, "asyncio": 50}
    assert parse_concurrency("1000,prefork=8", POOLS) == {"prefork": 8, "threads": 1000, "gevent": 1000,
                                                          "asyncio": 1000}
    assert parse_concurrency("gevent=1000", POOLS)["threads"] == DEFAULT_CONCURRENCY["threads"]
    for bad in ("gevent=0", "solo=3", "many", "asyncio=x"):
        with pytest.raises(ValueError, match="--concurrency: cannot use"):
            parse_concurrency(bad, POOLS)
    with pytest.raises(ValueError, match="prefork=1000 would fork that many processes"):
        parse_concurrency("1000", POOLS)


@pytest.mark.parametrize(("argv", "message"), [
    (["--pools", "prefork,fibers"], "--pools: unknown pool(s) fibers"),
    (["--pools", "gevent,gevent"], "names a pool twice"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--error-rate", "1.5"], "--error-rate must be between 0 and 1"),
    (["--repeat", "0"], "--repeat must be >= 1"),
    (["--processes", "0"], "--processes must be >= 1"),
])
def test_bad_arguments_are_refused_before_anything_starts(argv: list[str], message: str) -> None:
    args = build_parser().parse_args(["bench", *argv])
    with pytest.raises(ValueError) as caught:
        plan_from_args(args)
    assert message in str(caught.value)


def test_processes_apply_to_the_pools_that_can_run_several() -> None:
    plan = plan_from_args(build_parser().parse_args(["bench", "--processes", "2"]))
    assert plan.processes == {"prefork": 1, "threads": 2, "gevent": 2, "asyncio": 2}
    assert "--processes 2" in plan.command(build_parser().parse_args(["bench", "--processes", "2"]))


def test_the_task_log_switch_is_off_by_default_and_kept_in_the_command() -> None:
    quiet = build_parser().parse_args(["bench"])
    logged = build_parser().parse_args(["bench", "--task-log"])
    assert not plan_from_args(quiet).task_log and "--task-log" not in plan_from_args(quiet).command(quiet)
    assert plan_from_args(logged).task_log and plan_from_args(logged).command(logged).endswith(" --task-log")


def test_a_bad_argument_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    child = start_bench(["--pools", "asyncio,fibers", "--out", str(tmp_path / "out")], log_path=tmp_path / "log",
                        env=env_for())
    assert finish(child, 30) == 2
    lines = child.log_text().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopline bench: error: --pools: unknown pool(s) fibers")
    assert not (tmp_path / "out").exists()


def test_every_pool_runs_and_the_run_file_matches_the_schema(tmp_path: Path) -> None:
    out = tmp_path / "results"
    child = start_bench(["--pools", ",".join(POOLS), "--jobs", "40", "--latency-ms", "50", "--error-rate", "0.1",
                         "--payload-bytes", "1024", "--concurrency", "4,prefork=2,gevent=40", "--out", str(out)],
                        log_path=tmp_path / "bench.log", env=env_for())
    assert finish(child) == 0, child.log_text()[-3000:]
    table = child.log_text()
    for pool in POOLS:
        assert f"│ {pool}" in table
    assert "won with" in table and "results: " in table
    doc = run_file(out)
    assert doc is not None and [p.name for p in out.iterdir()] == [f"{doc['run_id']}.json"]  # logs removed
    jsonschema.validate(doc, RUN_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert doc["status"] == "complete" and doc["error"] is None
    assert doc["workload"] == {"task": "fetch_url", "jobs": 40, "latency_ms": 50.0, "jitter_ms": 0.0,
                               "error_rate": 0.1, "payload_bytes": 1024, "pools": POOLS, "repeats": 1}
    assert doc["machine"]["cpus"] == os.cpu_count() and doc["machine"]["redis"]
    assert [r["pool"] for r in doc["results"]] == POOLS
    failed = 0
    for result in doc["results"]:
        assert result["jobs_ok"] + result["jobs_failed"] == 40
        assert set(result["errors"]) <= {"HTTP 500"}
        failed += result["jobs_failed"]
        # Little's law: never more than `slots` jobs in flight, each at least 50 ms, so throughput cannot pass
        # slots / 50 ms by more than measurement noise.
        assert result["little_limit_per_s"] == result["concurrency"] / 0.05
        assert result["throughput_per_s"] <= result["little_limit_per_s"] * 1.05
        assert result["latency_ms"]["p50"] >= 50 and result["worker_cpu_ms_per_job"] > 0
        assert result["timeline"][-1]["completed"] == 40 and len(result["jobs"]["finished_s"]) == 40
    assert failed > 0  # 10 % of the target's answers are 500s, counted as failed jobs


def descendants(child: Child) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(child.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pids: set[int]) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_a_run_whose_jobs_go_missing_fails_and_says_how_many(tmp_path: Path) -> None:
    out = tmp_path / "results"
    child = start_bench(["--pools", "threads", "--jobs", "60", "--latency-ms", "100", "--concurrency", "2",
                         "--out", str(out)], log_path=tmp_path / "bench.log", env=env_for())
    try:
        wait_until(lambda: progress_done(out) > 0, 60, "progress", child)
        worker = next(p for p in psutil.Process(child.pid).children() if "worker" in " ".join(p.cmdline()))
        worker.send_signal(signal.SIGKILL)
        assert finish(child) == 2
    finally:
        child.stop(grace_s=5)
    lines = [line for line in child.log_text().splitlines() if "error:" in line]
    assert len(lines) == 1 and "jobs never finished (the worker exited)" in lines[0], child.log_text()[-2000:]
    missing = int(lines[0].split("threads: ", 1)[1].split(" of ", 1)[0])
    assert 0 < missing < 60 and f"{missing} of 60 jobs" in lines[0]
    doc = run_file(out)
    assert doc is not None and doc["status"] == "failed" and f"{missing} of 60 jobs" in doc["error"]


def test_ctrl_c_stops_workers_target_and_its_own_redis(tmp_path: Path) -> None:
    out = tmp_path / "results"
    env = env_for(LOOPLINE_BROKER_URL=None, LOOPLINE_RESULT_BACKEND=None, LOOPLINE_HOME=str(tmp_path / "home"))
    child = start_bench(["--pools", "asyncio", "--jobs", "100", "--latency-ms", "100", "--concurrency", "2",
                         "--out", str(out)], log_path=tmp_path / "bench.log", env=env)
    started: set[int] = set()
    try:
        def running() -> bool:
            started.update(descendants(child))
            return progress_done(out) > 0

        wait_until(running, 60, "progress", child)
        started.update(descendants(child))
        assert len(started) >= 3, [psutil.Process(p).cmdline() for p in started]  # its Redis, the target, the worker
        child.send_signal(signal.SIGINT)
        assert finish(child, 30) == 130
    finally:
        child.stop(grace_s=5)
    assert alive(started) == []
    doc = run_file(out)
    assert doc is not None and doc["status"] == "interrupted"
    assert list(out.iterdir()) == [out / f"{doc['run_id']}.json"]


def test_the_stock_baseline_runs_beside_each_pool(tmp_path: Path) -> None:
    out = tmp_path / "results"
    child = start_bench(["--pools", "threads,asyncio", "--jobs", "30", "--latency-ms", "20", "--concurrency", "10",
                         "--baseline", "stock", "--out", str(out)], log_path=tmp_path / "bench.log", env=env_for())
    assert finish(child) == 0, child.log_text()[-3000:]
    doc = run_file(out)
    assert doc is not None and [p.name for p in out.iterdir()] == [f"{doc['run_id']}.json"]
    jsonschema.validate(doc, RUN_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert doc["command"].endswith("--baseline stock")
    assert [r["pool"] for r in doc["results"]] == ["threads", "asyncio"]
    baseline = doc["baseline"]
    assert baseline["system"] == "stock" and [r["pool"] for r in baseline["results"]] == ["threads", "asyncio"]
    for entry in baseline["results"]:
        assert entry["error"] is None and entry["jobs_ok"] == 30 and entry["worker_cpu_ms_per_job"] > 0
        assert entry["latency_ms"]["p50"] >= 20
    for row in doc["summary"]:
        assert row["vs_stock"]["throughput"] > 0 and row["vs_stock"]["per_cpu"] > 0
    lines = [line for line in child.log_text().splitlines() if "│" in line]
    for pool in ("threads", "asyncio"):
        at = next(i for i, line in enumerate(lines) if f"│ {pool} " in line)
        assert "└ stock" in lines[at + 1] and "FAILED" not in lines[at + 1]


def test_a_stock_run_that_fails_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    out = tmp_path / "results"
    child = start_bench(["--pools", "threads", "--jobs", "60", "--latency-ms", "100", "--concurrency", "2",
                         "--baseline", "stock", "--out", str(out)], log_path=tmp_path / "bench.log", env=env_for())
    try:
        def stock_running() -> bool:
            doc = run_file(out)
            progress = doc["progress"] if doc else None
            return bool(progress and progress["pool"] == "threads (stock)" and progress["done"] > 0)

        wait_until(stock_running, 60, "the stock worker's progress", child)
        worker = next(p for p in psutil.Process(child.pid).children() if "loopline.bench.baseline" in p.cmdline())
        worker.send_signal(signal.SIGKILL)
        assert finish(child) == 0, child.log_text()[-3000:]
    finally:
        child.stop(grace_s=5)
    doc = run_file(out)
    assert doc is not None and doc["status"] == "complete"
    jsonschema.validate(doc, RUN_SCHEMA, format_checker=jsonschema.FormatChecker())
    stock = doc["baseline"]["summary"][0]
    assert stock["failed_repeats"] == 1 and "jobs never finished (the worker exited)" in stock["error"]
    assert 0 < stock["jobs_ok"] < 60 and doc["summary"][0]["vs_stock"] is None
    log = child.log_text()
    assert "└ stock FAILED" in log and "threads (stock) failed 1 of 1: threads: " in log.replace("\n", " ")
    assert (out / f"{doc['run_id']}.logs").is_dir()  # the failure names the stock worker's log: it is kept
