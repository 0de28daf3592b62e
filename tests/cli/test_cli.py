"""The ``loopline`` command run as a real subprocess (``python -m loopline``) against the session's Redis."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests

from loopline.bench.procs import Child
from loopline.cli import build_parser
from loopline.embedded_redis import EmbeddedRedis, free_port
from loopline.worker.launcher import POOLS

CLI_TIMEOUT_S = 60.0
FLOWER_READY_TIMEOUT_S = 60.0


def cli_env(**changes: str | None) -> dict[str, str]:
    """The session's environment (private Redis, allowlist) with ``changes`` applied; None removes a variable."""
    env = dict(os.environ)
    # Rich sizes its output from COLUMNS; without it a piped stderr is 80 columns wide wherever the tests run.
    env.pop("COLUMNS", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def no_broker_env(home: Path) -> dict[str, str]:
    return cli_env(LOOPLINE_BROKER_URL=None, LOOPLINE_RESULT_BACKEND=None, LOOPLINE_HOME=str(home))


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
            timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``python -m loopline ARGS`` in its own process group; the group is killed whatever happens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopline", *args],
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env if env is not None else cli_env(),
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout_s)
    finally:
        _kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_line(text: str) -> str:
    return " ".join(text.split())


def squeezed(text: str) -> str:
    # argparse re-wraps descriptions, even inside hyphenated words; compare without any whitespace.
    return "".join(text.split())


def queued_calls(redis_url: str, queue: str) -> list[tuple[str, list[Any]]]:
    """(task id, positional args) of every message waiting in ``queue``, oldest first (kombu LPUSHes)."""
    with redis.Redis.from_url(redis_url, socket_timeout=5) as client:
        raw = client.lrange(queue, 0, -1)
    calls = []
    for message in reversed(raw):
        envelope = json.loads(message)
        args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        calls.append((envelope["headers"]["id"], args))
    return calls


def subcommands() -> dict[str, str]:
    """Subcommand name -> its description, read from the real parser."""
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return {name: sub.description or "" for name, sub in action.choices.items()}


# -- help ---------------------------------------------------------------------------------------------------

def test_top_level_help_lists_every_command() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: loopline")
    for name in ("redis", "worker", "enqueue", "flower", "bench"):
        assert re.search(rf"^\s+{name}\s+\S", result.stdout, re.M), f"{name} is not listed with a summary"
    assert "LOOPLINE_BROKER_URL" in result.stdout


def test_no_command_is_a_usage_error() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: loopline" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", list(subcommands()))
def test_subcommand_help_explains_it(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: loopline {command}")
    description = subcommands()[command]
    assert len(description) > 20
    assert squeezed(description) in squeezed(result.stdout)


def test_worker_help_lists_every_pool() -> None:
    result = run_cli("worker", "--help")
    assert result.returncode == 0, result.stderr
    text = one_line(result.stdout)
    for choice in POOLS.values():
        default = "the number of CPUs" if choice.name == "prefork" else choice.default_concurrency
        assert f"{choice.name} (default -c {default}) {one_line(choice.advice)}" in text
    assert "threads (default -c 32)" in text and "No time limits" in text
    assert "{" + ",".join(POOLS) + "}" in text


# -- enqueue ------------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_enqueue_wait_prints_one_json_line_per_job(worker: Callable[..., Child], queue: str, target_url: str) -> None:
    worker("threads", 2)
    result = run_cli("enqueue", "io_sleep", "5", "10", "--queue", queue, "--wait", "--timeout-s", "30")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["state"] for line in lines] == ["SUCCESS", "SUCCESS"]
    assert [line["result"]["slept_ms"] for line in lines] == [5, 10]
    assert all(len(line["id"]) == 36 for line in lines)

    url = f"{target_url}/job?bytes=7"
    result = run_cli("enqueue", "fetch_url", url, "--queue", queue, "--wait", "--timeout-s", "30")
    assert result.returncode == 0, result.stderr
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["state"] == "SUCCESS"
    assert line["result"]["url"] == url
    assert line["result"]["bytes"] == 7


def test_enqueue_wait_reports_a_job_that_did_not_finish(queue: str) -> None:
    # Nothing consumes this queue, so the job stays PENDING and the command says so and exits 1.
    result = run_cli("enqueue", "io_sleep", "1", "--queue", queue, "--wait", "--timeout-s", "0.5")
    assert result.returncode == 1, result.stderr
    (line,) = [json.loads(text) for text in result.stdout.splitlines()]
    assert line["state"] == "PENDING"
    assert "not finished after 0.5 s" in line["result"]


