"""loopline.app.producer: a bulk send puts on the wire what ``apply_async`` does, job for job, byte for byte."""

from __future__ import annotations

import base64
import gc
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest
import redis
from kombu.exceptions import EncodeError

from config.celery_app import app
from loopline.app import producer
from loopline.app.envelope import Envelope
from loopline.app.producer import ENTRIES_PER_PUSH, EVENTS_PER_MESSAGE, release_result_subscriptions, send_many
from loopline.app.sent_events import SentEvents
from loopline.errors import InvalidJob
from loopline.transport.redis import Channel
from tasks import fetch_url, io_sleep

Job = tuple[tuple[Any, ...], dict[str, Any]]


@app.task(name="tests.app.test_producer.echo")
def echo(*args: Any, **kwargs: Any) -> None:
    """Takes any JSON arguments and no validation: the wire format for every kind of value."""


class Point(pydantic.BaseModel):
    x: int


@app.task(name="tests.app.test_producer.typed")
def typed(a: int, b: int) -> None:
    """Two positional arguments: Celery's argument check (``typing``) refuses other counts at apply_async."""


@app.task(name="tests.app.test_producer.modelled", pydantic=True)
def modelled(point: Point) -> None:
    """A pydantic task: apply_async dumps each job's models before encoding them."""


@app.task(name="tests.app.test_producer.shadowed", shadow_name=lambda task, args, kwargs, options: f"shadow-{args[0]}")
def shadowed(n: int) -> None:
    """A shadow name made from each job's arguments."""


# The first job goes through apply_async; every later one is spliced from its entry, so the later ones hold what
# the first does not: kwargs, non-ASCII text, JSON escapes, values saferepr elides or truncates.
ECHO_JOBS: list[Job] = [
    ((1,), {}),
    ((), {"method": "HEAD", "timeout_s": 5, "ok": True, "none": None, "ratio": 0.1}),
    (("grüße", "日本", "emoji \U0001f600", "it's", 'say "hi"', "back\\slash", "new\nline\ttab\x00\u2028"),
     {"ключ": "значение"}),
    (([1, [2, [3, [4]]]], {"deep": {"er": {"est": [1]}}}), {}),  # deeper than task_repr_maxlevels: elided
    (("x" * 2000,), {"long": "y " * 800}),  # longer than argsrepr_maxsize / kwargsrepr_maxsize: truncated
    ((1.5e300, -0.0, 10 ** 30, False, None), {"list": [], "dict": {}, "nested": [[1], {"a": [2]}]}),
    (([1, 2, 3],), {"{braces}": "{0} {} }{"}),  # str.format's own syntax, in the spliced text
]
def decoded(raw: bytes) -> dict[str, Any]:
    message = json.loads(raw)
    assert message["properties"]["body_encoding"] == "base64"
    return {**message, "body": json.loads(base64.b64decode(message["body"]))}


def without_ids(message: dict[str, Any]) -> dict[str, Any]:
    """A task message minus what differs by job: its id (in three places) and its delivery tag."""
    headers, properties = dict(message["headers"]), dict(message["properties"])
    task_id = headers.pop("id")
    assert headers.pop("root_id") == task_id and properties.pop("correlation_id") == task_id
    properties.pop("delivery_tag")
    return {**message, "headers": headers, "properties": properties}


