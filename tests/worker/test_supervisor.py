"""``loopline worker --processes N``: N real workers under one supervisor that forwards signals and restarts."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from waiting import wait_until

from loopline.bench.procs import Child, spawn
from tasks import io_sleep

READY_TIMEOUT_S = 60.0


def _children(sup: Child) -> list[psutil.Process]:
    try:
        return psutil.Process(sup.pid).children()
    except psutil.NoSuchProcess:
        return []




@pytest.fixture
def supervisor(tmp_path: Path, queue: str) -> Iterator[Child]:
    log_path = tmp_path / "supervisor.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed by Child.stop
    popen = subprocess.Popen(
        [sys.executable, "-m", "loopline", "worker", "--pool", "asyncio", "-c", "10", "--processes", "2",
         "-Q", queue],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
    )
    child = Child(name="supervisor", popen=popen, log_path=log_path, _log=log)
    try:
        yield child
    finally:
        pids = [p.pid for p in _children(child)]
        child.stop(grace_s=30)
        for pid in pids:
            if psutil.pid_exists(pid):
                psutil.Process(pid).kill()


@pytest.mark.timeout(150)
def test_processes_run_restart_and_stop_together(supervisor: Child, queue: str) -> None:
    wait_until(lambda: supervisor.log_text().count(" ready.") >= 2, READY_TIMEOUT_S, "two workers ready",
               child=supervisor)
    first = {p.pid for p in _children(supervisor)}
    assert len(first) == 2

    results = [io_sleep.apply_async((50,), queue=queue) for _ in range(40)]
    assert all(r.get(timeout=60)["slept_ms"] == 50 for r in results)

    victim = sorted(first)[0]
    psutil.Process(victim).kill()
    wait_until(lambda: len({p.pid for p in _children(supervisor)} - first) == 1, READY_TIMEOUT_S,
               "a replacement child", child=supervisor)
    wait_until(lambda: supervisor.log_text().count(" ready.") >= 3, READY_TIMEOUT_S, "the replacement ready",
               child=supervisor)
    assert "restarting in" in supervisor.log_text()
    assert io_sleep.apply_async((5,), queue=queue).get(timeout=60)["slept_ms"] == 5

    children = _children(supervisor)
    assert supervisor.stop(grace_s=60, signum=signal.SIGTERM) == 0
    assert not any(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)


def test_processes_is_refused_for_prefork(tmp_path: Path) -> None:
    # As a Child: were the refusal to regress, the supervisor and any workers it started are killed, tree and all.
    child = spawn("refused supervisor", [sys.executable, "-m", "loopline", "worker", "--pool", "prefork",
                                          "--processes", "2"], tmp_path / "refused.log", None)
    try:
        child.popen.wait(60)
    finally:
        child.kill_tree()
    assert child.exit_code == 2
    assert "--processes" in child.log_text()
