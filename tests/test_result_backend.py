"""The one-round-trip Redis result backend (config/result_backend.py) against a real Redis: the same stored
meta, expiry and published message as Celery's, and a stored SUCCESS is never overwritten."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis
from celery import states

from config.celery_app import app
from config.result_backend import RedisBackend


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
