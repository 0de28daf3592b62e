"""The ``loopline`` command: one subcommand per thing a user does, each with a ``--help`` that explains it."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from loopline.settings import ConfigError, Settings

__all__ = ["build_parser", "main"]

# soft_wrap: an error stays one line whatever the terminal width (or none, when piped).
console = Console(stderr=True, soft_wrap=True)


def _settings() -> Settings:
    return Settings.from_env()


# -- redis ------------------------------------------------------------------------------------------------

def cmd_redis(args: argparse.Namespace) -> int:
    from loopline.embedded_redis import EmbeddedRedis

    server = EmbeddedRedis(_settings().home.resolve())
    if args.action == "up":
        started = server.up()
        print(started.url)
        console.print(f"Redis is up (pid {started.pid}, files in {started.home}); `loopline redis down` stops it.")
    elif args.action == "down":
        console.print("stopped" if server.down() else "no loopline Redis was running")
    else:
        status = server.status()
        if status is None:
            console.print(f"no loopline Redis under {server.home}; start one with `loopline redis up`")
            return 1
        print(json.dumps({"url": status.url, "pid": status.pid, "binary": status.binary,
                          "home": str(status.home), "aof": status.aof}))
    return 0


# -- worker -----------------------------------------------------------------------------------------------

def cmd_worker(args: argparse.Namespace) -> int:
    from loopline.cli.apps import load_app
    from loopline.worker.launcher import exec_worker, worker_command, worker_env

    load_app(args.app)  # fail here, with a one-line reason, rather than inside Celery

    def argv_for(index: int | None) -> list[str]:
        hostname = args.hostname
        if index is not None:
            name, at, host = (hostname or f"{args.pool}-{os.getpid()}@%h").partition("@")
            hostname = f"{name}-{index}{at}{host}"
        return worker_command(args.pool, args.concurrency, app=args.app, queues=args.queues or (),
                              loglevel=args.loglevel, hostname=hostname, autoscale=args.autoscale)

    if args.processes == 1:
        exec_worker(argv_for(None), worker_env(args.pool))
    if args.pool in ("prefork", "solo"):
        raise ValueError(f"--processes is for the in-process pools (asyncio, gevent, threads); {args.pool} "
                         "already runs one process per slot or only one at all")
    from loopline.worker.supervisor import Supervisor

    logging.basicConfig(level=args.loglevel, format="[%(asctime)s: %(levelname)s/supervisor] %(message)s")
    return Supervisor(argv_for, args.processes, worker_env(args.pool)).run()


def _worker_help() -> str:
    from loopline.worker.launcher import POOLS

    lines = ["pools:"]
    for choice in POOLS.values():
        default = "the number of CPUs" if choice.name == "prefork" else choice.default_concurrency
        lines.append(f"  {choice.name:<8} (default -c {default}) {choice.advice}")
    lines += ["", "The worker runs `celery -A APP worker` with events on (-E); an app with loopline installed (the",
              "default one is) acks late and accepts JSON only.",
              "SIGTERM: warm shutdown (running jobs finish). SIGQUIT: cold shutdown (unacked jobs are redelivered)."]
    return "\n".join(lines)


# -- enqueue ----------------------------------------------------------------------------------------------

def cmd_enqueue(args: argparse.Namespace) -> int:
    from loopline.app.producer import release_result_subscriptions
    from loopline.cli.apps import load_app
    from loopline.cli.enqueue import jobs_from_args, send, wait

    jobs = jobs_from_args(args.task, args.values, args.file, args.payload, args.secret)
    app = load_app(args.app)
    try:
        results = send(app, jobs, args.queue)
        if not args.wait:
            for res in results:
                print(res.id)
            return 0
        failed = 0
        for task_id, state, value in wait(results, args.timeout_s):
            failed += state != "SUCCESS"
            print(json.dumps({"id": task_id, "state": state, "result": value}, default=str))
        return 1 if failed else 0
    finally:
        release_result_subscriptions(app)


# -- flower -----------------------------------------------------------------------------------------------

def cmd_flower(args: argparse.Namespace) -> int:
    from loopline.cli.apps import load_app
    from loopline.worker.launcher import exec_worker

    settings = _settings()
    load_app(args.app)  # resolve the broker now, with a clear message if there is none

    env = {}
    if settings.flower_auth:
        # Through the environment, not argv: a password on the command line shows in `ps`.
        env["FLOWER_BASIC_AUTH"] = settings.flower_auth
    elif args.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] Flower on {args.host} without LOOPLINE_FLOWER_AUTH is open to anyone "
                      "who can reach that address")
    # `celery -A APP flower ...`, run by serve_flower so that Flower answers a refused job with 400.
    argv = [sys.executable, "-c", "import loopline.cli as c; c.serve_flower()", "-A", args.app, "flower",
            f"--address={args.host}", f"--port={args.port}"]
    console.print(f"Flower on http://{args.host}:{args.port}/")
    exec_worker(argv, env)


def serve_flower() -> None:
    """Run ``celery <sys.argv[1:]>`` (the flower command) with InvalidJob answered as 400 and its reason.

    Flower calls ``apply_async`` through ``flower.utils.blocking.BlockingOperationRunner.run`` (from
    ``flower.api.tasks.TaskApply.post`` and ``TaskAsyncApply.post``), which turns any exception but a broken
    connection into a bare 500 and logs its traceback. ``flower.app.Flower`` builds its runner from the name
    in ``flower.app`` when it starts; the subclass there passes a job the task refused back as a 400.
    """
    import flower.app
    from celery.bin.celery import main as celery_main
    from flower.utils.blocking import BlockingOperationRunner
    from tornado.web import HTTPError

    from loopline.errors import InvalidJob

    class Runner(BlockingOperationRunner):
        async def run(self, operation: str, target: str, func: Any, *args: Any, **kwargs: Any) -> Any:
            refused: list[InvalidJob] = []

            def call(*call_args: Any, **call_kwargs: Any) -> Any:
                try:
                    return func(*call_args, **call_kwargs)
                except InvalidJob as exc:
                    refused.append(exc)
                    return None

            result = await super().run(operation, target, call, *args, **kwargs)
            if refused:
                raise HTTPError(400, "%s", refused[0])
            return result

    flower.app.BlockingOperationRunner = Runner
    sys.argv = ["celery", *sys.argv[1:]]
    sys.exit(celery_main())


# -- bench ------------------------------------------------------------------------------------------------

def cmd_bench(args: argparse.Namespace) -> int:
    from loopline.cli.bench import run_from_args

    return run_from_args(args)


# -- dashboard --------------------------------------------------------------------------------------------

def cmd_dashboard(args: argparse.Namespace) -> int:
    from loopline.cli.dashboard import run_from_args

    return run_from_args(args)


# -- dlq --------------------------------------------------------------------------------------------------

def cmd_dlq(args: argparse.Namespace) -> int:
    from loopline.cli.dlq import run_from_args

    return run_from_args(args)


def _positive_seconds(text: str) -> float:
    """An argparse type: a finite number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


