"""The comparison table ``loopline bench`` prints, drawn from a run document's ``summary``."""

from __future__ import annotations

from typing import Any

from rich.table import Table

__all__ = ["BASELINE_COLUMNS", "COLUMNS", "render_table", "title", "verdict"]

COLUMNS = ("pool", "concurrency", "ok", "failed", "jobs/s", "% of limit", "p50 ms", "p95 ms", "p99 ms",
           "CPU ms/job", "peak RSS MB", "vs best")
# With ``--baseline stock``: jobs/s, and jobs per CPU second, as multiples of the same pool on stock Celery.
BASELINE_COLUMNS = ("vs stock", "per CPU vs stock")


def title(doc: dict[str, Any]) -> str:
    w = doc["workload"]
    parts = [f"{w['jobs']} × {w['task']}", f"{w['latency_ms']:g} ms latency"]
    if w["jitter_ms"]:
        parts[-1] += f" ± {w['jitter_ms']:g}"
    if w["error_rate"]:
        parts.append(f"{100 * w['error_rate']:g} % errors")
    if w["repeats"] > 1:
        parts.append(f"median of {w['repeats']} repeats")
    return ", ".join(parts)


def verdict(doc: dict[str, Any]) -> str:
    """One sentence: which pool won and by how much."""
    winner = doc.get("winner")
    if not winner:
        return "no pool finished a job"
    text = f"{winner['pool']} won with {winner['throughput_per_s']:,.1f} jobs/s"
    if "runner_up" in winner:
        text += f", {winner['ratio']:.2f}× {winner['runner_up']}, the runner-up"
    return text


def _rate(row: dict[str, Any]) -> str:
    text = f"{row['throughput_per_s']:,.1f}"
    if row["repeats"] > 1:
        text += f" ({row['throughput_min_per_s']:,.0f}–{row['throughput_max_per_s']:,.0f})"
    return text


def _cells(row: dict[str, Any]) -> list[str]:
    lat = row["latency_ms"]
    pct = row["pct_of_limit"]
    return [str(row["jobs_ok"]), str(row["jobs_failed"]), _rate(row),
            "-" if pct is None else f"{pct:.0f} %", f"{lat['p50']:.0f}", f"{lat['p95']:.0f}", f"{lat['p99']:.0f}",
            f"{row['worker_cpu_ms_per_job']:.2f}", f"{row['peak_rss_mb']:.0f}"]


def _slots(row: dict[str, Any]) -> str:
    return str(row["concurrency"]) + (f"×{row['processes']}" if row["processes"] > 1 else "")


def _vs_stock(row: dict[str, Any]) -> list[str]:
    ratios = row.get("vs_stock")
    if not ratios:
        return ["-", "-"]
    return [f"{ratios['throughput']:.2f}×", f"{ratios['per_cpu']:.2f}×"]


def render_table(doc: dict[str, Any]) -> Table:
    """One row per pool; with a baseline, the same pool on stock Celery right below it, and why it failed."""
    baseline: dict[str, Any] = doc.get("baseline") or {}
    stock = {row["pool"]: row for row in baseline["summary"]} if baseline else {}
    failures = [f"{row['pool']} ({baseline['system']}) failed {row['failed_repeats']} of {row['repeats']}: "
                f"{row['error']}" for row in stock.values() if row["error"]]
    table = Table(title=title(doc), caption="\n".join([verdict(doc), *failures]))
    for column in (*COLUMNS, *(BASELINE_COLUMNS if baseline else ())):
        table.add_column(column, justify="left" if column == "pool" else "right")
    for row in doc["summary"]:
        vs_best = "-" if row["vs_best"] is None else f"{row['vs_best']:.2f}×"
        table.add_row(row["pool"], _slots(row), *_cells(row), vs_best, *(_vs_stock(row) if baseline else ()))
        base = stock.get(row["pool"])
        if base is not None:
            name = f"  └ {baseline['system']}" + (" FAILED" if base["error"] else "")
            table.add_row(name, _slots(base), *_cells(base), "", "", "", style="red" if base["error"] else "dim")
    return table