def queued(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    return [decoded(raw) for raw in reversed(client.lrange(queue, 0, -1))]  # LPUSHed: the newest comes first


class EventTap:
    """Every event message the broker fans out while the tap is open (kombu's Redis fanout: PUBLISH)."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("*celeryev*")
        self.events: list[dict[str, Any]] = []
        self.raw: list[bytes] = []
        self.messages = 0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._halt.is_set():
            item = self.pubsub.get_message(timeout=0.05)
            if item is None:
                continue
            body = decoded(item["data"])["body"]
            self.raw.append(item["data"])
            self.messages += 1
            self.events.extend(body if isinstance(body, list) else [body])

    def sent(self, task_id: str) -> dict[str, Any]:
        return next(e for e in self.events if e.get("uuid") == task_id)

    def close(self) -> None:
        self._halt.set()
        self._thread.join(5)
        self.pubsub.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    with redis.Redis.from_url(redis_url, socket_timeout=10) as conn:
        yield conn


@pytest.fixture
def tap(client: redis.Redis) -> Iterator[EventTap]:
    events = EventTap(client)
    yield events
    events.close()


@pytest.fixture(autouse=True)
def _clean(client: redis.Redis, queue: str) -> Iterator[None]:
    yield
    client.delete(queue)
    from config.celery_app import app

    release_result_subscriptions(app)


def entries(client: redis.Redis, queue: str) -> dict[bytes, list[bytes]]:
    """The raw entries of each of the queue's lists (one per priority level), oldest first."""
    keys = [key for key in client.scan_iter(match=f"{queue}*") if client.type(key) == b"list"]
    return {key: list(reversed(client.lrange(key, 0, -1))) for key in sorted(keys)}


def raw_without_ids(raw: bytes) -> bytes:
    """An entry as Redis holds it, with its task id (three places) and delivery tag replaced by fixed text."""
    message = json.loads(raw)
    task_id, tag = message["headers"]["id"], message["properties"]["delivery_tag"]
    assert message["headers"]["root_id"] == task_id == message["properties"]["correlation_id"]
    assert raw.count(task_id.encode()) == 3 and raw.count(tag.encode()) == 1
    return raw.replace(task_id.encode(), b"<task id>").replace(tag.encode(), b"<delivery tag>")


def apply_async_entries(client: redis.Redis, queue: str, task: Any, jobs: list[Job],
                        options: dict[str, Any]) -> dict[bytes, list[bytes]]:
    """What ``apply_async`` pushes for each job, one by one; the queue is emptied again."""
    for args, kwargs in jobs:
        task.apply_async(args, kwargs, queue=queue, **options)
    pushed = entries(client, queue)
    client.delete(*pushed)
    return pushed


class Spy:
    """Counts calls of a method, letting them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: type, name: str) -> None:
        self.calls: list[tuple[Any, ...]] = []
        real = getattr(owner, name)

        def spied(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, spied)


def assert_same_bytes(bulk: dict[bytes, list[bytes]], single: dict[bytes, list[bytes]]) -> None:
    assert list(bulk) == list(single)  # the same lists (priority levels)
    for key in single:
        assert [raw_without_ids(raw) for raw in bulk[key]] == [raw_without_ids(raw) for raw in single[key]]


@pytest.mark.parametrize(("task", "jobs", "options"), [
    (echo, ECHO_JOBS, {}),
    (echo, ECHO_JOBS, {"priority": 5}),
    (echo, ECHO_JOBS[:3], {"shadow": "named", "headers": {"trace": "t-1"}, "ignore_result": True}),
    (io_sleep, [((250,), {}), ((3,), {}), ((0,), {})], {}),
    (fetch_url, [(("http://127.0.0.1:9/x",), {"method": "HEAD", "timeout_s": 5}),
                 (("http://127.0.0.1:9/ü?q=ß",), {}), (("http://127.0.0.1:9/y",), {"method": "GET"})], {}),
], ids=["echo", "priority", "shadow-headers-ignore_result", "io_sleep", "fetch_url"])
def test_spliced_entries_are_the_bytes_apply_async_pushes_but_for_ids(
        client: redis.Redis, queue: str, task: Any, jobs: list[Job], options: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    single = apply_async_entries(client, queue, task, jobs, options)
    puts = Spy(monkeypatch, Channel, "put_many")
    results = send_many(task, jobs, queue=queue, **options)
    assert [len(call[3]) for call in puts.calls] == [len(jobs) - 1]  # all but the first spliced, in one LPUSH
    bulk = entries(client, queue)
    assert_same_bytes(bulk, single)
    assert [json.loads(raw)["headers"]["id"] for raws in bulk.values() for raw in raws] == [r.id for r in results]
    if "priority" in options:
        assert list(bulk) == [f"{queue}\x06\x163".encode()]  # kombu's key for priority 5 (steps 0, 3, 6, 9)


def test_a_long_batch_is_pushed_in_chunks_in_order(client: redis.Redis, queue: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    puts = Spy(monkeypatch, Channel, "put_many")
    count = 2 * ENTRIES_PER_PUSH + 7
    results = send_many(echo, [((i,), {"at": i}) for i in range(count)], queue=queue)
    assert [len(call[3]) for call in puts.calls] == [ENTRIES_PER_PUSH, ENTRIES_PER_PUSH, 6]
    messages = queued(client, queue)
    assert [m["headers"]["id"] for m in messages] == [r.id for r in results]
    assert [m["body"][:2] for m in messages] == [[[i], {"at": i}] for i in range(count)]
    assert [m["headers"]["argsrepr"] for m in messages] == [repr((i,)) for i in range(count)]
    assert len({m["properties"]["delivery_tag"] for m in messages}) == count


def test_without_a_bulk_put_the_rest_go_through_kombus_batch_alike(client: redis.Redis, queue: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    single = apply_async_entries(client, queue, echo, ECHO_JOBS, {})
    monkeypatch.delattr(Channel, "put_many")  # as on kombu's own Redis transport
    entry = Spy(monkeypatch, Envelope, "entry")
    send_many(echo, ECHO_JOBS, queue=queue)
    assert entry.calls == []
    assert_same_bytes(entries(client, queue), single)


def test_an_envelope_that_would_not_reproduce_the_first_entry_is_not_used(client: redis.Redis, queue: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    single = apply_async_entries(client, queue, echo, ECHO_JOBS, {})
    real_entry = Envelope.entry
    monkeypatch.setattr(Envelope, "entry", lambda self, *args: real_entry(self, *args).replace(", ", ","))
    puts = Spy(monkeypatch, Channel, "put_many")
    send_many(echo, ECHO_JOBS, queue=queue)
    assert puts.calls == []
    assert_same_bytes(entries(client, queue), single)


def test_a_named_exchange_takes_kombus_routing(client: redis.Redis, queue: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    options = {"exchange": queue, "routing_key": queue}  # the direct exchange Celery declares for the queue
    single = apply_async_entries(client, queue, echo, ECHO_JOBS[:3], options)
    puts = Spy(monkeypatch, Channel, "put_many")
    send_many(echo, ECHO_JOBS[:3], queue=queue, **options)
    assert puts.calls == []
    bulk = entries(client, queue)
    assert json.loads(bulk[queue.encode()][0])["properties"]["delivery_info"]["exchange"] == queue
    assert_same_bytes(bulk, single)


def test_validation_errors_are_those_of_apply_async_and_nothing_is_sent(client: redis.Redis, queue: str) -> None:
    with pytest.raises(InvalidJob) as single:
        io_sleep.apply_async((-1,), queue=queue)
    with pytest.raises(InvalidJob) as bulk:
        send_many(io_sleep, [((1,), {}), ((2,), {}), ((-1,), {})], queue=queue)
    assert str(bulk.value) == str(single.value)
    assert entries(client, queue) == {}


def test_the_garbage_collector_is_left_as_it_was(queue: str) -> None:
    assert gc.isenabled()
    send_many(io_sleep, [((1,), {})] * 3, queue=queue)
    assert gc.isenabled()
    gc.disable()
    try:
        send_many(io_sleep, [((1,), {})] * 3, queue=queue)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_default_queue_is_routed_alike(client: redis.Redis) -> None:
    default = app.conf.task_default_queue
    before = client.llen(default)
    try:
        single = io_sleep.delay(1)
        bulk = send_many(io_sleep, [((1,), {})])
        messages = [decoded(raw) for raw in client.lrange(default, 0, 1)]
        assert {m["headers"]["id"] for m in messages} == {single.id, bulk[0].id}
        assert without_ids(messages[0]) == without_ids(messages[1])
    finally:
        for raw in client.lrange(default, 0, -1)[: client.llen(default) - before]:
            client.lrem(default, 1, raw)


def test_task_sent_events_carry_the_same_fields_in_fewer_messages(tap: EventTap, queue: str) -> None:
    single = io_sleep.apply_async((5,), queue=queue)
    count = EVENTS_PER_MESSAGE + 20
    bulk = send_many(io_sleep, [((5,), {})] * count, queue=queue)
    wanted = {single.id, *(r.id for r in bulk)}
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not wanted <= {e.get("uuid") for e in tap.events}:
        time.sleep(0.05)
    varying = ("uuid", "root_id", "clock", "timestamp", "utcoffset")
    reference = {k: v for k, v in tap.sent(single.id).items() if k not in varying}
    assert reference["type"] == "task-sent" and reference["queue"] == queue
    for result in bulk:
        event = tap.sent(result.id)
        assert event["root_id"] == result.id
        assert {k: v for k, v in event.items() if k not in varying} == reference
    assert tap.messages <= 1 + 2  # apply_async's own, then one task.multi per EVENTS_PER_MESSAGE


def task_multi(tap: EventTap, task_ids: set[str]) -> bytes:
    """The one raw ``task.multi`` message that carries these tasks' events, once it has come."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for raw in list(tap.raw):
            body = decoded(raw)["body"]
            if isinstance(body, list) and {event["uuid"] for event in body} == task_ids:
                return raw
        time.sleep(0.05)
    raise AssertionError("no task.multi message carried exactly the batch's events")


def test_spliced_task_multi_messages_are_what_the_dispatcher_writes(tap: EventTap, client: redis.Redis, queue: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from kombu.utils.json import dumps as kombu_dumps

    added = Spy(monkeypatch, SentEvents, "add")
    spliced = send_many(echo, ECHO_JOBS, queue=queue)
    assert [call[1] for call in added.calls] == [r.id for r in spliced[1:]]
    monkeypatch.setattr(SentEvents, "splice", lambda self: False)  # every event prepared by Celery's dispatcher
    prepared = send_many(echo, ECHO_JOBS, queue=queue)
    raws = [task_multi(tap, {r.id for r in results}) for results in (spliced, prepared)]

    def without_varying(raw: bytes) -> bytes:
        message = json.loads(raw)
        return raw.replace(message["body"].encode(), b"<body>").replace(
            message["properties"]["delivery_tag"].encode(), b"<delivery tag>")

    assert without_varying(raws[0]) == without_varying(raws[1])  # the same envelope, byte for byte
    texts = [base64.b64decode(json.loads(raw)["body"]).decode() for raw in raws]
    assert texts[0] == kombu_dumps(json.loads(texts[0]))  # what kombu's JSON writes for these events
    varying = ("uuid", "root_id", "clock", "timestamp", "utcoffset")
    events = [json.loads(text) for text in texts]
    assert [[{k: v for k, v in e.items() if k not in varying} for e in way] for way in events] == [
        [{k: v for k, v in e.items() if k not in varying} for e in events[1]]] * 2
    for event, result in zip(events[0], spliced, strict=True):
        assert event["uuid"] == event["root_id"] == result.id
        assert list(event) == list(events[1][0])  # the dispatcher's field order
    clocks = [event["clock"] for event in events[0]]
    assert clocks == sorted(clocks) and len(set(clocks)) == len(clocks)
    headers = [json.loads(raw)["headers"] for raw in entries(client, queue)[queue.encode()][:len(ECHO_JOBS)]]
    assert [(e["args"], e["kwargs"]) for e in events[0]] == [(h["argsrepr"], h["kwargsrepr"]) for h in headers]


def test_spliced_events_a_publish_cannot_send_are_buffered_as_the_dispatcher_buffers_them() -> None:
    class Offline:
        def publish(self, *args: Any, **kwargs: Any) -> None:
            raise redis.ConnectionError("Connection refused")

    dispatcher = app.events.Dispatcher(enabled=False)
    try:
        events = SentEvents(dispatcher)
        fields = {"uuid": "a", "root_id": "a", "parent_id": None, "name": "n", "args": "(1,)", "kwargs": "{}"}
        events.publish("task-sent", fields, None)
        assert events.splice()
        events.add("b", "(2,)", "{'k': 'é'}")
        events.flush(Offline())
        ((buffered, routing_key),) = dispatcher._outbound_buffer
        assert routing_key == "task.multi"
        assert [(e["uuid"], e["args"], e["kwargs"]) for e in buffered] == [("a", "(1,)", "{}"),
                                                                           ("b", "(2,)", "{'k': 'é'}")]
    finally:
        dispatcher.close()


def test_every_bulk_result_channel_is_subscribed_before_the_jobs_go_out(client: redis.Redis, queue: str) -> None:
    results = send_many(io_sleep, [((1,), {})] * 30, queue=queue)
    keys = [app.backend.get_key_for_task(r.id) for r in results]
    counts = dict(client.pubsub_numsub(*keys))
    assert all(counts[key] >= 1 for key in keys), counts
    # A result stored now reaches its waiter over the subscription.
    app.backend.store_result(results[7].id, {"ok": True}, "SUCCESS")
    assert results[7].get(timeout=10) == {"ok": True}


def test_a_bulk_send_refuses_one_task_id_for_all(queue: str) -> None:
    with pytest.raises(TypeError, match="task_id would name every job alike"):
        send_many(io_sleep, [((1,), {})] * 2, queue=queue, task_id="same")


def count_apply_async(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from loopline.app.task import LooplineTask

    calls: list[str] = []
    real = LooplineTask.apply_async

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("task_id", "?"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LooplineTask, "apply_async", counted)
    return calls


def test_only_the_first_job_takes_apply_async_and_the_rest_are_spliced_from_it(
        monkeypatch: pytest.MonkeyPatch, client: redis.Redis, queue: str) -> None:
    built = Spy(monkeypatch, Envelope, "entry")
    calls = count_apply_async(monkeypatch)
    results = send_many(io_sleep, [((i,), {}) for i in range(5)], queue=queue)
    # Envelope.of fills the first job's values in once, to check the envelope reproduces its entry.
    assert calls == [results[0].id] and [call[1] for call in built.calls] == [r.id for r in results]
    messages = queued(client, queue)
    assert [m["body"][0] for m in messages] == [[i] for i in range(5)]
    assert [m["headers"]["argsrepr"] for m in messages] == [repr((i,)) for i in range(5)]


def test_a_publish_signal_makes_every_job_take_apply_async(monkeypatch: pytest.MonkeyPatch, queue: str) -> None:
    from celery.signals import before_task_publish

    seen: list[str] = []

    def on_publish(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
        seen.append((headers or {}).get("id", "?"))

    before_task_publish.connect(on_publish, weak=False)
    try:
        calls = count_apply_async(monkeypatch)
        results = send_many(io_sleep, [((i,), {}) for i in range(4)], queue=queue)
    finally:
        before_task_publish.disconnect(on_publish)
    assert seen == [r.id for r in results] and len(calls) == 4


def test_a_countdown_makes_every_job_take_apply_async(monkeypatch: pytest.MonkeyPatch, client: redis.Redis,
                                                     queue: str) -> None:
    calls = count_apply_async(monkeypatch)
    puts = Spy(monkeypatch, Channel, "put_many")
    send_many(io_sleep, [((1,), {})] * 3, queue=queue, countdown=30)
    assert len(calls) == 3 and puts.calls == []


def test_task_routes_make_every_job_take_apply_async(monkeypatch: pytest.MonkeyPatch, client: redis.Redis,
                                                    queue: str) -> None:
    def route(name: str, args: Any, kwargs: Any, options: Any, task: Any = None, **rest: Any) -> Any:
        return {"queue": queue} if name == echo.name else None  # routes may look at each job's arguments

    monkeypatch.setattr(app.amqp.router, "routes", [route])
    single = apply_async_entries(client, queue, echo, ECHO_JOBS[:3], {})
    calls = count_apply_async(monkeypatch)
    puts = Spy(monkeypatch, Channel, "put_many")
    send_many(echo, ECHO_JOBS[:3])
    assert len(calls) == 3 and puts.calls == []
    assert_same_bytes(entries(client, queue), single)


@pytest.mark.parametrize(("task", "jobs", "options"), [
    (modelled, [((Point(x=1),), {}), ((Point(x=2),), {}), ((Point(x=3),), {})], {}),
    (shadowed, [((1,), {}), ((2,), {}), ((3,), {})], {}),
    (echo, ECHO_JOBS[:3], {"headers": {"argsrepr": "<hidden>", "kwargsrepr": "<hidden>"}}),
    (modelled, [((Point(x=1),), {})], {}),
], ids=["pydantic", "shadow_name", "reprs-in-headers", "one-pydantic-job"])
def test_what_apply_async_does_per_job_is_done_for_every_job(
        client: redis.Redis, queue: str, task: Any, jobs: list[Job], options: dict[str, Any],
        monkeypatch: pytest.MonkeyPatch) -> None:
    single = apply_async_entries(client, queue, task, jobs, options)
    puts = Spy(monkeypatch, Channel, "put_many")
    send_many(task, jobs, queue=queue, **options)
    assert puts.calls == []  # not spliced: each job through apply_async
    assert_same_bytes(entries(client, queue), single)


@pytest.mark.parametrize(("task", "jobs", "error"), [
    (echo, [((1,), {}), ((object(),), {})], EncodeError),  # not JSON: kombu's error, as apply_async raises it
    (typed, [((1, 2), {}), ((1,), {})], TypeError),  # Celery's argument check
], ids=["not-json", "wrong-arguments"])
def test_a_job_apply_async_would_refuse_anywhere_in_the_batch_sends_none(
        client: redis.Redis, queue: str, task: Any, jobs: list[Job], error: type[Exception]) -> None:
    with pytest.raises(error):
        task.apply_async(*jobs[-1], queue=queue)
    with pytest.raises(error):
        send_many(task, jobs, queue=queue)
    assert entries(client, queue) == {}


def test_jobs_with_large_arguments_are_pushed_fewer_to_a_command(client: redis.Redis, queue: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(producer, "PUSH_MAX_CHARS", 10_000)
    puts = Spy(monkeypatch, Channel, "put_many")
    jobs: list[Job] = [(("x" * 3000, i), {}) for i in range(9)]
    single = apply_async_entries(client, queue, echo, jobs, {})
    send_many(echo, jobs, queue=queue)
    # Each entry is over 5,000 characters (the body base64-encoded, the argsrepr): two reach the limit.
    assert all(len(entry) > 5_000 for call in puts.calls for entry in call[3])
    assert [len(call[3]) for call in puts.calls] == [2, 2, 2, 2]
    assert_same_bytes(entries(client, queue), single)