# -- limits -----------------------------------------------------------------------------------------------

def cmd_limits(args: argparse.Namespace) -> int:
    from loopline.cli.limits import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; tests and the docker-compose check parse commands with it."""
    parser = argparse.ArgumentParser(
        prog="loopline",
        description="Run I/O-bound jobs through Celery under the pool that fits: prefork, threads, gevent, asyncio.\n"
                    "With LOOPLINE_BROKER_URL unset, worker, enqueue, flower and dlq use the Redis that "
                    "`loopline redis up` starts;\n"
                    "bench starts its own when none runs, and dashboard works without one.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from loopline.cli.apps import add_app_argument

    p = sub.add_parser("redis", help="start, stop or show the embedded Redis",
                       description="The embedded Redis: a redis-server on a free 127.0.0.1 port, files (append-only "
                                   "log included) under LOOPLINE_HOME (default .loopline/). Used when "
                                   "LOOPLINE_BROKER_URL is unset.")
    p.add_argument("action", choices=("up", "down", "status"), help="up: start (idempotent), prints its URL; "
                   "down: stop; status: print its URL and pid as JSON, exit 1 if none runs")
    p.set_defaults(func=cmd_redis)

    from loopline.worker.launcher import POOLS

    p = sub.add_parser("worker", help="run a Celery worker under a chosen pool",
                       description="Run a Celery worker for loopline's tasks, or for your own app's with -A.",
                       epilog=_worker_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", "-P", choices=tuple(POOLS), default="prefork", help="execution pool (see below)")
    p.add_argument("--concurrency", "-c", type=int, help="task slots (default depends on the pool)")
    p.add_argument("--queues", "-Q", type=lambda s: [q for q in s.split(",") if q],
                   help="comma-separated queues to consume (default: celery)")
    p.add_argument("--loglevel", "-l", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                   type=str.upper, help="worker log level (default: INFO; LOOPLINE_TASK_LOG=0 drops the line per "
                   "job)")
    p.add_argument("--hostname", "-n", help="node name (default POOL-PID@HOST)")
    p.add_argument("--autoscale", metavar="MAX,MIN", help="let Celery grow/shrink the pool between MIN and MAX")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="run N worker processes (each with its own consumer and -c slots) under one supervisor "
                        "that forwards signals and restarts a child that dies; for asyncio, gevent, threads "
                        "(refused for prefork and solo) (default: 1)")
    add_app_argument(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("enqueue", help="send jobs and print their ids (or results with --wait)",
                       description="Send jobs. fetch_url and deliver_webhook take URLs, io_sleep takes milliseconds.",
                       epilog="examples:\n  loopline enqueue fetch_url https://example.org/ --wait\n"
                              "  loopline enqueue fetch_url --file urls.txt\n"
                              "  loopline enqueue deliver_webhook https://hooks.example/x --payload '{\"a\": 1}' "
                              "--secret s3cret\n  loopline enqueue io_sleep 100 250",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=("fetch_url", "deliver_webhook", "io_sleep"))
    p.add_argument("values", nargs="*", help="URLs, or milliseconds for io_sleep")
    p.add_argument("--file", type=Path, help="read one URL per line from this file ('-' for stdin; # comments)")
    p.add_argument("--payload", help="JSON body for deliver_webhook (default: {})")
    p.add_argument("--secret", help="HMAC secret for deliver_webhook signatures")
    p.add_argument("--queue", help="queue to send to (default: celery)")
    p.add_argument("--wait", action="store_true", help="wait for each job and print its result as a JSON line; "
                   "exit 1 if any job did not succeed")
    p.add_argument("--timeout-s", type=_positive_seconds, default=60.0,
                   help="with --wait: how long to wait per job (default: %(default)s)")
    add_app_argument(p)
    p.set_defaults(func=cmd_enqueue)

    p = sub.add_parser("flower", help="run Flower, the live Celery monitor, for this broker",
                       description="Run Flower against the configured broker. Bound to 127.0.0.1 unless --host says "
                                   "otherwise; LOOPLINE_FLOWER_AUTH=user:password turns on basic auth.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=5555, help="port (default: %(default)s)")
    add_app_argument(p)
    p.set_defaults(func=cmd_flower)

    from loopline.cli.bench import add_bench_arguments

    p = sub.add_parser("bench", help="time each pool on the same workload and print a comparison table",
                       description="Fill a queue, start one worker per pool in turn, time it from the first job "
                                   "started to the last done, and compare. Starts its own HTTP target on "
                                   "127.0.0.1 and, with LOOPLINE_BROKER_URL unset, its own Redis.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from loopline.cli.dashboard import add_dashboard_arguments

    p = sub.add_parser("dashboard", help="serve the pool comparison of past and running benchmarks",
                       description="Serve a page that compares pools for each `loopline bench` run in --results: "
                                   "throughput against the Little's-law limit, latency, CPU and memory, live while "
                                   "a bench runs; plus a JSON API (/api/runs) and CSV export. Bound to 127.0.0.1 "
                                   "unless --host says otherwise; LOOPLINE_DASHBOARD_AUTH=user:password turns on "
                                   "basic auth.")
    add_dashboard_arguments(p)
    p.set_defaults(func=cmd_dashboard)

    from loopline.cli.dlq import DESCRIPTION, add_dlq_arguments

    p = sub.add_parser("dlq", help="list, show, replay or purge dead-lettered jobs", description=DESCRIPTION)
    add_dlq_arguments(p)
    add_app_argument(p)
    p.set_defaults(func=cmd_dlq)

    from loopline.cli.limits import DESCRIPTION as LIMITS_DESCRIPTION
    from loopline.cli.limits import add_limits_arguments

    p = sub.add_parser("limits", help="set, list or clear per-host rate and concurrency limits",
                       description=LIMITS_DESCRIPTION)
    add_limits_arguments(p)
    add_app_argument(p)
    p.set_defaults(func=cmd_limits)
    return parser


def main(argv: list[str] | None = None) -> None:
    from kombu.exceptions import KombuError  # e.g. loopline.errors.RedisUnavailable from `enqueue`

    args = build_parser().parse_args(argv)
    try:
        code: Any = args.func(args)
    except (ConfigError, ValueError, OSError, RuntimeError, KombuError) as exc:
        console.print(f"[red]loopline {args.command}: error:[/] {escape(str(exc))}")
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
