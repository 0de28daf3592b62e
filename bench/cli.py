"""``loopline bench``: run the same workload through each pool and print the comparison table."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.runner import PoolResult, Workload, run_pool

__all__ = ["DEFAULT_CONCURRENCY", "add_bench_arguments", "parse_concurrency", "run_from_args"]

DEFAULT_CONCURRENCY = {"prefork": 8, "threads": 100, "gevent": 200, "asyncio": 200, "solo": 1}
# A fixed width when piped (CI logs, README), so the table is never squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 150)


def parse_concurrency(spec: str | None, pools: list[str]) -> dict[str, int]:
    """``"1000"`` for every pool, or ``"prefork=8,gevent=1000"`` per pool (others keep their default)."""
    chosen = {pool: DEFAULT_CONCURRENCY.get(pool, 100) for pool in pools}
    if not spec:
        return chosen
    if spec.isdigit():
        return dict.fromkeys(pools, int(spec))
    for part in spec.split(","):
        pool, _, value = part.partition("=")
        if pool not in chosen or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--concurrency: cannot use {part!r}; give N or POOL=N for pools in {','.join(pools)}")
        chosen[pool] = int(value)
    return chosen


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from workers.launcher import POOLS

    p.add_argument("--pools", default="prefork,threads,gevent,asyncio",
                   help=f"comma-separated pools to compare, from {','.join(POOLS)} (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=300, help="jobs per pool (default: %(default)s)")
    p.add_argument("--latency-ms", type=float, default=100.0, help="target server response time (default: 100)")
    p.add_argument("--concurrency", help="N for every pool, or POOL=N,... (defaults: "
                   + ",".join(f"{k}={v}" for k, v in DEFAULT_CONCURRENCY.items()) + ")")
    p.add_argument("--task", choices=("fetch_url", "io_sleep", "deliver_webhook"), default="fetch_url")


def _check(args: argparse.Namespace) -> tuple[list[str], dict[str, int]]:
    from workers.launcher import POOLS

    pools = [p for p in args.pools.split(",") if p]
    unknown = [p for p in pools if p not in POOLS]
    if not pools or unknown:
        raise ValueError(f"--pools: unknown pool(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(POOLS)}")
    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if args.latency_ms < 0:
        raise ValueError("--latency-ms must be >= 0")
    return pools, parse_concurrency(args.concurrency, pools)


def _ensure_broker(stack: ExitStack) -> None:
    """Use the configured broker, else the running embedded Redis, else start one for this run only."""
    from config.settings import Settings
    from embedded_redis import EmbeddedRedis, running_url

    settings = Settings.from_env()
    if settings.broker_url:
        return
    url = running_url(settings.home.resolve())
    if url is None:
        home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loopline-bench-")))
        server = EmbeddedRedis(home)
        url = server.up().url
        stack.callback(server.down)
    os.environ["LOOPLINE_BROKER_URL"] = url


def _allow_loopback() -> None:
    """The benchmark's target listens on 127.0.0.1, which the URL guard refuses unless allowlisted."""
    entries = [e for e in os.environ.get("LOOPLINE_URL_ALLOWLIST", "").split(",") if e.strip()]
    if "127.0.0.1" not in entries:
        os.environ["LOOPLINE_URL_ALLOWLIST"] = ",".join([*entries, "127.0.0.1"])


def run_from_args(args: argparse.Namespace) -> int:
    pools, concurrency = _check(args)
    from bench.procs import start_target

    _allow_loopback()
    results: list[PoolResult] = []
    with ExitStack() as stack:
        _ensure_broker(stack)
        log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loopline-logs-")))
        target, url = start_target(args.latency_ms, log_path=log_dir / "target.log")
        stack.callback(target.stop, 5)
        workload = Workload(task=args.task, jobs=args.jobs, latency_ms=args.latency_ms, target_url=url)
        progress = Progress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]:>8.1f} jobs/s"), TimeElapsedColumn(), console=console)
        with progress:
            for pool in pools:
                bar = progress.add_task(pool, total=args.jobs, rate=0.0)

                def advance(done: int, bar: TaskID = bar) -> None:
                    progress.advance(bar, done)
                    elapsed = progress.tasks[bar].elapsed or 1.0
                    progress.update(bar, rate=progress.tasks[bar].completed / elapsed)

                results.append(run_pool(pool, concurrency[pool], workload, log_dir=log_dir, on_progress=advance))
    console.print(render_table(results, workload))
    return 0


def render_table(results: list[PoolResult], workload: Workload) -> Table:
    best = max((r.throughput_per_s for r in results), default=0.0) or 1.0
    table = Table(title=f"{workload.jobs} × {workload.task}, {workload.latency_ms:g} ms latency")
    for column in ("pool", "concurrency", "ok", "failed", "wall s", "jobs/s", "% of limit", "p50 ms", "p95 ms",
                   "CPU ms/job", "peak RSS MB", "vs best"):
        table.add_column(column, justify="left" if column == "pool" else "right")
    for r in results:
        limit = r.concurrency / (workload.latency_ms / 1000) if workload.latency_ms else 0.0
        table.add_row(
            r.pool, str(r.concurrency), str(r.jobs_ok), str(r.jobs_failed), f"{r.wall_s:.2f}",
            f"{r.throughput_per_s:.1f}", f"{100 * r.throughput_per_s / limit:.0f} %" if limit else "-",
            f"{r.percentile_ms(50):.0f}", f"{r.percentile_ms(95):.0f}", f"{r.cpu_ms_per_job:.2f}",
            f"{r.peak_rss_mb:.0f}", f"{r.throughput_per_s / best:.2f}×",
        )
    return table
