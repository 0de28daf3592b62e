"""Messages pushed straight into a worker's Redis queue that no worker can run: each is refused, logged once
with the reason and dead-lettered, and the worker keeps serving the jobs around it, under every pool."""

from __future__ import annotations

import base64
import json
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from billiard.einfo import ExceptionInfo

from config.celery_app import app
from loopline.bench.procs import Child
from loopline.concurrency.asyncio import TaskPool
from loopline.deadletter.store import DeadLetter, DeadLettered, DeadLetterStore, Reason
from tasks import io_sleep

POOLS = ["prefork", "threads", "gevent", "asyncio"]


class _TouchOnLoad:
    """Unpickling this creates a file: proof, if the file appears, that a worker loaded a pickle."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return Path.touch, (self.path,)


def envelope(queue: str, body: bytes, *, content_type: str = "application/json",
             headers: dict[str, object] | None = None, tag: str | None = None) -> bytes:
    """A kombu Redis envelope as ``send_task`` would write it, with the given body and headers."""
    if headers is None:
        headers = {"lang": "py", "task": "tasks.io_sleep", "id": str(uuid.uuid4()), "retries": 0}
    return json.dumps({
        "body": base64.b64encode(body).decode(), "content-encoding": "utf-8", "content-type": content_type,
        "headers": headers,
        "properties": {"delivery_tag": tag or str(uuid.uuid4()), "body_encoding": "base64", "delivery_mode": 2,
                       "priority": 0, "delivery_info": {"exchange": "", "routing_key": queue}},
    }).encode()


def task_message(task_id: str, args: list[object], *, headers: dict[str, object] | None = None,
                 embed: dict[str, object] | None = None) -> tuple[dict[str, object], bytes]:
    """Headers and JSON body of an ``io_sleep`` message with every field Celery sends (``AMQP.as_task_v2``),
    then ``headers`` and ``embed`` laid over them."""
    message = app.amqp.as_task_v2(task_id, "tasks.io_sleep", args, {})
    body_args, body_kwargs, body_embed = message.body
    return {**message.headers, **(headers or {})}, json.dumps([body_args, body_kwargs,
                                                               {**body_embed, **(embed or {})}]).encode()


def wait_acked(client: redis.Redis, tags: list[str], child: Child, timeout_s: float = 10.0) -> None:
    """Wait until the worker has acknowledged every one of ``tags`` (the asyncio pool sends acks in batches)."""
    deadline = time.monotonic() + timeout_s
    while left := unacked(client, tags):
        assert time.monotonic() < deadline, f"never acked: {left}\n{child.log_text()[-4000:]}"
        time.sleep(0.1)


def unacked(client: redis.Redis, tags: list[str]) -> list[str]:
    """Those of ``tags`` that kombu's Redis transport still holds as delivered but not acknowledged."""
    held = client.hmget("unacked", tags) if tags else []
    return [tag for tag, value in zip(tags, held, strict=True) if value is not None]


def bad_messages(queue: str, marker: Path) -> dict[str, tuple[bytes, str, str]]:
    """name -> (queue entry, expected reason, words the error must contain)."""
    task = {"lang": "py", "task": "tasks.io_sleep"}
    too_big = app.conf.broker_transport_options["max_message_bytes"] + 1
    return {
        "not JSON": (b"\x00\x01 not json at all", Reason.UNDECODABLE, "not JSON"),
        "missing properties": (json.dumps({"body": "", "headers": {}}).encode(), Reason.INVALID, "properties"),
        "body not JSON": (envelope(queue, b"{oops"), Reason.UNDECODABLE, "not valid"),
        "pickle": (envelope(queue, pickle.dumps(((_TouchOnLoad(marker),), {}, {})),
                            content_type="application/x-python-serialize"), Reason.DISALLOWED, "pickle"),
        "unknown task": (envelope(queue, json.dumps([[1], {}, {}]).encode(),
                                  headers={**task, "task": "tasks.no_such", "id": str(uuid.uuid4())}),
                         Reason.UNKNOWN_TASK, "tasks.no_such"),
        "missing id": (envelope(queue, json.dumps([[1], {}, {}]).encode(), headers=task), Reason.INVALID, "'id'"),
        "wrong protocol": (envelope(queue, json.dumps({"nothing": "here"}).encode(), headers={}),
                           Reason.INVALID, "not a task message"),
        "body not [args, kwargs, embed]": (envelope(queue, json.dumps({"x": [1]}).encode()), Reason.INVALID,
                                           "[args, kwargs, embed]"),
        "oversized": (envelope(queue, b"x" * too_big), Reason.OVERSIZED, "LOOPLINE_MAX_MESSAGE_BYTES"),
        # Lua's cjson (the fetch script) reads this envelope and records it; Python's json refuses it.
        "JSON only Lua reads": (envelope(queue, json.dumps([[1], {}, {}]).encode()).replace(
            b'"priority": 0', b'"priority": 00'), Reason.UNDECODABLE, "not JSON"),
        # Recorded by the script under these raw bytes; Python would read (and later ack) another tag.
        "tag not UTF-8": (envelope(queue, json.dumps([[1], {}, {}]).encode()).replace(
            b'"delivery_tag": "', b'"delivery_tag": "\xff'), Reason.INVALID, "not UTF-8"),
    }


