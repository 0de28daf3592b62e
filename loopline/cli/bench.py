"""``loopline bench``: run the same workload through each pool, show progress, print the table, write the run file."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from loopline.bench.jobs import PoolResult, Workload
from loopline.bench.record import RunFile, machine_info, new_run_id
from loopline.bench.report import render_table

__all__ = ["DEFAULT_CONCURRENCY", "MAX_PREFORK_CONCURRENCY", "Plan", "add_bench_arguments", "parse_concurrency",
           "plan_from_args", "run_from_args"]

DEFAULT_CONCURRENCY = {"prefork": 8, "threads": 100, "gevent": 200, "asyncio": 200, "solo": 1}
# One OS process per prefork slot (~70 MB each): a bare "--concurrency 1000" must not fork a thousand.
MAX_PREFORK_CONCURRENCY = 64
SINGLE_PROCESS_POOLS = ("prefork", "solo")
TASKS = ("fetch_url", "io_sleep", "deliver_webhook")
# A fixed width when piped (CI logs, README), so the table is never squeezed into 80 columns.
console = Console(width=None if sys.stdout.isatty() else 170)


def parse_concurrency(spec: str | None, pools: list[str]) -> dict[str, int]:
    """``"1000"`` for every pool, ``"prefork=8,gevent=1000"`` per pool, or both: ``"1000,prefork=8"``."""
    chosen = {pool: DEFAULT_CONCURRENCY.get(pool, 100) for pool in pools}
    for part in (spec or "").split(","):
        pool, eq, value = part.strip().partition("=")
        if not eq and pool.isdigit() and int(pool) >= 1:
            chosen = dict.fromkeys(pools, int(pool))
        elif pool in chosen and value.isdigit() and int(value) >= 1:
            chosen[pool] = int(value)
        elif part.strip():
            raise ValueError(f"--concurrency: cannot use {part!r}; give N, POOL=N or both (N,POOL=N) for pools in "
                             f"{','.join(pools)}")
    if chosen.get("prefork", 0) > MAX_PREFORK_CONCURRENCY:
        raise ValueError(f"--concurrency: prefork={chosen['prefork']} would fork that many processes; give at most "
                         f"prefork={MAX_PREFORK_CONCURRENCY}, e.g. --concurrency {chosen['prefork']},prefork=8")
    return chosen


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    from loopline.worker.launcher import POOLS

    p.add_argument("--pools", default="prefork,threads,gevent,asyncio",
                   help=f"comma-separated pools to compare, from {','.join(POOLS)} (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=300, help="jobs per pool and repeat (default: %(default)s)")
    p.add_argument("--latency-ms", type=float, default=100.0, help="target response time, or io_sleep's sleep "
                   "(default: 100)")
    p.add_argument("--concurrency", help="N for every pool, POOL=N,..., or N,POOL=N (defaults: "
                   + ",".join(f"{k}={v}" for k, v in DEFAULT_CONCURRENCY.items()) + ")")
    p.add_argument("--jitter-ms", type=float, default=0.0, help="target latency varies uniformly by ± this")
    p.add_argument("--error-rate", type=float, default=0.0, help="share of target answers that are HTTP 500, 0-1")
    p.add_argument("--payload-bytes", type=int, default=256, help="target response body size (default: 256)")
    p.add_argument("--task", choices=TASKS, default="fetch_url", help="the job (default: %(default)s)")
    p.add_argument("--repeat", type=int, default=1, help="runs per pool; the table shows medians (default: 1)")
    p.add_argument("--processes", type=int, default=1, help="worker processes for asyncio, gevent and threads "
                   "(`loopline worker --processes`); prefork and solo always run one (default: 1)")
    p.add_argument("--task-log", action="store_true",
                   help="workers log Celery's INFO line for each received and finished job; off by default, as at "
                   "Celery's own default level (WARNING): two lines per job cost an asyncio worker 7 %% to a "
                   "quarter of its CPU")
    p.add_argument("--baseline", choices=("stock",),
                   help="also run each pool on a plain Celery app (Celery's defaults, no loopline transport, backend, "
                   "consumer or sizing; requests bodies, aiohttp on loopline's asyncio pool), right after the same "
                   "pool, and show both; where stock fails the table says why. One process per pool")
    p.add_argument("--hosts", type=int, default=1, metavar="N",
                   help="spread the jobs round-robin over N loopback host names, 127.0.0.1 ... 127.0.0.N (the "
                        "target listens on each), to see per-host limits at work (default: 1)")
    p.add_argument("--host-rate", metavar="RATE",
                   help="with --hosts: a per-host rule (N/s, N/m, N/h) for every host but 127.0.0.1 during the run, "
                        "removed after it, so one host runs free while the others are limited")
    p.add_argument("--out", type=Path, default=Path("results"), help="where run files go (default: results/)")


@dataclass(frozen=True)
class Plan:
    """A checked command line: which pools, at what concurrency, how many processes and repeats."""

    pools: list[str]
    concurrency: dict[str, int]
    processes: dict[str, int]
    repeats: int
    task_log: bool = False
    baseline: str | None = None

    def command(self, args: argparse.Namespace) -> str:
        """The command that reproduces this run, every default spelled out."""
        return shlex.join([
            "loopline", "bench", "--pools", ",".join(self.pools), "--jobs", str(args.jobs),
            "--latency-ms", f"{args.latency_ms:g}", "--concurrency",
            ",".join(f"{p}={c}" for p, c in self.concurrency.items()), "--jitter-ms", f"{args.jitter_ms:g}",
            "--error-rate", f"{args.error_rate:g}", "--payload-bytes", str(args.payload_bytes), "--task", args.task,
            "--repeat", str(self.repeats), "--processes", str(args.processes),
            *(["--task-log"] if self.task_log else []),
            *(["--hosts", str(args.hosts)] if getattr(args, "hosts", 1) > 1 else []),
            *(["--host-rate", args.host_rate] if getattr(args, "host_rate", None) else []),
            *(["--baseline", self.baseline] if self.baseline else []),
        ])


def plan_from_args(args: argparse.Namespace) -> Plan:
    """Check every argument before anything starts; a ValueError names the bad one."""
    from loopline.worker.launcher import POOLS

    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    unknown = [p for p in pools if p not in POOLS]
    if not pools or unknown:
        raise ValueError(f"--pools: unknown pool(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(POOLS)}")
    if len(set(pools)) != len(pools):
        raise ValueError(f"--pools: {args.pools!r} names a pool twice; use --repeat to run one again")
    checks = [(args.jobs >= 1, "--jobs must be at least 1"), (args.latency_ms >= 0, "--latency-ms must be >= 0"),
              (args.jitter_ms >= 0, "--jitter-ms must be >= 0"),
              (0 <= args.error_rate <= 1, "--error-rate must be between 0 and 1"),
              (args.payload_bytes >= 0, "--payload-bytes must be >= 0"), (args.repeat >= 1, "--repeat must be >= 1"),
              (args.processes >= 1, "--processes must be >= 1"),
              (1 <= getattr(args, "hosts", 1) <= 250, "--hosts must be between 1 and 250"),
              (getattr(args, "host_rate", None) is None or getattr(args, "hosts", 1) > 1,
               "--host-rate needs --hosts 2 or more")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if getattr(args, "host_rate", None) is not None:
        from loopline.politeness.rules import parse_rate

        parse_rate(args.host_rate)  # a RuleError (a ValueError) says what is wrong
    processes = {p: 1 if p in SINGLE_PROCESS_POOLS else args.processes for p in pools}
    return Plan(pools, parse_concurrency(args.concurrency, pools), processes, args.repeat,
                task_log=bool(getattr(args, "task_log", False)), baseline=getattr(args, "baseline", None))


def _ensure_broker(stack: ExitStack) -> None:
    """Use the configured broker, else the running embedded Redis, else start one for this run only."""
    from loopline.embedded_redis import EmbeddedRedis, running_url
    from loopline.settings import Settings

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


def _allow_loopback(addresses: list[str]) -> None:
    """The benchmark's target listens on 127.0.0.1 (...), which the URL guard refuses unless allowlisted."""
    entries = [e for e in os.environ.get("LOOPLINE_URL_ALLOWLIST", "").split(",") if e.strip()]
    missing = [a for a in addresses if a not in entries]
    if missing:
        os.environ["LOOPLINE_URL_ALLOWLIST"] = ",".join([*entries, *missing])


