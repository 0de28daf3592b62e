"""loopline.app.producer: a bulk send puts on the wire what ``apply_async`` does, job for job."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from loopline.app.producer import EVENTS_PER_MESSAGE, release_result_subscriptions, send_many
from tasks import fetch_url, io_sleep


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


@pytest.mark.parametrize(("task", "args", "kwargs", "options"), [
    (io_sleep, (250,), {}, {}),
    (fetch_url, ("http://127.0.0.1:9/x",), {"method": "HEAD", "timeout_s": 5},
     {"shadow": "named", "headers": {"trace": "t-1"}}),
])
def test_bulk_messages_match_apply_async_but_for_their_ids(client: redis.Redis, queue: str, task: Any,
                                                           args: tuple[Any, ...], kwargs: dict[str, Any],
                                                           options: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from loopline.app.message_template import MessageTemplate

    built: list[str] = []
    real_publish = MessageTemplate.publish

    def publish(self: MessageTemplate, producer: Any, task_id: str, *rest: Any) -> None:
        built.append(task_id)
        real_publish(self, producer, task_id, *rest)

    monkeypatch.setattr(MessageTemplate, "publish", publish)
    single = task.apply_async(args, kwargs, queue=queue, **options)
    bulk = send_many(task, [(args, kwargs)] * 3, queue=queue, **options)
    assert built == [r.id for r in bulk[1:]]  # built from the first job's message, not by apply_async
    messages = queued(client, queue)
    assert len(messages) == 4
    assert messages[0]["headers"]["id"] == single.id and [m["headers"]["id"] for m in messages[1:]] == [
        r.id for r in bulk]
    reference = without_ids(messages[0])
    for message in messages[1:]:
        assert without_ids(message) == reference


def test_the_default_queue_is_routed_alike(client: redis.Redis) -> None:
    from config.celery_app import app

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


def test_every_bulk_result_channel_is_subscribed_before_the_jobs_go_out(client: redis.Redis, queue: str) -> None:
    from config.celery_app import app

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


def test_only_the_first_job_takes_apply_async_and_the_rest_are_built_from_it(
        monkeypatch: pytest.MonkeyPatch, client: redis.Redis, queue: str) -> None:
    from loopline.app.message_template import MessageTemplate

    built: list[str] = []
    real_publish = MessageTemplate.publish

    def publish(self: MessageTemplate, producer: Any, task_id: str, *rest: Any) -> None:
        built.append(task_id)
        real_publish(self, producer, task_id, *rest)

    monkeypatch.setattr(MessageTemplate, "publish", publish)
    monkeypatch.setattr(MessageTemplate, "usable", lambda self, task, options: True)  # LooplineTask is patched
    calls = count_apply_async(monkeypatch)
    results = send_many(io_sleep, [((i,), {}) for i in range(5)], queue=queue)
    assert calls == [results[0].id] and built == [r.id for r in results[1:]]
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
    send_many(io_sleep, [((1,), {})] * 3, queue=queue, countdown=30)
    assert len(calls) == 3