def _entries_for(store: DeadLetterStore, queue: str) -> list[DeadLetter]:
    return [entry for entry in store.entries() if entry.queue == queue]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", POOLS)
def test_each_bad_message_is_dead_lettered_once_and_the_worker_keeps_serving(
    pool: str, worker: Callable[..., Child], queue: str, redis_url: str, tmp_path: Path
) -> None:
    child = worker(pool, 2)
    marker = tmp_path / "unpickled"
    cases = bad_messages(queue, marker)
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        store = DeadLetterStore(client)
        before = io_sleep.apply_async((5,), queue=queue)
        for entry, _, _ in cases.values():
            client.lpush(queue, entry)
        after = io_sleep.apply_async((5,), queue=queue)
        assert before.get(timeout=30)["slept_ms"] == 5
        assert after.get(timeout=30)["slept_ms"] == 5
        deadline = time.monotonic() + 20
        while len(_entries_for(store, queue)) < len(cases):
            assert time.monotonic() < deadline, child.log_text()[-4000:]
            time.sleep(0.1)
        entries = _entries_for(store, queue)
        for entry in entries:
            store.remove(entry.id)

    assert len(entries) == len(cases)
    for name, (_, reason, words) in cases.items():
        matching = [e for e in entries if e.reason == reason and words in e.error]
        assert matching, f"{name}: no {reason} entry mentioning {words!r} in {[(e.reason, e.error) for e in entries]}"
        assert matching[0].raw or matching[0].args is not None, name
    assert not marker.exists(), "a worker unpickled a message"
    log = child.log_text()
    assert log.count("dead-lettered ") == len(cases), log[-4000:]
    assert "Unrecoverable error" not in log and "Traceback" not in log, log[-4000:]
    assert child.alive()
    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0


def test_a_dead_lettered_task_fails_its_result_with_the_reason(
    worker: Callable[..., Child], queue: str, redis_url: str
) -> None:
    worker("threads", 2)
    task_id = str(uuid.uuid4())
    headers = {"lang": "py", "task": "tasks.io_sleep", "id": task_id, "retries": 0, "timelimit": "soon"}
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        client.lpush(queue, envelope(queue, json.dumps([[5], {}, {}]).encode(), headers=headers))
        result = app.AsyncResult(task_id)
        with pytest.raises(DeadLettered, match="invalid: header 'timelimit'"):
            result.get(timeout=30)
        entry = DeadLetterStore(client).get(task_id)
        assert entry is not None and entry.args == [5] and entry.task == "tasks.io_sleep"
        DeadLetterStore(client).remove(task_id)


