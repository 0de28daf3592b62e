"""loopline.dashboard.store: listing, loading and exporting run files, and refusing bad ids with a reason."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from loopline.bench.jobs import JobTimes, PoolResult, Workload
from loopline.bench.record import RunFile, machine_info
from loopline.dashboard.store import RunNotFound, RunStore, jobs_csv, summary_csv


def result(pool: str, concurrency: int, jobs: int = 20) -> PoolResult:
    out = PoolResult(pool=pool, concurrency=concurrency, total=jobs, cpu_s=0.05, peak_rss_mb=70.0)
    for i in range(jobs):
        start = 50.0 + (i // concurrency) * 0.1
        out.add(JobTimes(49.0, start, start + 0.1, "HTTP 500" if i == 3 else None))
    return out


def write_run(root: Path, run_id: str, pools: dict[str, int], status: str = "complete") -> dict:
    run = RunFile(root, Workload("fetch_url", 20, 100.0, "http://127.0.0.1:9"), pools=list(pools), repeats=1,
                  command="loopline bench", machine=machine_info("7.2"), run_id=run_id)
    for pool, concurrency in pools.items():
        run.add(result(pool, concurrency))
    if status != "running":
        run.finish(status)
    return run.doc


def test_runs_are_listed_newest_first_with_their_winner(tmp_path: Path) -> None:
    write_run(tmp_path, "20250101-120000-aaaa", {"threads": 5, "asyncio": 10})
    write_run(tmp_path, "20250102-120000-bbbb", {"gevent": 2}, status="running")
    (tmp_path / "notes.txt").write_text("not a run")
    runs = RunStore(tmp_path).list_runs()
    assert [r["run_id"] for r in runs] == ["20250102-120000-bbbb", "20250101-120000-aaaa"]
    assert runs[0]["status"] == "running" and runs[1]["winner"]["pool"] == "asyncio"
    assert runs[1]["pools"] == ["threads", "asyncio"] and runs[1]["workload"]["jobs"] == 20


def test_view_leaves_out_per_job_times_that_the_export_keeps(tmp_path: Path) -> None:
    write_run(tmp_path, "run-1", {"threads": 5, "asyncio": 10})
    store = RunStore(tmp_path)
    view = store.view("run-1")
    assert all("jobs" not in r for r in view["results"]) and view["summary"] == store.load("run-1")["summary"]
    rows = list(csv.DictReader(io.StringIO(jobs_csv(store.load("run-1")))))
    assert len(rows) == 40 and {r["pool"] for r in rows} == {"threads", "asyncio"}
    assert rows[3]["error"] == "HTTP 500" and float(rows[0]["latency_ms"]) == pytest.approx(100.0)
    summary = list(csv.DictReader(io.StringIO(summary_csv(view))))
    assert [r["pool"] for r in summary] == ["threads", "asyncio"]
    assert float(summary[1]["throughput_per_s"]) == view["summary"][1]["throughput_per_s"]
    assert float(summary[1]["latency_p99_ms"]) == view["summary"][1]["latency_ms"]["p99"]


def test_a_rewritten_file_is_read_again(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    run = RunFile(tmp_path, Workload("fetch_url", 20, 100.0, "http://127.0.0.1:9"), pools=["threads"], repeats=1,
                  command="loopline bench", machine=machine_info("7.2"), run_id="run-2")
    run.add(result("threads", 5))
    before = store.snapshot()["run-2"]
    assert store.view("run-2")["status"] == "running"
    run.finish("complete")  # right after the last write, maybe within the same mtime tick
    assert store.snapshot()["run-2"] != before
    assert store.view("run-2")["status"] == "complete"


@pytest.mark.parametrize(("run_id", "message"), [
    ("missing-run", "no run 'missing-run' in"),
    ("../etc/passwd", "is not a run id"),
    (".hidden", "is not a run id"),
    ("broken", "cannot be read"),
    ("stranger", "is not a loopline bench run file"),
])
def test_bad_ids_and_bad_files_are_not_found_with_a_reason(tmp_path: Path, run_id: str, message: str) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "stranger.json").write_text(json.dumps({"run_id": "stranger"}))
    store = RunStore(tmp_path)
    with pytest.raises(RunNotFound, match=message.replace(".", r"\.").replace("(", r"\(")):
        store.load(run_id)
    assert store.list_runs() == []


def test_a_missing_folder_has_no_runs(tmp_path: Path) -> None:
    assert RunStore(tmp_path / "nowhere").list_runs() == []


def test_the_stock_baseline_is_viewed_and_exported_beside_each_pool(tmp_path: Path) -> None:
    run = RunFile(tmp_path, Workload("fetch_url", 20, 100.0, "http://127.0.0.1:9"), pools=["gevent", "asyncio"],
                  repeats=1, command="loopline bench --baseline stock", machine=machine_info("7.2"), run_id="run-b",
                  baseline="stock")
    run.add(result("gevent", 10))
    run.add_baseline(result("gevent", 5))
    run.add(result("asyncio", 10))
    run.add_baseline(result("asyncio", 5, jobs=7), "asyncio: 13 of 20 jobs never finished (the worker exited)")
    run.finish("complete")
    store = RunStore(tmp_path)
    view = store.view("run-b")
    assert all("jobs" not in r for r in view["baseline"]["results"])
    assert "jobs" in store.load("run-b")["baseline"]["results"][0]  # the file itself keeps them
    summary = list(csv.DictReader(io.StringIO(summary_csv(view))))
    assert [(r["pool"], r["system"]) for r in summary] == [("gevent", "loopline"), ("asyncio", "loopline"),
                                                           ("gevent", "stock"), ("asyncio", "stock")]
    assert float(summary[0]["vs_stock_throughput"]) == pytest.approx(2.0, rel=1e-3)
    assert summary[1]["vs_stock_throughput"] == "" and "13 of 20" in summary[3]["error"] and summary[2]["error"] == ""
    jobs = list(csv.DictReader(io.StringIO(jobs_csv(store.load("run-b")))))
    assert len(jobs) == 20 + 20 + 20 + 7 and [r["system"] for r in jobs].count("stock") == 27
