"""loopline.bench.record: the run file's summary across repeats, its live rewrites, and its schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from loopline.bench.jobs import JobTimes, PoolResult, Workload
from loopline.bench.record import LIVE_WRITE_INTERVAL_S, RunFile, machine_info, new_run_id, result_entry, summarize
from loopline.bench.schema import RUN_SCHEMA

WORKLOAD = Workload("fetch_url", 40, 100.0, "http://127.0.0.1:9", error_rate=0.1)


def slotted(pool: str, concurrency: int, *, repeat: int = 1, latency_s: float = 0.1, stretch: float = 1.0,
            jobs: int = 40) -> PoolResult:
    """``jobs`` jobs run ``concurrency`` at a time; ``stretch`` > 1 leaves gaps (a pool below its limit)."""
    result = PoolResult(pool=pool, concurrency=concurrency, repeat=repeat, total=jobs, cpu_s=0.08, peak_rss_mb=80.0)
    for i in range(jobs):
        start = 100.0 + (i // concurrency) * latency_s * stretch
        result.add(JobTimes(99.0, start, start + latency_s, "HTTP 500" if i % 10 == 0 else None))
    return result


def document(tmp_path: Path, results: list[PoolResult]) -> dict:
    run = RunFile(tmp_path, WORKLOAD, pools=sorted({r.pool for r in results}), repeats=2, command="loopline bench",
                  machine=machine_info("7.2.4"))
    for result in results:
        run.add(result)
    run.finish("complete")
    return json.loads(run.path.read_text())


def test_summary_takes_medians_over_repeats_and_ranks_pools(tmp_path: Path) -> None:
    doc = document(tmp_path, [slotted("gevent", 10, repeat=1, stretch=2.0), slotted("asyncio", 10, repeat=1),
                              slotted("gevent", 10, repeat=2, stretch=4.0), slotted("asyncio", 10, repeat=2,
                                                                                     stretch=1.25)])
    rows = {row["pool"]: row for row in doc["summary"]}
    assert list(rows) == ["gevent", "asyncio"]  # first-run order, as the table prints it
    asyncio, gevent = rows["asyncio"], rows["gevent"]
    # asyncio: 40 jobs in 0.4 s and in 0.475 s; the median of two is their mean.
    assert asyncio["throughput_max_per_s"] == pytest.approx(100.0)
    assert asyncio["throughput_min_per_s"] == pytest.approx(40 / 0.475, rel=1e-3)
    assert asyncio["throughput_per_s"] == pytest.approx((100.0 + 40 / 0.475) / 2, rel=1e-3)
    assert asyncio["little_limit_per_s"] == pytest.approx(100.0)
    assert asyncio["vs_best"] == 1.0
    assert gevent["vs_best"] == pytest.approx(gevent["throughput_per_s"] / asyncio["throughput_per_s"], rel=1e-3)
    assert asyncio["jobs_ok"] + asyncio["jobs_failed"] == 80 and asyncio["errors"] == {"HTTP 500": 8}
    assert doc["winner"]["pool"] == "asyncio" and doc["winner"]["runner_up"] == "gevent"
    assert doc["winner"]["ratio"] > 1


def test_run_file_matches_its_schema_and_keeps_every_job(tmp_path: Path) -> None:
    doc = document(tmp_path, [slotted("threads", 8), slotted("asyncio", 20)])
    jsonschema.validate(doc, RUN_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert doc["status"] == "complete" and doc["finished_at"] and doc["progress"] is None
    jobs = doc["results"][0]["jobs"]
    assert len(jobs["finished_s"]) == 40 and min(jobs["started_s"]) == 0.0 and jobs["enqueued_s"][0] == -1.0
    assert doc["results"][0]["timeline"][-1]["completed"] == 40
    assert [p.name for p in tmp_path.iterdir()] == [f"{doc['run_id']}.json"]  # no temporary file left behind


def test_progress_is_written_live_but_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]  # the throttle's clock, moved by hand: no race with a slow machine
    monkeypatch.setattr("loopline.bench.record.time.monotonic", lambda: clock[0])
    run = RunFile(tmp_path, WORKLOAD, pools=["asyncio"], repeats=1, command="loopline bench",
                  machine=machine_info(None))
    run.write()
    partial = slotted("asyncio", 10, jobs=12)
    run.progress(partial, force=True)
    written = json.loads(run.path.read_text())
    assert written["status"] == "running"
    assert written["progress"]["done"] == 12 and written["progress"]["total"] == 12
    partial.add(JobTimes(99.0, 100.5, 100.6))
    clock[0] += LIVE_WRITE_INTERVAL_S / 2
    run.progress(partial)  # within LIVE_WRITE_INTERVAL_S of the last write: not written
    assert json.loads(run.path.read_text())["progress"]["done"] == 12
    clock[0] += LIVE_WRITE_INTERVAL_S / 2
    run.progress(partial)  # the interval is over: written
    assert json.loads(run.path.read_text())["progress"]["done"] == 13
    jsonschema.validate(written, RUN_SCHEMA)


def test_a_failed_run_keeps_what_finished_and_says_why(tmp_path: Path) -> None:
    run = RunFile(tmp_path, WORKLOAD, pools=["threads", "gevent"], repeats=1, command="loopline bench",
                  machine=machine_info(None))
    run.add(slotted("threads", 8))
    run.finish("failed", "gevent: 12 of 40 jobs never finished (the worker exited)")
    doc = json.loads(run.path.read_text())
    jsonschema.validate(doc, RUN_SCHEMA)
    assert doc["status"] == "failed" and "12 of 40" in doc["error"] and len(doc["results"]) == 1


def test_entry_without_latency_has_no_limit() -> None:
    entry = result_entry(slotted("solo", 1, jobs=3), Workload("io_sleep", 3, 0.0, ""), with_jobs=False)
    assert entry["little_limit_per_s"] is None and entry["pct_of_limit"] is None and "jobs" not in entry
    assert summarize([entry])[0]["pct_of_limit"] is None


def test_run_ids_sort_by_time_and_are_valid() -> None:
    run_id = new_run_id()
    assert len(run_id) == 20 and run_id[8] == "-" and run_id[:8].isdigit()


def test_baseline_rows_sit_beside_each_pool_with_ratios_and_failures(tmp_path: Path) -> None:
    run = RunFile(tmp_path, WORKLOAD, pools=["gevent", "asyncio"], repeats=1, command="loopline bench --baseline stock",
                  machine=machine_info(None), baseline="stock")
    run.add(slotted("gevent", 10))
    stock_gevent = slotted("gevent", 10, stretch=2.0)
    stock_gevent.cpu_s = 0.16  # twice loopline's CPU for the same 40 jobs
    run.add_baseline(stock_gevent)
    run.add(slotted("asyncio", 20))
    failed = slotted("asyncio", 10, jobs=12)
    failed.total = 40
    run.add_baseline(failed, "asyncio: 28 of 40 jobs never finished (the worker exited); worker log: w.log")
    run.finish("complete")
    doc = json.loads(run.path.read_text())
    jsonschema.validate(doc, RUN_SCHEMA, format_checker=jsonschema.FormatChecker())
    assert [row["pool"] for row in doc["summary"]] == ["gevent", "asyncio"]  # the baseline is not ranked with them
    assert doc["winner"]["pool"] == "asyncio"
    gevent, asyncio = doc["summary"]
    # stretched: 4 batches in 0.7 s against 0.4 s
    assert gevent["vs_stock"] == {"throughput": pytest.approx(1.75, rel=1e-3), "per_cpu": pytest.approx(2.0)}
    assert asyncio["vs_stock"] is None  # no ratio against a run that did not finish
    stock = {row["pool"]: row for row in doc["baseline"]["summary"]}
    assert stock["gevent"]["error"] is None and stock["gevent"]["failed_repeats"] == 0
    assert stock["asyncio"]["failed_repeats"] == 1 and "28 of 40" in stock["asyncio"]["error"]
    assert stock["asyncio"]["jobs_ok"] + stock["asyncio"]["jobs_failed"] == 12  # what finished before it failed
    assert [e["error"] is None for e in doc["baseline"]["results"]] == [True, False]
    assert len(doc["baseline"]["results"][1]["jobs"]["finished_s"]) == 12


def test_baseline_progress_is_named_apart_and_a_run_without_one_refuses_it(tmp_path: Path) -> None:
    run = RunFile(tmp_path, WORKLOAD, pools=["threads"], repeats=1, command="loopline bench",
                  machine=machine_info(None), baseline="stock")
    run.progress(slotted("threads", 8, jobs=5), force=True, baseline=True)
    assert json.loads(run.path.read_text())["progress"]["pool"] == "threads (stock)"
    plain = RunFile(tmp_path, WORKLOAD, pools=["threads"], repeats=1, command="loopline bench",
                    machine=machine_info(None))
    with pytest.raises(ValueError, match="no baseline"):
        plain.add_baseline(slotted("threads", 8))
    plain.add(slotted("threads", 8))
    assert json.loads(plain.path.read_text())["baseline"] is None and "vs_stock" not in plain.doc["summary"][0]