@pytest.mark.parametrize("payload", ["NaN", "Infinity", '{"amount": -Infinity}'])
def test_enqueue_refuses_a_payload_that_is_not_json(payload: str, redis_url: str, queue: str) -> None:
    result = run_cli("enqueue", "deliver_webhook", "http://127.0.0.1/", "--payload", payload, "--queue", queue)
    assert result.returncode == 2, result.stdout
    assert "Traceback" not in result.stderr
    assert "--payload is not valid JSON" in one_line(result.stderr)
    assert queued_calls(redis_url, queue) == []


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon"])
def test_enqueue_refuses_a_wait_timeout_that_is_not_a_positive_number(timeout: str, redis_url: str,
                                                                      queue: str) -> None:
    result = run_cli("enqueue", "io_sleep", "1", "--queue", queue, "--wait", "--timeout-s", timeout)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "argument --timeout-s: must be a positive number of seconds" in result.stderr
    assert queued_calls(redis_url, queue) == []


def test_enqueue_prints_task_ids(redis_url: str, queue: str, target_url: str) -> None:
    urls = [f"{target_url}/job?n=1", f"{target_url}/job?n=2"]
    result = run_cli("enqueue", "fetch_url", *urls, "--queue", queue)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert len(ids) == 2
    assert all(len(task_id) == 36 and str(uuid.UUID(task_id)) == task_id for task_id in ids)
    assert queued_calls(redis_url, queue) == [(ids[0], [urls[0]]), (ids[1], [urls[1]])]


def test_enqueue_reads_urls_from_a_file(tmp_path: Path, redis_url: str, queue: str, target_url: str) -> None:
    urls = [f"{target_url}/job?n={n}" for n in range(3)]
    listing = tmp_path / "urls.txt"
    listing.write_text(f"# jobs for the test\n{urls[0]}\n\n   \n  {urls[1]}  \n  # {target_url}/commented\n{urls[2]}\n")
    result = run_cli("enqueue", "fetch_url", "--file", str(listing), "--queue", queue)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    assert queued_calls(redis_url, queue) == list(zip(ids, [[url] for url in urls], strict=True))


def test_enqueue_reads_urls_from_stdin_after_the_arguments(redis_url: str, queue: str, target_url: str) -> None:
    first, second = f"{target_url}/job?from=args", f"{target_url}/job?from=stdin"
    result = run_cli("enqueue", "fetch_url", first, "--file", "-", "--queue", queue, stdin=f"# c\n\n{second}\n")
    assert result.returncode == 0, result.stderr
    assert [args for _, args in queued_calls(redis_url, queue)] == [[first], [second]]


def test_bad_url_exits_2_with_an_error_and_no_traceback(redis_url: str, queue: str) -> None:
    result = run_cli("enqueue", "fetch_url", "ftp://x", "--queue", queue)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    message = one_line(result.stderr)
    assert message.startswith("loopline enqueue: error:")
    assert "ftp://x" in message
    assert "scheme 'ftp'" in message
    assert queued_calls(redis_url, queue) == []


@pytest.mark.parametrize("url", ["ftp://x", "ftp://x/" + "a" * 120])
def test_bad_url_error_is_one_line(url: str) -> None:
    result = run_cli("enqueue", "fetch_url", url)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize("url", ["ftp://x/[/]", "ftp://x/[bold]y"])
def test_error_message_shows_the_input_verbatim(url: str) -> None:
    result = run_cli("enqueue", "fetch_url", url)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert url in one_line(result.stderr)


def test_missing_url_file_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    result = run_cli("enqueue", "fetch_url", "--file", str(missing))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert str(missing) in one_line(result.stderr)


def test_a_bad_url_among_good_ones_enqueues_nothing(redis_url: str, queue: str, target_url: str) -> None:
    result = run_cli("enqueue", "fetch_url", f"{target_url}/job", "ftp://x", "--queue", queue)
    assert result.returncode == 2
    assert queued_calls(redis_url, queue) == []