@contextmanager
def _host_rules(addresses: list[str], rate: str | None) -> Iterator[None]:
    """``rate`` for every address but the first while the run lasts (in the broker's Redis), then removed."""
    if rate is None:
        yield
        return
    import redis

    from loopline.app.default import app
    from loopline.politeness.engine import redis_url_of
    from loopline.politeness.rules import Rule, RuleStore

    client = redis.Redis.from_url(redis_url_of(app), socket_timeout=10)
    store = RuleStore(client)
    try:
        for address in addresses[1:]:
            store.set(address, Rule(rate=rate))
        yield
    finally:
        for address in addresses[1:]:
            store.clear(address)
        client.close()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so a killed bench still stops its workers, target and Redis."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _redis_version() -> str | None:
    from loopline.app.default import app

    info = app.backend.client.info("server")
    return str(info.get("redis_version")) if info.get("redis_version") else None


def run_from_args(args: argparse.Namespace) -> int:
    plan = plan_from_args(args)
    from loopline.bench.procs import start_target
    from loopline.bench.target import host_addresses

    addresses = host_addresses(getattr(args, "hosts", 1))
    _allow_loopback(addresses)
    with ExitStack() as stack, _sigterm_as_interrupt():
        _ensure_broker(stack)
        stack.enter_context(_host_rules(addresses, getattr(args, "host_rate", None)))
        run_id = new_run_id()
        # Kept when the run fails (the error names the worker's log there), removed otherwise.
        log_dir = args.out / f"{run_id}.logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        target, url = start_target(args.latency_ms, jitter_ms=args.jitter_ms, error_rate=args.error_rate,
                                   payload_bytes=args.payload_bytes, log_path=log_dir / "target.log",
                                   addresses=addresses)
        stack.callback(target.stop, 5)
        workload = Workload(args.task, args.jobs, args.latency_ms, url, args.jitter_ms, args.error_rate,
                            args.payload_bytes, hosts=len(addresses), host_rate=getattr(args, "host_rate", None))
        run = RunFile(args.out, workload, pools=plan.pools, repeats=plan.repeats, command=plan.command(args),
                      machine=machine_info(_redis_version()), run_id=run_id, baseline=plan.baseline)
        run.write()
        console.print(f"run [bold]{run.run_id}[/]: {run.path} (follow it live with `loopline dashboard`)")
        try:
            _run_pools(plan, workload, run, log_dir)
        except KeyboardInterrupt:
            run.finish("interrupted", "interrupted before every pool had run")
            shutil.rmtree(log_dir, ignore_errors=True)
            raise
        except Exception as exc:
            run.finish("failed", str(exc))
            raise
        run.finish("complete")
    baseline = run.doc["baseline"]
    if baseline is None or not any(entry["error"] for entry in baseline["results"]):
        shutil.rmtree(log_dir, ignore_errors=True)  # a failed baseline's message names its worker log
    console.print(render_table(run.doc))
    console.print(f"results: {run.path}")
    return 0


