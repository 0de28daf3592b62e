"""The Redis that loopline starts under its home directory when no broker is configured."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import RedisNotRunning, RedisStartError
from .process import (
    HOST,
    POLL_INTERVAL_S,
    find_redis_server,
    free_port,
    is_redis_process,
    listens_on,
    ping,
    reap,
    spawn,
    stop_process,
)

__all__ = ["EmbeddedRedis", "RedisStatus", "running_url"]

logger = logging.getLogger(__name__)

STATE_FILE = "redis.json"
CONF_FILE = "redis.conf"
LOG_FILE = "redis.log"
PID_FILE = "redis.pid"
LOCK_FILE = "redis.lock"
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 8192


@dataclass(frozen=True)
class RedisStatus:
    """A running embedded Redis, as recorded in ``<home>/redis.json``."""

    url: str
    port: int
    pid: int
    binary: str
    home: Path
    aof: bool  # always True for a Redis loopline started: its redis.conf enables the append-only file


def _url(port: int) -> str:
    return f"redis://{HOST}:{port}/0"


def _read_state(home: Path) -> RedisStatus | None:
    path = home / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        port = int(data["port"])
        return RedisStatus(
            url=_url(port), port=port, pid=int(data["pid"]), binary=str(data["binary"]), home=home, aof=True
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable state file %s: %s", path, exc)
        return None


def running_url(home: Path) -> str | None:
    """URL of the embedded Redis running under ``home``, or None; reads the state file, no network round trip."""
    state = _read_state(Path(home))
    if state is None or not is_redis_process(state.pid, state.port):
        return None
    return state.url


def _quote(value: Path) -> str:
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _log_tail(path: Path) -> str:
    try:
        with open(path, "rb") as log:
            log.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
            text = log.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


class EmbeddedRedis:
    """Start, find and stop the redis-server that keeps its config, log, AOF and state under ``home``."""

    def __init__(self, home: Path, *, binary: str | None = None) -> None:
        self.home = Path(home).resolve()
        self._binary = binary

    @property
    def state_path(self) -> Path:
        return self.home / STATE_FILE

    @property
    def conf_path(self) -> Path:
        return self.home / CONF_FILE

    @property
    def log_path(self) -> Path:
        return self.home / LOG_FILE

    def status(self) -> RedisStatus | None:
        """The running Redis, or None; a state file whose pid is not our redis-server is removed."""
        state = _read_state(self.home)
        if state is not None and is_redis_process(state.pid, state.port):
            return state
        if state is not None:
            logger.info(
                "removing stale %s: pid %d is not a redis-server on port %d", self.state_path, state.pid, state.port
            )
        self.state_path.unlink(missing_ok=True)
        return None

    def up(self, port: int | None = None, *, timeout_s: float = 10.0) -> RedisStatus:
        """Start Redis (on ``port``, or a free one) unless it already runs; return its status once it answers PING."""
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be between 1 and 65535, got {port}")
        with self._lock():
            return self._up(port, timeout_s, self._binary)

    def down(self, *, timeout_s: float = 10.0) -> bool:
        """Stop Redis, SIGKILL it if it has not exited after ``timeout_s``; True if something was stopped."""
        if not self.home.is_dir():
            return False
        with self._lock():
            return self._down(timeout_s)

    def restart(self, *, timeout_s: float = 10.0) -> RedisStatus:
        """Stop Redis (if it runs) and start it again on the same port with the same files, so the AOF is replayed."""
        with self._lock():
            state = _read_state(self.home)
            port = state.port if state is not None else self._configured_port()
            if port is None:
                raise RedisNotRunning(self.home)
            self._down(timeout_s)
            return self._up(port, timeout_s, self._binary or (state.binary if state is not None else None))

    @contextmanager
    def _lock(self) -> Iterator[None]:
        # Serialises up/down/restart between loopline processes sharing one home.
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.home / LOCK_FILE, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _configured_port(self) -> int | None:
        try:
            lines = self.conf_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return None
        ports = [int(line.split()[1]) for line in lines if line.startswith("port ")]
        return ports[-1] if ports else None

    def _write_conf(self, port: int) -> None:
        lines = [
            f"bind {HOST}",
            f"port {port}",
            f"dir {_quote(self.home)}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            f"logfile {_quote(self.log_path)}",
            f"pidfile {_quote(self.home / PID_FILE)}",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    def _write_state(self, status: RedisStatus) -> None:
        data = {"url": status.url, "port": status.port, "pid": status.pid, "binary": status.binary}
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.state_path)

    def _up(self, port: int | None, timeout_s: float, binary: str | None) -> RedisStatus:
        current = self.status()
        if current is not None:
            if port is not None and port != current.port:
                logger.warning(
                    "loopline Redis already runs on port %d; not starting one on port %d", current.port, port
                )
            if not self._wait_ping(current.port, timeout_s):
                raise RedisStartError(
                    f"loopline Redis (pid {current.pid}) runs on {HOST}:{current.port} but does not "
                    f"answer PING within {timeout_s}s",
                    _log_tail(self.log_path),
                )
            return current
        binary = binary or find_redis_server()
        port = free_port() if port is None else port
        self._write_conf(port)
        try:
            pid = spawn(binary, self.conf_path, self.log_path)
        except OSError as exc:
            raise RedisStartError(f"cannot run {binary}: {exc}", _log_tail(self.log_path)) from exc
        deadline = time.monotonic() + timeout_s
        # PING alone is not enough: another server may already own the port while ours is failing to bind.
        while not (ping(port) and listens_on(pid, port)):
            code = reap(pid)
            if code is not None:
                raise RedisStartError(
                    f"redis-server ({binary}) exited with code {code} while starting on {HOST}:{port}",
                    _log_tail(self.log_path),
                )
            if time.monotonic() >= deadline:
                stop_process(pid, timeout_s)
                raise RedisStartError(
                    f"redis-server ({binary}) did not answer PING on {HOST}:{port} within {timeout_s}s",
                    _log_tail(self.log_path),
                )
            time.sleep(POLL_INTERVAL_S)
        status = RedisStatus(url=_url(port), port=port, pid=pid, binary=binary, home=self.home, aof=True)
        self._write_state(status)
        logger.info("started redis-server pid %d on %s (home %s)", status.pid, status.url, self.home)
        return status

    def _down(self, timeout_s: float) -> bool:
        current = self.status()
        if current is None:
            return False
        if not stop_process(current.pid, timeout_s):
            logger.error("redis-server pid %d survived SIGKILL; leaving %s in place", current.pid, self.state_path)
            return True
        self.state_path.unlink(missing_ok=True)
        logger.info("stopped redis-server pid %d on port %d (home %s)", current.pid, current.port, self.home)
        return True

    def _wait_ping(self, port: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not ping(port):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL_S)
        return True
