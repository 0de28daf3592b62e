"""loopline.bench.report: the table and the verdict line, drawn from a run document's summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console

from loopline.bench.report import COLUMNS, render_table, title, verdict


def row(pool: str, rate: float, *, processes: int = 1, repeats: int = 1,
        limit: float | None = 1000.0) -> dict[str, Any]:
    return {"pool": pool, "concurrency": 100, "processes": processes, "repeats": repeats, "jobs_ok": 290,
            "jobs_failed": 10, "throughput_per_s": rate, "throughput_min_per_s": rate - 5,
            "throughput_max_per_s": rate + 5, "little_limit_per_s": limit,
            "pct_of_limit": None if limit is None else 100 * rate / limit,
            "latency_ms": {"p50": 101.2, "p95": 120.4, "p99": 150.9, "max": 170.0},
            "worker_cpu_ms_per_job": 2.345, "peak_rss_mb": 81.4, "vs_best": None}


def doc(rows: list[dict[str, Any]], **workload: Any) -> dict[str, Any]:
    best = max(r["throughput_per_s"] for r in rows)
    for r in rows:
        r["vs_best"] = r["throughput_per_s"] / best
    ranked = sorted(rows, key=lambda r: -r["throughput_per_s"])
    winner = {"pool": ranked[0]["pool"], "throughput_per_s": ranked[0]["throughput_per_s"]}
    if len(ranked) > 1:
        winner.update(runner_up=ranked[1]["pool"], ratio=ranked[0]["throughput_per_s"] / ranked[1]["throughput_per_s"])
    w = {"task": "fetch_url", "jobs": 300, "latency_ms": 100.0, "jitter_ms": 0.0, "error_rate": 0.0,
         "payload_bytes": 256, "pools": [r["pool"] for r in rows], "repeats": 1, **workload}
    return {"workload": w, "summary": rows, "winner": winner}


def text_of(document: dict[str, Any]) -> str:
    console = Console(width=200, record=True, color_system=None)
    console.print(render_table(document))
    return console.export_text()


def test_table_shows_every_column_and_pool_with_the_verdict() -> None:
    out = text_of(doc([row("gevent", 195.1), row("asyncio", 447.0, processes=2)]))
    for column in COLUMNS:
        assert column in out
    assert "300 × fetch_url, 100 ms latency" in out
    asyncio_line = next(line for line in out.splitlines() if "asyncio" in line and "│" in line)
    assert "100×2" in asyncio_line and "447.0" in asyncio_line and "45 %" in asyncio_line
    assert "1.00×" in asyncio_line and "151" in asyncio_line and "2.35" in asyncio_line
    assert "0.44×" in out
    assert "asyncio won with 447.0 jobs/s, 2.29× gevent, the runner-up" in out


def test_repeats_show_the_min_max_range_and_a_missing_limit_shows_a_dash() -> None:
    out = text_of(doc([row("solo", 9.5, repeats=3, limit=None)], repeats=3, jitter_ms=20.0, error_rate=0.02))
    assert "9.5 (4–14)" in out
    assert "median of 3 repeats" in out and "± 20" in out and "2 % errors" in out
    solo_line = next(line for line in out.splitlines() if "solo" in line and "│" in line)
    assert "│          - │" in solo_line or " - " in solo_line


def test_title_and_verdict_without_a_winner() -> None:
    document = doc([row("prefork", 70.0)])
    assert title(document) == "300 × fetch_url, 100 ms latency"
    assert verdict(document) == "prefork won with 70.0 jobs/s"
    assert verdict({**document, "winner": None}) == "no pool finished a job"


def test_baseline_rows_and_ratio_columns_and_a_failure_in_the_caption() -> None:
    from loopline.bench.report import BASELINE_COLUMNS

    ours = row("gevent", 240.0) | {"worker_cpu_ms_per_job": 4.0, "vs_stock": {"throughput": 2.0, "per_cpu": 2.1}}
    async_ours = row("asyncio", 900.0) | {"vs_stock": None}
    document = doc([ours, async_ours])
    stock_gevent = row("gevent", 120.0) | {"worker_cpu_ms_per_job": 8.4, "error": None, "failed_repeats": 0}
    why = "asyncio: 250 of 300 jobs never finished (no job finished for 60 s)"
    stock_asyncio = row("asyncio", 50.0) | {"error": why, "failed_repeats": 1}
    document["baseline"] = {"system": "stock", "results": [], "summary": [stock_gevent, stock_asyncio]}
    out = text_of(document)
    for column in BASELINE_COLUMNS:
        assert column in out
    lines = [line for line in out.splitlines() if "│" in line]
    gevent_at = next(i for i, line in enumerate(lines) if "│ gevent" in line)
    assert "2.00×" in lines[gevent_at] and "2.10×" in lines[gevent_at]
    assert "└ stock" in lines[gevent_at + 1] and "120.0" in lines[gevent_at + 1] and "8.40" in lines[gevent_at + 1]
    assert "FAILED" not in lines[gevent_at + 1]
    asyncio_at = next(i for i, line in enumerate(lines) if "│ asyncio" in line)
    assert "└ stock FAILED" in lines[asyncio_at + 1]
    assert "asyncio (stock) failed 1 of 1: asyncio: 250 of 300 jobs never finished" in out


def test_no_baseline_columns_without_a_baseline() -> None:
    from loopline.bench.report import BASELINE_COLUMNS

    out = text_of(doc([row("gevent", 195.1)]))
    assert not any(column in out for column in BASELINE_COLUMNS) and "stock" not in out
