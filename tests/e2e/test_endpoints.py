"""Redis endpoints with credentials: a password, an ACL user, and TLS (``rediss://``) with a private CA.

Each test starts its own redis-server on 127.0.0.1 with the option under test, runs a real worker against
it, and checks that the job runs and that no password reaches the worker's log or the CLI's output.
"""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from loopline.bench.procs import Child
from loopline.embedded_redis import find_redis_server, free_port

PASSWORD = "s3cr3t-Pw"
ACL_PASSWORD = "alice-Pw-9"
START_TIMEOUT_S = 10.0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Callable[..., int]]:
    """Start redis-server with extra options on a free loopback port; every one is stopped afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str, tls: bool = False) -> int:
        port = free_port()
        listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        log = open(tmp_path / f"redis-{port}.log", "wb")  # noqa: SIM115 - closed with the process below
        proc = subprocess.Popen([find_redis_server(), "--bind", "127.0.0.1", *listen, "--save", "",
                                 "--appendonly", "no", "--dir", str(tmp_path), *options],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        started.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        log_path = tmp_path / f"redis-{port}.log"
        while "Ready to accept connections" not in log_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        return port

    yield start
    for proc in started:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run_job(url: str, queue: str) -> dict[str, object]:
    app = Celery("endpoint-producer", broker=url, backend=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], result_accept_content=["json"],
                    broker_transport="loopline.transport.redis:Transport")
    try:
        result = app.send_task("tasks.io_sleep", (3,), queue=queue)
        value: dict[str, object] = result.get(timeout=30)
        return value
    finally:
        app.close()


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text and ACL_PASSWORD not in text


@pytest.mark.timeout(90)
def test_password_and_acl_user_urls_work_and_stay_out_of_logs(
    redis_server: Callable[..., int], worker: Callable[..., Child], queue: str
) -> None:
    port = redis_server("--requirepass", PASSWORD, "--user", "alice", "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all")
    for url in (f"redis://:{PASSWORD}@127.0.0.1:{port}/0", f"redis://alice:{ACL_PASSWORD}@127.0.0.1:{port}/0"):
        child = worker("threads", 2, env={"LOOPLINE_BROKER_URL": url})
        assert _run_job(url, queue)["slept_ms"] == 3
        assert child.stop(grace_s=20) == 0
        log = child.log_text()
        assert ":**@127.0.0.1" in log
        _no_secret(log)
        listed = subprocess.run([sys.executable, "-m", "loopline", "dlq", "list"], capture_output=True, text=True,
                                env={**os.environ, "LOOPLINE_BROKER_URL": url}, timeout=60, check=False)
        assert listed.returncode == 0, listed.stderr
        _no_secret(listed.stdout, listed.stderr)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=port, username="alice", password="wrong").ping()


@pytest.mark.timeout(60)
def test_a_wrong_password_fails_loudly_without_printing_it(
    redis_server: Callable[..., int], queue: str
) -> None:
    port = redis_server("--requirepass", PASSWORD)
    wrong = f"redis://:{ACL_PASSWORD}@127.0.0.1:{port}/0"
    proc = subprocess.run([sys.executable, "-m", "loopline", "dlq", "list"], capture_output=True, text=True,
                          env={**os.environ, "LOOPLINE_BROKER_URL": wrong}, timeout=60, check=False)
    assert proc.returncode == 2
    assert "AuthenticationError" in proc.stderr and "Traceback" not in proc.stderr
    assert ":***@127.0.0.1" in proc.stderr
    _no_secret(proc.stdout, proc.stderr)


def _make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (directory / name for name in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                                 "server.pem"))
    ext = directory / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=loopline test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
         "-extfile", ext],
    ):
        subprocess.run(["openssl", *map(str, argv)], check=True, capture_output=True, timeout=60)
    return ca, cert, key


@pytest.mark.timeout(90)
def test_rediss_with_a_private_ca_verifies_the_server(
    redis_server: Callable[..., int], worker: Callable[..., Child], queue: str, tmp_path: Path
) -> None:
    ca, cert, key = _make_ca_and_server_cert(tmp_path)
    port = redis_server("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
                        "--tls-auth-clients", "no", "--requirepass", PASSWORD, tls=True)
    # No ssl_cert_reqs in the URL: config/celery_app.py makes it "required" for the broker and the backend.
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    child = worker("threads", 2, env={"LOOPLINE_BROKER_URL": url})
    assert _run_job(url + "&ssl_cert_reqs=required", queue)["slept_ms"] == 3
    assert child.stop(grace_s=20) == 0
    _no_secret(child.log_text())
    # The server's certificate really is checked: without the CA it is refused.
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
        redis.Redis(port=port, password=PASSWORD, ssl=True, ssl_cert_reqs="required",
                    socket_timeout=5).ping()


def test_rediss_urls_without_certificate_settings_default_to_verification() -> None:
    from loopline.app.install import _tls_defaults

    assert _tls_defaults("rediss://127.0.0.1:6380/0") == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert _tls_defaults("rediss://127.0.0.1:6380/0?ssl_cert_reqs=none") is None
    assert _tls_defaults("redis://127.0.0.1:6379/0") is None
