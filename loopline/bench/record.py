"""The run file: one JSON document per ``loopline bench`` run, rewritten while it runs so a dashboard can follow.

``RunFile`` owns ``<out>/<run_id>.json``. It is written atomically (temporary file, then rename) when the
run starts, at most every ``LIVE_WRITE_INTERVAL_S`` while a pool runs (with ``status: running`` and a
``progress`` entry for the pool in flight), after every pool, and once more at the end with the final
``status``. ``bench.schema.RUN_SCHEMA`` describes the document.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
import uuid
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from loopline.bench.jobs import PoolResult, Workload

__all__ = ["LIVE_WRITE_INTERVAL_S", "SCHEMA_ID", "RunFile", "compare_to_baseline", "machine_info", "new_run_id",
           "result_entry", "summarize"]

SCHEMA_ID = "loopline.bench/1"
LIVE_WRITE_INTERVAL_S = 0.5


def new_run_id() -> str:
    """Sortable by time, unique enough for one machine: ``20250101-120000-ab12``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info(redis_server_version: str | None) -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "celery": _version("celery"), "kombu": _version("kombu"), "redis": redis_server_version,
            "redis_py": _version("redis")}


def _finite(value: float) -> float | None:
    return round(value, 3) if math.isfinite(value) else None


def result_entry(result: PoolResult, workload: Workload, *, with_jobs: bool = True) -> dict[str, Any]:
    """One pool × repeat as the run file stores it; ``jobs`` holds per-job times relative to ``jobs.t0``."""
    limit = result.little_limit_per_s(workload.latency_ms)
    entry: dict[str, Any] = {
        "pool": result.pool, "concurrency": result.concurrency, "processes": result.processes,
        "repeat": result.repeat, "jobs_ok": result.jobs_ok, "jobs_failed": result.jobs_failed,
        "errors": result.errors, "retries": result.retries, "wall_s": round(result.wall_s, 4),
        "throughput_per_s": round(result.throughput_per_s, 3), "little_limit_per_s": _finite(limit),
        "pct_of_limit": _finite(100 * result.throughput_per_s / limit) if 0 < limit < math.inf else None,
        "latency_ms": {k: round(v, 3) for k, v in result.latency_summary().items()},
        "worker_cpu_s": round(result.cpu_s, 4), "worker_cpu_ms_per_job": round(result.cpu_ms_per_job, 4),
        "peak_rss_mb": round(result.peak_rss_mb, 2), "timeline": result.timeline(),
    }
    if with_jobs:
        t0 = result.t0
        entry["jobs"] = {
            "t0": t0,
            "enqueued_s": [round(j.enqueued - t0, 6) for j in result.jobs],
            "started_s": [None if j.started is None else round(j.started - t0, 6) for j in result.jobs],
            "finished_s": [round(j.finished - t0, 6) for j in result.jobs],
            "error": [j.error for j in result.jobs],
        }
    return entry


