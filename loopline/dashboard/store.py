"""The runs a dashboard shows: ``loopline bench`` run files in one folder, listed, loaded and exported as CSV.

This is the one data module under the web adapter (``dashboard.app``): every number the page draws
comes from here, through the JSON API.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

__all__ = ["RUN_ID", "RunNotFound", "RunStore", "Signature", "jobs_csv", "summary_csv"]

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUMMARY_FIELDS = ("pool", "concurrency", "processes", "repeats", "jobs_ok", "jobs_failed", "throughput_per_s",
                  "throughput_min_per_s", "throughput_max_per_s", "little_limit_per_s", "pct_of_limit",
                  "latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "latency_max_ms", "worker_cpu_ms_per_job",
                  "peak_rss_mb", "vs_best", "system", "vs_stock_throughput", "vs_stock_per_cpu", "error")
JOB_FIELDS = ("pool", "repeat", "job", "enqueued_s", "started_s", "finished_s", "latency_ms", "error", "system")


Signature = tuple[int, int, int]


def _signature(path: Path) -> Signature:
    """Inode, mtime and size: the bench replaces its file on every write, and two writes can share an mtime tick."""
    st = path.stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


class RunNotFound(LookupError):
    """No readable run file has this id; the message says which id and where it was looked for."""


class RunStore:
    """Run files (``<run_id>.json``) in ``root``; their views are parsed once per change of the file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[Signature, dict[str, Any]]] = {}

    def snapshot(self) -> dict[str, Signature]:
        """Run id → signature of every run file: what changed since the last look."""
        if not self.root.is_dir():
            return {}
        found = {}
        for path in self.root.glob("*.json"):
            if RUN_ID.fullmatch(path.stem):
                try:
                    found[path.stem] = _signature(path)
                except FileNotFoundError:
                    continue
        return found

    def _path(self, run_id: str) -> Path:
        if not RUN_ID.fullmatch(run_id):
            raise RunNotFound(f"{run_id!r} is not a run id (letters, digits, '.', '_' and '-')")
        return self.root / f"{run_id}.json"

    def load(self, run_id: str) -> dict[str, Any]:
        """The whole run document, per-job times included (read from disk each time: it can be large)."""
        path = self._path(run_id)
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            raise RunNotFound(f"no run {run_id!r} in {self.root}/") from None
        except (OSError, ValueError) as exc:
            raise RunNotFound(f"run file {path} cannot be read: {exc}") from None
        if not isinstance(doc, dict) or doc.get("run_id") != run_id or not isinstance(doc.get("summary"), list):
            raise RunNotFound(f"{path} is not a loopline bench run file")
        return doc

    def view(self, run_id: str) -> dict[str, Any]:
        """The run as the page shows it: everything but the per-job times (those are in ``jobs.csv``).

        Kept in memory until the file changes, so a live page costs one parse per rewrite.
        """
        try:
            signature = _signature(self._path(run_id))
        except FileNotFoundError:
            raise RunNotFound(f"no run {run_id!r} in {self.root}/") from None
        cached = self._cache.get(run_id)
        if cached is not None and cached[0] == signature:
            return cached[1]
        doc = self.load(run_id)
        view = {**doc, "results": _without_jobs(doc.get("results", []))}
        if isinstance(doc.get("baseline"), dict):
            view["baseline"] = {**doc["baseline"], "results": _without_jobs(doc["baseline"].get("results", []))}
        self._cache[run_id] = (signature, view)
        return view

    def list_runs(self) -> list[dict[str, Any]]:
        """Every readable run, newest first, with what the run list shows."""
        runs = []
        for run_id in sorted(self.snapshot(), reverse=True):
            try:
                doc = self.view(run_id)
            except RunNotFound:
                continue
            runs.append({
                "run_id": run_id, "status": doc.get("status"), "started_at": doc.get("started_at"),
                "finished_at": doc.get("finished_at"), "workload": doc.get("workload"), "winner": doc.get("winner"),
                "error": doc.get("error"), "pools": [row["pool"] for row in doc["summary"]],
            })
        return runs


def _without_jobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if k != "jobs"} for entry in entries]


def _systems(doc: dict[str, Any], part: str) -> list[tuple[str, dict[str, Any]]]:
    """``(system, item)`` for each of the run's ``part`` ("summary" or "results"), the baseline's after loopline's."""
    items = [("loopline", item) for item in doc.get(part, [])]
    baseline = doc.get("baseline")
    if isinstance(baseline, dict):
        items += [(baseline["system"], item) for item in baseline.get(part, [])]
    return items


def _csv(fields: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def summary_csv(doc: dict[str, Any]) -> str:
    """One row per pool and system (loopline, then the baseline's): the numbers of the table and the charts."""
    rows = []
    for system, row in _systems(doc, "summary"):
        flat = {k: row.get(k) for k in SUMMARY_FIELDS}
        for q in ("p50", "p95", "p99", "max"):
            flat[f"latency_{q}_ms"] = row["latency_ms"][q]
        ratios = row.get("vs_stock") or {}
        flat.update(system=system, vs_stock_throughput=ratios.get("throughput"),
                    vs_stock_per_cpu=ratios.get("per_cpu"))
        rows.append(flat)
    return _csv(SUMMARY_FIELDS, rows)


def jobs_csv(doc: dict[str, Any]) -> str:
    """One row per job of every pool and repeat; times in seconds from that repeat's first job start."""
    rows = []
    for system, entry in _systems(doc, "results"):
        jobs = entry.get("jobs")
        if not jobs:
            continue
        for i, (enq, start, end, error) in enumerate(zip(jobs["enqueued_s"], jobs["started_s"], jobs["finished_s"],
                                                         jobs["error"], strict=True)):
            rows.append({"pool": entry["pool"], "repeat": entry["repeat"], "job": i, "enqueued_s": enq,
                         "started_s": start, "finished_s": end,
                         "latency_ms": None if start is None else round((end - start) * 1000, 3),
                         "error": error or "", "system": system})
    return _csv(JOB_FIELDS, rows)
