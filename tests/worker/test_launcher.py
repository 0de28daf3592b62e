"""Tests for loopline.worker.launcher: the ``celery worker`` argv and environment built for each pool."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from celery import _find_option_with_arg

from loopline.worker.launcher import APP, ASYNCIO_POOL, POOLS, worker_command, worker_env


def _value_after(argv: list[str], option: str) -> str:
    assert argv.count(option) == 1, argv
    return argv[argv.index(option) + 1]


def test_every_pool_of_the_design_is_offered() -> None:
    assert {"prefork", "threads", "gevent", "asyncio"} <= set(POOLS)
    for name, choice in POOLS.items():
        assert choice.name == name
        assert choice.default_concurrency >= 1
        assert choice.advice


@pytest.mark.parametrize("pool", list(POOLS))
def test_argv_for_each_pool(pool: str) -> None:
    choice = POOLS[pool]
    argv = worker_command(pool)
    assert argv[:3] == [sys.executable, "-m", "celery"]
    # The app option belongs to the `celery` group, so it must come before the subcommand.
    assert argv[3:6] == ["-A", APP, "worker"]
    assert _value_after(argv, "-P") == choice.celery_pool
    assert _value_after(argv, "-c") == str(choice.default_concurrency)
    assert _value_after(argv, "--loglevel") == "INFO"
    assert "-E" in argv
    assert "-Q" not in argv
    assert "--autoscale" not in argv
    # What celery.__main__ reads before anything imports socket: it decides whether gevent patches.
    assert _find_option_with_arg(argv[3:], ["-P"], ["--pool"]) == choice.celery_pool


def test_gevent_goes_through_the_command_line() -> None:
    argv = worker_command("gevent", 200)
    i = argv.index("-P")
    assert argv[i:i + 2] == ["-P", "gevent"]
    assert _value_after(argv, "-c") == "200"


def test_asyncio_runs_as_celery_custom_pool_named_in_the_environment() -> None:
    from loopline.concurrency.asyncio import TaskPool

    assert _value_after(worker_command("asyncio", 10), "-P") == "custom"
    assert worker_env("asyncio") == {"CELERY_CUSTOM_WORKER_POOL": ASYNCIO_POOL}
    module, _, attr = ASYNCIO_POOL.partition(":")
    assert getattr(sys.modules[module], attr) is TaskPool


@pytest.mark.parametrize("pool", [p for p in POOLS if p != "asyncio"])
def test_stock_pools_need_no_environment(pool: str) -> None:
    assert worker_env(pool) == {}


def test_queues_are_joined_with_commas() -> None:
    assert _value_after(worker_command("threads", 4, queues=["a", "b.c", "d"]), "-Q") == "a,b.c,d"
    assert _value_after(worker_command("threads", 4, queues=("only",)), "-Q") == "only"


def test_autoscale_is_passed() -> None:
    assert _value_after(worker_command("prefork", 4, autoscale="10,3"), "--autoscale") == "10,3"


def test_loglevel_and_extra_arguments() -> None:
    argv = worker_command("solo", 1, loglevel="DEBUG", extra=["--without-mingle", "--without-gossip"])
    assert _value_after(argv, "--loglevel") == "DEBUG"
    assert argv[-2:] == ["--without-mingle", "--without-gossip"]


@pytest.mark.parametrize("pool", list(POOLS))
def test_default_node_name_contains_the_pool(pool: str) -> None:
    node = _value_after(worker_command(pool, 1), "-n")
    assert node.startswith(f"{pool}-")
    assert node.endswith("@%h")


def test_explicit_node_name_is_kept() -> None:
    assert _value_after(worker_command("threads", 2, hostname="edge1@box"), "-n") == "edge1@box"


def test_unknown_pool_raises_value_error_listing_the_pools() -> None:
    with pytest.raises(ValueError, match="unknown pool 'eventlet'") as info:
        worker_command("eventlet", 4)
    for name in POOLS:
        assert name in str(info.value)


@pytest.mark.parametrize("concurrency", [0, -1])
def test_concurrency_below_one_raises_value_error(concurrency: int) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        worker_command("threads", concurrency)


def test_exec_worker_replaces_the_process_and_adds_the_environment() -> None:
    child = "import os; print(os.getpid(), os.environ['LOOPLINE_LAUNCH_PROBE'], os.environ['LOOPLINE_KEPT'])"
    script = ("import sys; from loopline.worker.launcher import exec_worker; "
              f"exec_worker([sys.executable, '-c', {child!r}], {{'LOOPLINE_LAUNCH_PROBE': 'yes'}})")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "LOOPLINE_KEPT": "kept"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err.decode()
    # Same pid: the worker replaced the launcher, so signals sent to it reach Celery directly.
    assert out.decode().split() == [str(proc.pid), "yes", "kept"]