def _median_entry(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median throughput (the lower middle one for an even count)."""
    ordered = sorted(entries, key=lambda e: e["throughput_per_s"])
    return ordered[(len(ordered) - 1) // 2]


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pool, in first-run order: medians over repeats, min–max of throughput, ratio to the best."""
    by_pool: dict[str, list[dict[str, Any]]] = {}
    for entry in results:
        by_pool.setdefault(entry["pool"], []).append(entry)
    rows = []
    for pool, entries in by_pool.items():
        rates = [e["throughput_per_s"] for e in entries]
        middle = _median_entry(entries)
        errors: dict[str, int] = {}
        for e in entries:
            for kind, n in e["errors"].items():
                errors[kind] = errors.get(kind, 0) + n
        limit = middle["little_limit_per_s"]
        rate = statistics.median(rates)
        rows.append({
            "pool": pool, "concurrency": middle["concurrency"], "processes": middle["processes"],
            "repeats": len(entries), "jobs_ok": sum(e["jobs_ok"] for e in entries),
            "jobs_failed": sum(e["jobs_failed"] for e in entries), "errors": errors,
            "throughput_per_s": round(rate, 3), "throughput_min_per_s": min(rates), "throughput_max_per_s": max(rates),
            "little_limit_per_s": limit, "pct_of_limit": round(100 * rate / limit, 3) if limit else None,
            "latency_ms": {k: round(statistics.median(e["latency_ms"][k] for e in entries), 3)
                           for k in ("p50", "p95", "p99", "max")},
            "worker_cpu_ms_per_job": round(statistics.median(e["worker_cpu_ms_per_job"] for e in entries), 4),
            "peak_rss_mb": max(e["peak_rss_mb"] for e in entries),
            "timeline": middle["timeline"], "timeline_repeat": middle["repeat"],
        })
    best = max((r["throughput_per_s"] for r in rows), default=0.0)
    for row in rows:
        row["vs_best"] = round(row["throughput_per_s"] / best, 4) if best else None
    return rows


def compare_to_baseline(summary: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> None:
    """Set each row's ``vs_stock``: its jobs/s and its jobs per CPU second as multiples of the baseline's pool.

    None where the baseline has no row for the pool, failed there, or measured nothing to divide by.
    """
    by_pool = {row["pool"]: row for row in baseline}
    for row in summary:
        base = by_pool.get(row["pool"])
        usable = (base is not None and not base.get("error") and base["throughput_per_s"] > 0
                  and base["worker_cpu_ms_per_job"] > 0 and row["worker_cpu_ms_per_job"] > 0)
        row["vs_stock"] = None if base is None or not usable else {
            "throughput": round(row["throughput_per_s"] / base["throughput_per_s"], 3),
            "per_cpu": round(base["worker_cpu_ms_per_job"] / row["worker_cpu_ms_per_job"], 3),
        }


def _baseline_summary(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The baseline's rows, each with ``error``: why its first failed repeat failed (None when none did)."""
    rows = summarize(entries)
    for row in rows:
        failures = [e["error"] for e in entries if e["pool"] == row["pool"] and e.get("error")]
        row["error"] = failures[0] if failures else None
        row["failed_repeats"] = len(failures)
    return rows


def _winner(summary: list[dict[str, Any]]) -> dict[str, Any] | None:
    ranked = sorted(summary, key=lambda r: r["throughput_per_s"], reverse=True)
    if not ranked or not ranked[0]["throughput_per_s"]:
        return None
    top = ranked[0]
    winner: dict[str, Any] = {"pool": top["pool"], "throughput_per_s": top["throughput_per_s"]}
    second = ranked[1] if len(ranked) > 1 else None
    if second is not None and second["throughput_per_s"]:
        winner.update(runner_up=second["pool"], ratio=round(top["throughput_per_s"] / second["throughput_per_s"], 3))
    return winner


class RunFile:
    """The JSON document of one run and the file it lives in."""

    def __init__(self, out_dir: Path, workload: Workload, *, pools: list[str], repeats: int, command: str,
                 machine: dict[str, Any], run_id: str | None = None, baseline: str | None = None) -> None:
        self.run_id = run_id or new_run_id()
        self.path = out_dir / f"{self.run_id}.json"
        self.workload = workload
        self._entries: list[dict[str, Any]] = []
        self._baseline_entries: list[dict[str, Any]] = []
        self._last_live_write = 0.0
        self.doc: dict[str, Any] = {
            "schema": SCHEMA_ID, "run_id": self.run_id, "status": "running", "error": None,
            "started_at": datetime.now(UTC).isoformat(timespec="milliseconds"), "finished_at": None,
            "command": command, "machine": machine,
            "workload": {**workload.as_dict(), "pools": pools, "repeats": repeats},
            "results": [], "summary": [], "winner": None, "progress": None,
            "baseline": None if baseline is None else {"system": baseline, "results": [], "summary": []},
        }

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.doc, separators=(",", ":")))
        os.replace(tmp, self.path)
        self._last_live_write = time.monotonic()

    def progress(self, result: PoolResult, *, force: bool = False, baseline: bool = False) -> None:
        """Record the pool in flight; written at most every LIVE_WRITE_INTERVAL_S unless ``force``.

        A baseline's pool in flight is named ``gevent (stock)``, so a live page draws it as a line of its own.
        """
        if not force and time.monotonic() - self._last_live_write < LIVE_WRITE_INTERVAL_S:
            return
        pool = f"{result.pool} ({self.doc['baseline']['system']})" if baseline else result.pool
        self.doc["progress"] = {"pool": pool, "repeat": result.repeat, "done": len(result.jobs),
                                "total": result.total, "throughput_per_s": round(result.throughput_per_s, 3),
                                "timeline": result.timeline()}
        self.write()

    def add(self, result: PoolResult) -> None:
        self._entries.append(result_entry(result, self.workload))
        self._summarize()

    def add_baseline(self, result: PoolResult, error: str | None = None) -> None:
        """One baseline pool × repeat; ``error`` says why it failed (its entry keeps the jobs that finished)."""
        if self.doc["baseline"] is None:
            raise ValueError("this run has no baseline")
        self._baseline_entries.append({**result_entry(result, self.workload), "error": error})
        self._summarize()

    def _summarize(self) -> None:
        self.doc["results"] = self._entries
        self.doc["summary"] = summarize(self._entries)
        self.doc["winner"] = _winner(self.doc["summary"])
        baseline = self.doc["baseline"]
        if baseline is not None:
            baseline["results"] = self._baseline_entries
            baseline["summary"] = _baseline_summary(self._baseline_entries)
            compare_to_baseline(self.doc["summary"], baseline["summary"])
        self.doc["progress"] = None
        self.write()

    def finish(self, status: str, error: str | None = None) -> None:
        self.doc.update(status=status, error=error, progress=None,
                        finished_at=datetime.now(UTC).isoformat(timespec="milliseconds"))
        self.write()
