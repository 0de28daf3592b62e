"""Property test: task messages whose Celery headers and embed hold values of any JSON type, pushed through a
real worker of each pool. Every message is settled once (dead-lettered, failed or run) and the worker keeps
serving; none is left unacknowledged to come back and stop the next worker."""

from __future__ import annotations

import functools
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis
from celery import states
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_bad_messages import POOLS, envelope, task_message, unacked

from config.celery_app import app
from loopline.bench.procs import Child
from loopline.deadletter.deliveries import count_key
from loopline.deadletter.store import DeadLetterStore
from tasks import io_sleep

# Every field of a protocol 2 message as Celery sends it (celery.app.amqp.AMQP.as_task_v2), with the JSON
# type it should have (None, where Celery allows it, counts as right).
HEADERS: dict[str, type] = {
    "lang": str, "task": str, "id": str, "shadow": str, "eta": str, "expires": str, "group": str,
    "group_index": int, "retries": int, "timelimit": list, "root_id": str, "parent_id": str, "argsrepr": str,
    "kwargsrepr": str, "origin": str, "ignore_result": bool, "replaced_task_nesting": int, "stamped_headers": list,
    "stamps": dict,
}
EMBED: dict[str, type] = {"callbacks": list, "errbacks": list, "chain": list, "chord": dict}
FIELDS = {**HEADERS, **EMBED}
COMBINED = 12  # messages with two or three fields wrong at once, besides one per field
SETTLE_TIMEOUT_S = 60.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def wrong(name: str) -> st.SearchStrategy[object]:
    """JSON values of any type but the one field ``name`` should have (a bool is no int here)."""
    kind = FIELDS[name]
    return json_values.filter(lambda value: value is not None and not (
        isinstance(value, kind) and (kind is bool or not isinstance(value, bool))))


def _draw(strategy: st.SearchStrategy[dict[str, object]], count: int) -> list[dict[str, object]]:
    """The first ``count`` examples hypothesis generates, the same on every run (derandomized)."""
    drawn: list[dict[str, object]] = []

    @settings(max_examples=count, derandomize=True, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(strategy)
    def draw(fields: dict[str, object]) -> None:
        drawn.append(fields)

    draw()
    return drawn


@dataclass(frozen=True)
class Hostile:
    """One message: the fields laid over a well-formed ``io_sleep(0)``, and its delivery tag."""

    fields: dict[str, object]
    task_id: str
    tag: str

    def entry(self, queue: str) -> bytes:
        headers = {k: v for k, v in self.fields.items() if k in HEADERS}
        embed = {k: v for k, v in self.fields.items() if k in EMBED}
        message_headers, body = task_message(self.task_id, [0], headers=headers, embed=embed)
        return envelope(queue, body, headers=message_headers, tag=self.tag)

    @property
    def sent_id(self) -> str | None:
        """The id the message carries, if it is one a result can be looked up by."""
        sent = self.fields.get("id", self.task_id)
        return sent if isinstance(sent, str) and sent else None


@functools.cache
def hostile_batch() -> tuple[Hostile, ...]:
    """One message per field with a wrong value in it, then COMBINED with several wrong fields."""
    # Hypothesis tries the simplest values first (False, 0, ""): take its next, less tame, draw.
    every_field = _draw(st.fixed_dictionaries({name: wrong(name) for name in FIELDS}), 2)[-1]
    singles = [{name: value} for name, value in every_field.items()]
    several = st.lists(st.sampled_from(sorted(FIELDS)), min_size=2, max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({name: wrong(name) for name in names}))
    drawn = singles + _draw(several, COMBINED)
    return tuple(Hostile(fields, str(uuid.uuid4()), str(uuid.uuid4())) for fields in drawn)


def _settled(client: redis.Redis, queue: str, batch: tuple[Hostile, ...]) -> bool:
    return client.llen(queue) == 0 and not unacked(client, [message.tag for message in batch])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool", POOLS)
def test_hostile_headers_are_settled_once_and_the_worker_keeps_serving(
    pool: str, worker: Callable[..., Child], queue: str, redis_url: str
) -> None:
    batch = hostile_batch()
    assert len(batch) >= len(FIELDS) + COMBINED // 2, "hypothesis drew too few distinct messages"
    child = worker(pool, 2)
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        for message in batch:
            client.lpush(queue, message.entry(queue))
        good = io_sleep.apply_async((5,), queue=queue)
        assert good.get(timeout=60)["slept_ms"] == 5, child.log_text()[-4000:]
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while not _settled(client, queue, batch):
            left = unacked(client, [message.tag for message in batch])
            stuck = [message.fields for message in batch if message.tag in left]
            assert time.monotonic() < deadline, f"not settled: {stuck}\n{child.log_text()[-4000:]}"
            assert child.alive(), child.log_text()[-4000:]
            time.sleep(0.2)
        store = DeadLetterStore(client)
        dead = [entry for entry in store.entries() if entry.queue == queue]
        for entry in dead:
            store.remove(entry.id)
        ids = [message.sent_id for message in batch]
        for message in batch:
            sent_id = message.sent_id
            if sent_id is None or ids.count(sent_id) > 1:
                continue
            # Started again after a redelivery (deadletter.hooks counts those starts): it looped.
            assert not client.exists(count_key(sent_id, 0)), message.fields
            if "ignore_result" in message.fields or sent_id in {entry.task_id for entry in dead}:
                continue
            state = app.AsyncResult(sent_id).state
            assert state in states.READY_STATES, (message.fields, state)

    log = child.log_text()
    assert "Unrecoverable error" not in log and "crashed outside the task body" not in log, log[-4000:]
    assert log.count("dead-lettered ") == len(dead), log[-4000:]
    assert child.alive()
    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0