def _run_pools(plan: Plan, workload: Workload, run: RunFile, log_dir: Path) -> None:
    """Every repeat of every pool, in turn, with a progress bar per pool; each result goes into the run file."""
    from loopline.bench.baseline import BASELINES, LOOPLINE
    from loopline.bench.runner import RunFailed, run_pool

    systems = [LOOPLINE, *([BASELINES[plan.baseline]] if plan.baseline else [])]
    progress = Progress(TextColumn("{task.description:<16}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[rate]:>9,.1f} jobs/s"), TimeElapsedColumn(), console=console)
    bars = {(system.name, pool): progress.add_task(pool if system is LOOPLINE else f"{pool} ({system.name})",
                                                   total=workload.jobs * plan.repeats, rate=0.0, start=False)
            for pool in plan.pools for system in systems}
    with progress:
        for repeat in range(1, plan.repeats + 1):
            for pool in plan.pools:
                for system in systems:
                    bar = bars[system.name, pool]
                    progress.start_task(bar)
                    done_before = (repeat - 1) * workload.jobs
                    is_baseline = system is not LOOPLINE

                    def advance(result: PoolResult, bar: TaskID = bar, done_before: int = done_before,
                                is_baseline: bool = is_baseline) -> None:
                        progress.update(bar, completed=done_before + len(result.jobs), rate=result.throughput_per_s)
                        run.progress(result, baseline=is_baseline)

                    # Stock Celery runs one process: it has no --processes.
                    processes = plan.processes[pool] if system is LOOPLINE else 1
                    try:
                        result = run_pool(pool, plan.concurrency[pool], workload, log_dir=log_dir, repeat=repeat,
                                          processes=processes, on_progress=advance, system=system,
                                          env={"LOOPLINE_TASK_LOG": "1" if plan.task_log else "0"})
                    except RunFailed as exc:
                        if not is_baseline or exc.result is None:
                            raise
                        # Where stock Celery fails is a result: recorded and shown, and the run goes on.
                        console.print(f"[yellow]{pool} ({system.name}) failed:[/] {exc}")
                        run.add_baseline(exc.result, str(exc))
                        continue
                    if is_baseline:
                        run.add_baseline(result)
                    else:
                        run.add(result)
