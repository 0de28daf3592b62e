"""Child processes loopline starts for benchmarks, demos and tests: the HTTP target and workers.

Every start has a stop: ``Child.stop()`` sends SIGTERM, waits a grace period, then SIGKILLs the
whole process group, and is safe to call twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

__all__ = ["Child", "ChildFailed", "spawn", "start_bench", "start_dashboard", "start_target", "start_worker"]

logger = logging.getLogger(__name__)


class ChildFailed(RuntimeError):
    """A child process did not come up; the message holds the tail of its log."""


@dataclass
class Child:
    """A started subprocess in its own process group, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    _log: IO[bytes] | None = field(default=None, repr=False)
    exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def stop(self, grace_s: float = 15.0, signum: int = signal.SIGTERM) -> int:
        """Ask the child to stop, wait ``grace_s``, then kill its whole group. Returns the exit code."""
        if self.exit_code is not None:
            return self.exit_code
        if self.alive():
            os.kill(self.pid, signum)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %d) ignored signal %d for %.0f s; killing it", self.name, self.pid,
                               signum, grace_s)
        self._kill_group()
        self.exit_code = self.popen.wait()
        if self._log is not None:
            self._log.close()
        return self.exit_code

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill_tree(self) -> None:
        """Kill the child and every descendant at once, those in sessions of their own too (a hung bench's
        workers, target and Redis), which the group kill of :meth:`stop` does not reach."""
        for proc in self.tree():  # parents first: one that respawns children gets no chance to
            try:
                proc.kill()  # psutil checks the process is still the one listed: a reused pid is left alone
            except psutil.Error:
                pass
        self.stop(grace_s=0)

    def tree(self) -> list[psutil.Process]:
        """The child and all its descendants that are still alive."""
        try:
            proc = psutil.Process(self.pid)
            return [proc, *proc.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []


def _environment(changes: Mapping[str, str | None] | None) -> dict[str, str]:
    """This process's environment with ``changes`` applied; a None value removes the variable."""
    env = dict(os.environ)
    for key, value in (changes or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def spawn(name: str, argv: Sequence[str], log_path: Path | None, env: Mapping[str, str | None] | None,
          stdout_pipe: bool = False, cwd: Path | None = None) -> Child:
    """Start ``argv`` in a process group of its own, output to ``log_path``; None in ``env`` unsets."""
    log = open(log_path, "wb") if log_path is not None else None  # noqa: SIM115 - closed by Child.stop
    try:
        popen = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if stdout_pipe else (log or subprocess.DEVNULL),
            stderr=log or subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            env=_environment(env),
            start_new_session=True,
            cwd=cwd,
        )
    except BaseException:
        if log is not None:
            log.close()
        raise
    return Child(name=name, popen=popen, log_path=log_path, _log=log)


def start_target(latency_ms: float = 0.0, *, jitter_ms: float = 0.0, error_rate: float = 0.0,
                 payload_bytes: int = 256, log_path: Path | None = None,
                 addresses: Sequence[str] = ("127.0.0.1",)) -> tuple[Child, str]:
    """Start ``bench.target`` on a free loopback port; returns the child and its base URL (the first address).

    With several ``addresses`` it listens on each, same port: swap the address in the URL for another host."""
    argv = [sys.executable, "-m", "loopline.bench.target", "--port", "0", "--latency-ms", str(latency_ms),
            "--jitter-ms", str(jitter_ms), "--error-rate", str(error_rate), "--payload-bytes", str(payload_bytes),
            *(arg for address in addresses for arg in ("--address", address))]
    child = spawn("target", argv, log_path, None, stdout_pipe=True)
    assert child.popen.stdout is not None
    line = child.popen.stdout.readline()
    child.popen.stdout.close()
    try:
        port = json.loads(line)["port"]
    except (ValueError, KeyError):
        child.stop(grace_s=1)
        raise ChildFailed(f"the HTTP target did not start: {line!r}\n{child.log_text()[-2000:]}") from None
    return child, f"http://{addresses[0]}:{port}"


def start_worker(pool: str, concurrency: int, *, queues: Sequence[str] = (), log_path: Path | None = None,
                 env: dict[str, str] | None = None, extra: Sequence[str] = ()) -> Child:
    """Start ``loopline worker`` as a subprocess (its own process group)."""
    argv = [sys.executable, "-m", "loopline", "worker", "--pool", pool, "-c", str(concurrency),
            "--loglevel", "INFO"]
    if queues:
        argv += ["-Q", ",".join(queues)]
    return spawn(f"{pool} worker", [*argv, *extra], log_path, env)


def start_bench(args: Sequence[str], *, log_path: Path | None = None,
                env: Mapping[str, str | None] | None = None) -> Child:
    """Start ``loopline bench ARGS`` (its table and progress go to ``log_path``); None in ``env`` unsets."""
    return spawn("bench", [sys.executable, "-m", "loopline", "bench", *args], log_path, env)


def start_dashboard(results: Path, *, log_path: Path | None = None, env: Mapping[str, str | None] | None = None,
                    extra: Sequence[str] = ()) -> tuple[Child, str]:
    """Start ``loopline dashboard`` on a free loopback port; returns the child and its base URL."""
    argv = [sys.executable, "-m", "loopline", "dashboard", "--port", "0", "--results", str(results), *extra]
    child = spawn("dashboard", argv, log_path, env, stdout_pipe=True)
    assert child.popen.stdout is not None
    line = child.popen.stdout.readline().decode(errors="replace")
    child.popen.stdout.close()
    found = re.search(r"http://\S+?/", line)
    if found is None:
        child.stop(grace_s=1)
        raise ChildFailed(f"the dashboard did not start: {line!r}\n{child.log_text()[-2000:]}")
    return child, found.group(0).rstrip("/")