def test_enqueue_without_a_broker_says_to_start_redis(tmp_path: Path) -> None:
    result = run_cli("enqueue", "io_sleep", "1", env=no_broker_env(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    message = one_line(result.stderr)
    assert "LOOPLINE_BROKER_URL is unset" in message
    assert "loopline redis up" in message


# -- bad settings -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "args",
    [("worker", "--pool", "solo", "-c", "1"), ("enqueue", "io_sleep", "1"), ("flower", "--port", str(free_port())),
     ("redis", "status")],
    ids=lambda args: args[0],
)
def test_bad_setting_exits_2_naming_the_variable(args: tuple[str, ...]) -> None:
    result = run_cli(*args, env=cli_env(LOOPLINE_VISIBILITY_TIMEOUT_S="abc"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "LOOPLINE_VISIBILITY_TIMEOUT_S" in result.stderr


# -- redis --------------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
def test_redis_up_status_down(tmp_path: Path) -> None:
    env = no_broker_env(tmp_path)
    try:
        up = run_cli("redis", "up", env=env)
        assert up.returncode == 0, up.stderr
        url = up.stdout.strip()
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+/0", url), url
        with redis.Redis.from_url(url, socket_timeout=5) as client:
            assert client.ping()
        again = run_cli("redis", "up", env=env)
        assert (again.returncode, again.stdout.strip()) == (0, url)

        status = run_cli("redis", "status", env=env)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["url"] == url
        assert info["home"] == str(tmp_path.resolve())
        pid = info["pid"]
        assert psutil.Process(pid).is_running()

        # Every command finds the embedded Redis when no broker is configured.
        sent = run_cli("enqueue", "io_sleep", "1", env=env)
        assert sent.returncode == 0, sent.stderr
        assert len(sent.stdout.strip()) == 36

        down = run_cli("redis", "down", env=env)
        assert down.returncode == 0, down.stderr
        after = run_cli("redis", "status", env=env)
        assert after.returncode == 1
        assert after.stdout == ""
        assert "loopline redis up" in one_line(after.stderr)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        run_cli("redis", "down", env=env)
        EmbeddedRedis(tmp_path).down(timeout_s=5)


# -- flower -------------------------------------------------------------------------------------------------

def _wait_for_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + FLOWER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"flower exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            requests.get(url, timeout=2).close()
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise AssertionError(f"flower did not answer on {url}:\n{log.read_text(errors='replace')[-3000:]}")


def _listening(proc: subprocess.Popen[bytes], port: int) -> set[str]:
    """Local addresses on which ``proc`` or any of its descendants listens on ``port``."""
    parent = psutil.Process(proc.pid)
    found = set()
    for process in (parent, *parent.children(recursive=True)):
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port:
                found.add(conn.laddr.ip)
    return found


@pytest.mark.timeout(90)
def test_flower_requires_basic_auth_and_binds_loopback_only(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopline", "flower", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=cli_env(LOOPLINE_FLOWER_AUTH="user:pw"), start_new_session=True,
        )
        try:
            _wait_for_http(base, proc, log_path)
            anonymous = requests.get(base, timeout=10)
            assert anonymous.status_code == 401
            assert anonymous.headers.get("WWW-Authenticate", "").startswith("Basic")
            assert requests.get(base, auth=("user", "wrong"), timeout=10).status_code == 401
            assert requests.get(base, auth=("someone", "pw"), timeout=10).status_code == 401
            assert requests.get(base, auth=("user", "pw"), timeout=10).status_code == 200
            assert _listening(proc, port) == {"127.0.0.1"}
            # The password travels in the environment, never in argv where `ps` shows it.
            assert "pw" not in psutil.Process(proc.pid).cmdline()
            assert not any("user:pw" in arg for arg in psutil.Process(proc.pid).cmdline())
        finally:
            # Flower is `celery flower` exec'd in place of the CLI; its group holds everything it started.
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            _kill_group(proc)


@pytest.mark.timeout(90)
def test_flower_async_apply_answers_400_with_the_reason_for_an_invalid_job(
    tmp_path: Path, redis_url: str, queue: str, target_url: str
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "loopline", "flower", "--port", str(port)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=cli_env(LOOPLINE_FLOWER_AUTH="user:pw"), start_new_session=True,
        )
        try:
            _wait_for_http(base, proc, log_path)
            url = f"{base}api/task/async-apply/tasks.fetch_url"
            refused = requests.post(url, json={"args": ["ftp://x"], "queue": queue}, auth=("user", "pw"), timeout=10)
            assert refused.status_code == 400, refused.text
            assert "scheme 'ftp'" in refused.text
            sent = requests.post(url, json={"args": [f"{target_url}/job"], "queue": queue}, auth=("user", "pw"),
                                 timeout=10)
            assert sent.status_code == 200, sent.text
            assert [task_id for task_id, _ in queued_calls(redis_url, queue)] == [sent.json()["task-id"]]
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            _kill_group(proc)
