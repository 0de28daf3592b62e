"""Fault 6: a poison job that kills its worker every time it runs is dead-lettered, not redelivered forever.

The job's body SIGKILLs the process running it: a prefork child (the worker replaces it, Celery requeues
the job under ``task_reject_on_worker_lost``), or the whole worker on the other pools (the test plays the
supervisor and starts a new one; the job comes back after the visibility timeout). With
``LOOPLINE_MAX_DELIVERIES=2`` it runs twice and is dead-lettered at its third delivery.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from ledger import Fleet, Ledger, fault_env

from loopline.deadletter.store import DeadLetterStore, Reason
from loopline.embedded_redis import EmbeddedRedis

POOLS = ["prefork", "threads", "gevent", "asyncio"]
HOLD_S = 0.2
MAX_DELIVERIES = 2
# billiard may notice a killed child only at its 5 s maintain_pool tick: the hard limit must be longer.
PREFORK_LIMITS = {"LOOPLINE_VISIBILITY_TIMEOUT_S": "30", "LOOPLINE_TASK_TIME_LIMIT_S": "20",
                  "LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "15"}


@pytest.fixture
def broker_url(tmp_path: Path) -> Iterator[str]:
    server = EmbeddedRedis(tmp_path / "broker")
    yield server.up().url
    server.down()


@pytest.fixture
def fleet(tmp_path: Path, broker_url: str, redis_url: str) -> Iterator[Fleet]:
    workers = Fleet(tmp_path, fault_env(broker_url, redis_url, LOOPLINE_MAX_DELIVERIES=str(MAX_DELIVERIES)))
    yield workers
    workers.stop_all()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", POOLS)
def test_poison_job_is_dead_lettered_after_max_deliveries_and_the_rest_run(
    pool: str, fleet: Fleet, producer: Celery, broker: redis.Redis, ledger: Ledger, queue: str
) -> None:
    (poison_id,) = ledger.enqueue(producer, queue, 1, HOLD_S, poison=True)
    ledger.enqueue(producer, queue, 6, HOLD_S)
    # One slot: a job prefetched behind the poison never starts in the worker the poison kills, so it is
    # not counted against its own deliveries (see loopline/deadletter/deliveries.py).
    concurrency, env = (2, PREFORK_LIMITS) if pool == "prefork" else (1, {})
    worker = fleet.start(pool, concurrency, queue, **env)
    store = DeadLetterStore(broker)
    deadline = time.monotonic() + 90
    while store.get(poison_id) is None:  # the test plays the supervisor that restarts a dead worker
        assert time.monotonic() < deadline, f"{poison_id} never dead-lettered:\n{worker.log_text()[-3000:]}"
        if not worker.alive():
            worker = fleet.start(pool, concurrency, queue, **env)
        time.sleep(0.1)
    ledger.settle(broker, queue, 60)

    entry = store.get(poison_id)
    assert entry is not None
    assert (entry.reason, entry.task, entry.deliveries) == (Reason.POISON, "ledger.job", MAX_DELIVERIES + 1)
    assert entry.args == [ledger.run, poison_id, HOLD_S, True]
    assert f"LOOPLINE_MAX_DELIVERIES={MAX_DELIVERIES}" in entry.error
    assert ledger.started()[poison_id] == MAX_DELIVERIES  # it ran exactly that often, never again
    # The caller of the poison job gets a failure that says why, not a result that never comes.
    meta = json.loads(broker.get(f"celery-task-meta-{poison_id}") or b"{}")
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_type"] == "DeadLettered"
    assert meta["result"]["exc_message"][0].startswith("poison:")

    counts = ledger.counts("poison job", pool, dead_lettered=[poison_id])
    assert counts.lost == 0
    assert counts.dead_lettered == 1
    assert counts.done_once + counts.duplicated == len(ledger.enqueued) - 1
    logs = "".join(child.log_text() for child in fleet.children)
    assert logs.count(f"dead-lettered ledger.job[{poison_id}]") == 1
    assert worker.stop(grace_s=30, signum=signal.SIGTERM) == 0
