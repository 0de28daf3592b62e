"""The worker's consumer (workers/consumer.py) with a real asyncio worker: task events go out in batches on
a timer, every one of them arrives, and what is still buffered at shutdown is sent before the worker exits."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis
from waiting import wait_until

from loopline.bench.procs import Child
from tasks import io_sleep

RESULT_TIMEOUT_S = 30


@dataclass
class EventTap:
    """Every event message published on the private Redis: the task events in each, by task id."""

    messages: list[list[dict[str, object]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, data: bytes) -> None:
        envelope = json.loads(data)
        events = json.loads(base64.b64decode(envelope["body"]))
        with self.lock:
            self.messages.append(events if isinstance(events, list) else [events])

    def seen(self, kind: str) -> set[str]:
        with self.lock:
            return {str(event.get("uuid")) for batch in self.messages for event in batch if event.get("type") == kind}

    def worker_messages_about(self, ids: set[str]) -> int:
        """Messages carrying worker events of these tasks (not the producer's task-sent, one per send)."""
        with self.lock:
            return sum(1 for batch in self.messages
                       if any(event.get("uuid") in ids and event.get("type") != "task-sent" for event in batch))


@pytest.fixture
def tap(redis_url: str) -> Iterator[EventTap]:
    """Listens on kombu's fanout channels for Celery's event exchange (``/{db}.celeryev/<routing key>``)."""
    events = EventTap()
    client = redis.Redis.from_url(redis_url)
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.psubscribe("/*.celeryev/task.*")
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            message = listener.get_message(timeout=0.2)
            if message is not None:
                events.add(message["data"])

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    yield events
    stop.set()
    thread.join(5)
    listener.close()
    client.close()




@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", ["asyncio", "gevent"])
def test_task_events_arrive_complete_in_far_fewer_messages(
    worker: Callable[..., Child], queue: str, tap: EventTap, pool: str
) -> None:
    worker(pool, 20)
    results = [io_sleep.apply_async((20,), queue=queue) for _ in range(60)]
    ids = {result.id for result in results}
    for result in results:
        result.get(timeout=RESULT_TIMEOUT_S)

    wait_until(lambda: ids <= tap.seen("task-succeeded"), 20, "every task-succeeded event")
    assert ids <= tap.seen("task-received") and ids <= tap.seen("task-started")
    # Celery's own flush-on-next-iteration sends about one message per event or two: 100 or more here.
    assert tap.worker_messages_about(ids) < 30


@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", ["asyncio", "gevent"])
def test_events_still_buffered_at_shutdown_are_sent(worker: Callable[..., Child], queue: str, tap: EventTap,
                                                    pool: str) -> None:
    # A flush interval longer than the test: only the shutdown flush can send these events.
    child = worker(pool, 4, env={"LOOPLINE_EVENT_FLUSH_MS": "600000"})
    results = [io_sleep.apply_async((10,), queue=queue) for _ in range(3)]
    for result in results:
        result.get(timeout=RESULT_TIMEOUT_S)
    time.sleep(0.5)
    assert not tap.seen("task-succeeded") & {result.id for result in results}

    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0, child.log_text()[-3000:]
    wait_until(lambda: {result.id for result in results} <= tap.seen("task-succeeded"), 20, "the buffered events")
