"""The Redis transport (deadletter/transport.py) with a real asyncio worker: messages are fetched and acked in
batches, counted by Redis itself, and every message ends acked."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis

from loopline.bench.procs import Child
from tasks import io_sleep

JOBS = 200


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


def _unacked_in(client: redis.Redis, queue: str) -> int:
    """Messages of this queue still recorded as unacked (kombu's hash: tag -> [payload, exchange, routing key]);
    the session's Redis may hold other tests' entries, left by workers they killed."""
    return sum(1 for raw in client.hvals("unacked") if json.loads(raw)[2] == queue)


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


@pytest.mark.timeout(120)
def test_a_busy_worker_fetches_and_acks_in_batches_and_acks_everything(
    worker: Callable[..., Child], queue: str, client: redis.Redis
) -> None:
    results = [io_sleep.apply_async((5,), queue=queue) for _ in range(JOBS)]  # queued before the worker starts
    fetches, acks = _calls(client, "eval"), _calls(client, "zrem")
    child = worker("asyncio", 50)
    for result in results:
        result.get(timeout=60)
    deadline = time.monotonic() + 20
    while _unacked_in(client, queue) and time.monotonic() < deadline:
        time.sleep(0.1)

    assert _unacked_in(client, queue) == 0, child.log_text()[-3000:]
    fetch_calls, ack_calls = _calls(client, "eval") - fetches, _calls(client, "zrem") - acks
    print(f"{JOBS} jobs: {fetch_calls} fetch round trips, {ack_calls} ack round trips")
    # kombu's transport pays one of each per message. At least one fetch: the atomic fetch was used, not BRPOP.
    assert 0 < fetch_calls <= JOBS // 4
    assert "fetching with BRPOP" not in child.log_text()
    assert ack_calls <= JOBS // 2
