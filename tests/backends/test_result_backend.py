"""The one-round-trip Redis result backend (config/result_backend.py) against a real Redis: the same stored
meta, expiry and published message as Celery's, a stored SUCCESS is never overwritten, and the results of
tasks that finish together on the asyncio pool's loop go out in one pipeline."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import pytest
import redis
from celery import states

from config.celery_app import app
from loopline.backends.redis import RedisBackend, _LoopBatch
from loopline.concurrency.bridge import run_in_greenlet


@pytest.fixture
def backend() -> RedisBackend:
    instance = app.backend
    assert isinstance(instance, RedisBackend)
    return instance


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


def test_stores_celerys_meta_with_the_result_expiry(backend: RedisBackend, client: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"status": 200}, states.SUCCESS)

    meta = app.AsyncResult(task_id)
    assert meta.state == states.SUCCESS and meta.result == {"status": 200}
    key = backend.get_key_for_task(task_id)
    assert json.loads(client.get(key) or b"{}")["task_id"] == task_id
    assert 0 < client.ttl(key) <= app.conf.result_expires


def test_a_stored_success_is_not_overwritten(backend: RedisBackend) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, "first", states.SUCCESS)
    backend.store_result(task_id, None, states.RETRY)
    backend.mark_as_failure(task_id, RuntimeError("a late duplicate failed"))

    assert backend.get_task_meta(task_id, cache=False)["result"] == "first"


def test_other_states_are_replaced(backend: RedisBackend) -> None:
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, states.RETRY)
    backend.store_result(task_id, "done", states.SUCCESS)

    assert backend.get_task_meta(task_id, cache=False)["status"] == states.SUCCESS


def test_waiters_get_the_published_meta(backend: RedisBackend, client: redis.Redis) -> None:
    task_id = str(uuid.uuid4())
    listener = client.pubsub()
    listener.subscribe(backend.get_key_for_task(task_id))
    try:
        listener.get_message(timeout=2)  # the subscribe confirmation
        backend.store_result(task_id, 42, states.SUCCESS)
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = listener.get_message(timeout=1)
        assert message is not None and json.loads(message["data"])["result"] == 42
    finally:
        listener.close()


def test_survives_a_script_flush(backend: RedisBackend, client: redis.Redis) -> None:
    backend.store_result(str(uuid.uuid4()), 1, states.SUCCESS)
    client.script_flush()  # as a Redis restart does: EVALSHA fails with NOSCRIPT until the script is loaded
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, 2, states.SUCCESS)

    assert app.AsyncResult(task_id).result == 2


def _finish_on_one_loop(backend: RedisBackend, task_ids: list[str], *, deferred: bool = True) -> list[list[Any]]:
    """Store a result for each id from its own LoopGreenlet on one event loop, as the asyncio pool's tasks do."""
    handed_off: list[list[Any]] = []

    async def main() -> None:
        async def one(task_id: str) -> None:
            settled: list[Any] | None = [] if deferred else None
            await run_in_greenlet(backend.store_result, task_id, {"id": task_id}, states.SUCCESS, deferred=settled)
            if settled is not None:
                handed_off.append(settled)
                await asyncio.gather(*settled)

        await asyncio.gather(*(one(task_id) for task_id in task_ids))

    asyncio.run(main())
    return handed_off


@pytest.fixture
def pipelines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of commands in each pipeline the backend sends."""
    sent: list[int] = []
    execute = redis.client.Pipeline.execute

    def counting(self: redis.client.Pipeline, raise_on_error: bool = True) -> Any:
        sent.append(len(self.command_stack))
        return execute(self, raise_on_error)

    monkeypatch.setattr(redis.client.Pipeline, "execute", counting)
    return sent


def test_results_of_tasks_finishing_together_on_the_loop_go_out_in_one_pipeline(
        backend: RedisBackend, pipelines: list[int]) -> None:
    task_ids = [str(uuid.uuid4()) for _ in range(20)]
    handed_off = _finish_on_one_loop(backend, task_ids)

    assert pipelines == [20]
    assert [len(writes) for writes in handed_off] == [1] * 20  # each task's write waits for the pool, not the task
    assert all(app.AsyncResult(task_id).result == {"id": task_id} for task_id in task_ids)


def test_a_write_outside_the_pool_waits_in_its_greenlet(backend: RedisBackend, pipelines: list[int]) -> None:
    task_ids = [str(uuid.uuid4()) for _ in range(3)]
    _finish_on_one_loop(backend, task_ids, deferred=False)

    assert pipelines == [3]
    assert all(app.AsyncResult(task_id).result == {"id": task_id} for task_id in task_ids)


def test_a_batch_survives_a_script_flush(backend: RedisBackend, client: redis.Redis, pipelines: list[int]) -> None:
    _finish_on_one_loop(backend, [str(uuid.uuid4())])
    client.script_flush()
    task_ids = [str(uuid.uuid4()) for _ in range(5)]
    _finish_on_one_loop(backend, task_ids)

    assert pipelines == [1, 5, 5]  # NOSCRIPT for the batch: the script is loaded and the batch sent again
    assert all(app.AsyncResult(task_id).result == {"id": task_id} for task_id in task_ids)


def test_a_failed_batch_is_written_one_by_one_with_celerys_retries(
        backend: RedisBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(self: Any, batch: Any) -> None:
        raise redis.ConnectionError("connection reset by peer")

    monkeypatch.setattr(_LoopBatch, "_send", broken)
    task_ids = [str(uuid.uuid4()) for _ in range(4)]
    _finish_on_one_loop(backend, task_ids)

    assert all(app.AsyncResult(task_id).result == {"id": task_id} for task_id in task_ids)
    assert "a batch of 4 writes failed (connection reset by peer); writing them one by one" in caplog.text


def test_one_backend_serves_every_thread_of_a_process(backend: RedisBackend) -> None:
    # Celery keeps a backend per thread unless it is thread_safe (Celery._backend); under gevent that is one
    # per greenlet, so a new backend, Redis client and connection pool for every task (celery #6819).
    import threading

    seen: list[Any] = []
    threads = [threading.Thread(target=lambda: seen.append(app.backend)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(seen) == 3 and all(other is backend for other in seen)
    assert backend.thread_safe
