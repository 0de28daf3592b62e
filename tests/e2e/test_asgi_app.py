"""The ASGI example over real HTTP: enqueue, bulk enqueue, state, bad input; plus the async producer API."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import requests

from loopline.app.producer import asend_many, send_many
from loopline.bench.procs import Child
from loopline.errors import InvalidJob
from tasks import io_sleep


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def asgi_url(tmp_path: object) -> Iterator[str]:
    port = _free_port()
    popen = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.asgi_app:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )
    child = Child(name="asgi", popen=popen)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(f"{url}/jobs/none", timeout=1).close()
                break
            except requests.ConnectionError:
                assert popen.poll() is None, f"the ASGI app exited with code {popen.returncode}"
                assert time.monotonic() < deadline, "the ASGI app did not answer within 30 s"
                time.sleep(0.1)
        yield url
    finally:
        child.stop(grace_s=10)


def _wait_state(url: str, job_id: str, want: str) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with requests.get(f"{url}/jobs/{job_id}", timeout=5) as response:
            body = response.json()
        if body["state"] == want:
            return body
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached {want}: {body}")


def test_post_get_and_bulk_over_http(asgi_url: str, worker: Callable[..., Child], queue: str) -> None:
    worker("asyncio", 20)
    with requests.post(f"{asgi_url}/jobs", json={"task": "io_sleep", "args": [10], "queue": queue},
                       timeout=10) as response:
        assert response.status_code == 202
        job_id = response.json()["id"]
    assert _wait_state(asgi_url, job_id, "SUCCESS")["result"]["slept_ms"] == 10  # type: ignore[index]

    with requests.post(f"{asgi_url}/jobs/bulk", json={"task": "io_sleep", "calls": [[1], [2], [3]], "queue": queue},
                       timeout=10) as response:
        assert response.status_code == 202
        ids = response.json()["ids"]
    assert len(set(ids)) == 3
    for job_id in ids:
        _wait_state(asgi_url, job_id, "SUCCESS")


def test_bad_jobs_answer_400_with_the_reason(asgi_url: str) -> None:
    cases = [
        ({"task": "fetch_url", "args": ["ftp://127.0.0.1/"]}, "scheme"),
        ({"task": "nope"}, "'task' must be one of"),
        ({"task": "io_sleep", "args": [-1]}, "ms must be"),
        ({"task": "io_sleep", "calls": [[1], ["x"]]}, "ms must be"),
        ({"task": "io_sleep", "args": [1], "queue": ""}, "'queue' must be a non-empty string"),
    ]
    for body, reason in cases:
        path = "/jobs/bulk" if "calls" in body else "/jobs"
        with requests.post(f"{asgi_url}{path}", json=body, timeout=10) as response:
            assert response.status_code == 400, body
            assert reason in response.json()["error"]


def test_send_many_validates_all_before_sending(queue: str) -> None:
    from config.celery_app import app

    with pytest.raises(InvalidJob):
        send_many(io_sleep, [((1,), {}), ((-1,), {})], queue=queue)
    with app.connection_for_read() as conn:
        assert conn.default_channel.client.llen(queue) == 0
    results = send_many(io_sleep, [((i,), {}) for i in range(50)], queue=queue)
    with app.connection_for_read() as conn:
        assert conn.default_channel.client.llen(queue) == 50
    assert len({r.id for r in results}) == 50


def test_send_many_says_when_the_connection_breaks_mid_batch(monkeypatch: pytest.MonkeyPatch, queue: str) -> None:
    import contextlib

    from config.celery_app import app
    from loopline.errors import RedisUnavailable

    class BrokenBatch:  # kombu's Producer.batch writes the pipeline when the block ends: here it fails
        def __init__(self, producer: Any) -> None:
            self.producer = producer

        @contextlib.contextmanager
        def batch(self, size: int) -> Iterator[None]:
            yield
            raise redis.ConnectionError("Connection reset by peer")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.producer, name)

    real = app.producer_or_acquire

    @contextlib.contextmanager
    def broken(producer: Any = None) -> Iterator[Any]:
        with real(producer) as inner:
            yield BrokenBatch(inner)

    monkeypatch.setattr(app, "producer_or_acquire", broken)
    with pytest.raises(RedisUnavailable, match=r"tasks.io_sleep: lost redis://127\.0\.0\.1:\d+/0 while sending "
                                               r"3 jobs \(ConnectionError: Connection reset by peer\)"):
        send_many(io_sleep, [((1,), {})] * 3, queue=queue)


def test_delay_async_does_not_block_the_loop(queue: str, monkeypatch: pytest.MonkeyPatch) -> None:
    send = io_sleep.apply_async
    loop_thread: list[int] = []
    senders: list[int] = []

    def slow_send(*args: Any, **kwargs: Any) -> Any:  # the first send takes a while, as over a slow network
        if not senders:
            time.sleep(0.3)
        senders.append(threading.get_ident())
        return send(*args, **kwargs)

    monkeypatch.setattr(io_sleep, "apply_async", slow_send)

    async def main() -> tuple[str, int, int]:
        loop_thread.append(threading.get_ident())
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        result = await io_sleep.apply_async_async((5,), queue=queue)
        during_send = ticks
        many = await asend_many(io_sleep, [((1,), {})] * 20, queue=queue)
        tick_task.cancel()
        return result.id, len(many), during_send

    task_id, count, during_send = asyncio.run(main())
    assert len(task_id) == 36 and count == 20
    # The loop kept running other tasks while the send slept on another thread: a send made on the loop would
    # have left the ticker no turn at all until it returned.
    assert senders and loop_thread[0] not in senders
    assert during_send > 100