# header -> words of the dead-letter error. Each stopped every worker (issue 10, item 1): the first is checked
# before Celery reads it; Celery raises on the others, in Request.revoked (stamps that cannot be dict keys)
# and Request.__init__ (an empty expiry it takes for a date), and the consumer dead-letters what it raised.
MALFORMED_HEADERS: list[tuple[dict[str, object], str]] = [
    ({"stamped_headers": 5}, "header 'stamped_headers' must be a list"),
    ({"stamped_headers": [["a"]]}, "Celery could not take the message: TypeError"),
    ({"stamped_headers": [{"b": 1}]}, "Celery could not take the message: TypeError"),
    ({"expires": ""}, "Celery could not take the message: AttributeError"),
]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", POOLS)
def test_a_malformed_celery_header_is_dead_lettered_and_the_worker_keeps_serving(
    pool: str, worker: Callable[..., Child], queue: str, redis_url: str
) -> None:
    # As many slots as messages that raise after prefork's worker took a slot (WorkController._process_task_sem):
    # had they kept their slots, the good job would never start.
    child = worker(pool, 2)
    sent = [(str(uuid.uuid4()), str(uuid.uuid4()), headers, words) for headers, words in MALFORMED_HEADERS]
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        for task_id, tag, headers, _ in sent:
            message_headers, body = task_message(task_id, [5], headers=headers)
            client.lpush(queue, envelope(queue, body, headers=message_headers, tag=tag))
        store = DeadLetterStore(client)
        for task_id, _, headers, words in sent:
            with pytest.raises(DeadLettered, match="invalid: "):
                app.AsyncResult(task_id).get(timeout=30)
            entry = store.get(task_id)
            assert entry is not None and entry.reason == Reason.INVALID and words in entry.error, (headers, entry)
            assert entry.args == [5], entry
            store.remove(task_id)
        assert io_sleep.apply_async((5,), queue=queue).get(timeout=30)["slept_ms"] == 5
        wait_acked(client, [tag for _, tag, _, _ in sent], child)
    log = child.log_text()
    assert "Unrecoverable error" not in log and log.count("dead-lettered ") == len(sent), log[-4000:]
    assert child.alive()
    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", POOLS)
def test_an_exception_outside_the_task_body_fails_the_task_once_and_acks_it(
    pool: str, worker: Callable[..., Child], queue: str, redis_url: str
) -> None:
    # The tracer raises after the body ran, handling callbacks/chain/errbacks (issue 10, item 5).
    child = worker(pool, 2)
    task_id, tag = str(uuid.uuid4()), str(uuid.uuid4())
    headers, body = task_message(task_id, [5], embed={"callbacks": "nope", "errbacks": 5, "chain": "x"})
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        client.lpush(queue, envelope(queue, body, headers=headers, tag=tag))
        with pytest.raises(Exception) as failure:
            app.AsyncResult(task_id).get(timeout=30)
        assert not isinstance(failure.value, DeadLettered), failure.value
        assert io_sleep.apply_async((5,), queue=queue).get(timeout=30)["slept_ms"] == 5
        wait_acked(client, [tag], child)
        assert client.llen(queue) == 0
    assert child.alive()
    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0


class _RequestCallbacks:
    """What the asyncio pool calls back on: Celery's Request hands it its bound ``on_accepted``."""

    def __init__(self) -> None:
        self.failures: list[ExceptionInfo] = []
        self.failed = threading.Event()

    def on_accepted(self, pid: int, time_accepted: float) -> None:
        pass

    def on_failure(self, exc_info: ExceptionInfo, **_: object) -> None:
        self.failures.append(exc_info)
        self.failed.set()


@pytest.mark.parametrize("name", ["tasks.io_sleep", "celery.backend_cleanup"])  # an async body, a sync one
def test_an_asyncio_target_that_raises_fails_the_request_once(name: str) -> None:
    """In process, no worker: what raises out of Celery's tracer on the asyncio pool fails the request, as
    prefork's pool does (Request.on_failure acks it), instead of leaving the message unacknowledged."""
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    request = _RequestCallbacks()

    def target(*args: object) -> None:
        raise RuntimeError("the tracer broke")

    try:
        pool.on_apply(target, args=(name, "job-1"), accept_callback=request.on_accepted,
                      callback=lambda result: pytest.fail(f"on_success called with {result!r}"))
        assert request.failed.wait(10)
    finally:
        pool.on_stop()
    assert len(request.failures) == 1
    raised = request.failures[0].exception
    assert "the tracer broke" in str(getattr(raised, "exc", raised))  # billiard wraps it: ExceptionWithTraceback
