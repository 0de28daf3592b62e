"""Session fixtures: a private Redis, a local HTTP target, and real worker processes per pool.

The Redis and the target start in ``pytest_configure``, before any test module is imported,
because ``config.celery_app`` reads ``LOOPLINE_BROKER_URL`` when it is first imported.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import redis
import requests
from celery import Celery
from waiting import wait_for_log

from loopline.bench.procs import Child, start_target, start_worker

if TYPE_CHECKING:
    from ledger import Ledger
from loopline.embedded_redis import EmbeddedRedis

_session: dict[str, object] = {}


def pytest_configure(config: pytest.Config) -> None:
    # Nothing from the caller's environment may point a test (or a worker it starts) elsewhere, e.g. a
    # LOOPLINE_RESULT_BACKEND at the shared Redis: the suite uses only what it starts here.
    for name in [name for name in os.environ if name.startswith(("LOOPLINE_", "CELERY_"))]:
        del os.environ[name]
    home = Path(tempfile.mkdtemp(prefix="loopline-test-"))
    _session["home"] = home
    server = EmbeddedRedis(home / "redis")
    status = server.up()
    _session.update(redis=server, redis_url=status.url)  # recorded at once: pytest_unconfigure stops it
    try:
        target, url = start_target(0.0, log_path=home / "target.log")
    except BaseException:
        server.down()
        raise
    _session.update(target=target, target_url=url)
    os.environ.update({
        "LOOPLINE_BROKER_URL": status.url,
        "LOOPLINE_HOME": str(home),
        # 127.0.8.0/29 are the politeness tests' "hosts"; 127.0.0.2 ... stay guarded (test_guard_properties)
        "LOOPLINE_URL_ALLOWLIST": "127.0.0.1,127.0.8.0/29",
        "LOOPLINE_WEBHOOK_BACKOFF_BASE_S": "0.05",
        "LOOPLINE_WEBHOOK_MAX_RETRIES": "3",
    })


def pytest_unconfigure(config: pytest.Config) -> None:
    if "config.celery_app" in sys.modules:  # results still referenced would unsubscribe after Redis stopped
        from config.celery_app import app
        from loopline.app.producer import release_result_subscriptions

        release_result_subscriptions(app)
    target = _session.get("target")
    if isinstance(target, Child):
        target.stop(5)
    server = _session.get("redis")
    if isinstance(server, EmbeddedRedis):
        server.down()
    home = _session.get("home")
    if isinstance(home, Path):
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return str(_session["redis_url"])


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the session's Redis, closed after the test."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def target_url() -> str:
    """Base URL of the local HTTP target (bench.target) on 127.0.0.1."""
    return str(_session["target_url"])


@pytest.fixture
def target_stats(target_url: str) -> Callable[[], dict[str, int]]:
    """Reads the target's counters (requests served, peak in flight), zeroed when the test starts."""
    requests.post(f"{target_url}/reset", timeout=5).close()

    def read() -> dict[str, int]:
        with requests.get(f"{target_url}/stats", timeout=5) as response:
            return response.json()

    return read


@pytest.fixture
def queue() -> str:
    """A queue of this test's own, so no other test's worker takes its jobs."""
    return f"test.{uuid.uuid4().hex[:10]}"




@pytest.fixture
def worker(tmp_path: Path, queue: str) -> Iterator[Callable[..., Child]]:
    """Start a real ``loopline worker`` on the test's queue; every worker is stopped after the test."""
    started: list[Child] = []

    def start(pool: str, concurrency: int = 4, *, queues: list[str] | None = None, env: dict[str, str] | None = None,
              wait: bool = True) -> Child:
        child = start_worker(pool, concurrency, queues=queues or [queue], log_path=tmp_path / f"{pool}.log", env=env)
        started.append(child)
        if wait:
            wait_for_log(child, " ready.")
        return child

    yield start
    for child in started:
        child.stop(grace_s=20)


# -- the fault suite (tests/faults/test_faults.py, tests/faults/test_deadletter_poison.py) -----------------
# Each of those modules defines ``broker_url``: a Redis of its own that its faults may restart or cut.

@pytest.fixture
def broker(broker_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(broker_url, socket_timeout=10) as client:
        yield client


@pytest.fixture
def producer(broker_url: str) -> Iterator[Celery]:
    """A Celery client of the module's own broker (config.celery_app is bound to the session's)."""
    from ledger import producer_app  # imports config.celery_app: only after pytest_configure set the broker

    app = producer_app(broker_url)
    yield app
    app.close()


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    """The job ledger, kept in the session's Redis, which no fault touches."""
    from ledger import Ledger

    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        book = Ledger(client)
        yield book
        book.forget()
