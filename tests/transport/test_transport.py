"""The Redis transport (loopline/transport/redis.py): with a real asyncio worker, messages are fetched and acked in
batches, counted by Redis itself, and every message ends acked; in process, against a Redis of the test's
own that goes away and comes back, an ack is never lost and a close never restores an acked message."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from queue import Empty
from typing import Any

import pytest
import redis
from celery.worker import state
from kombu import Connection, Exchange, Queue

from loopline.bench.procs import Child
from loopline.embedded_redis import EmbeddedRedis
from loopline.transport.redis import Transport
from tasks import io_sleep

JOBS = 200
VISIBILITY_TIMEOUT_S = 1


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


# -- in process: acks across a Redis restart -----------------------------------------------------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, which it stops and starts again on the same port."""
    server = EmbeddedRedis(tmp_path / "broker")
    server.up()
    yield server
    server.down()


def _status(server: EmbeddedRedis) -> tuple[str, int]:
    status = server.status()
    assert status is not None
    return status.url, status.port


@contextmanager
def _connection(url: str) -> Iterator[Connection]:
    conn = Connection(url, transport=Transport, transport_options={
        "visibility_timeout": VISIBILITY_TIMEOUT_S, "socket_timeout": 1, "socket_connect_timeout": 1,
    })
    try:
        yield conn
    finally:
        conn.release()


def _deliver(conn: Connection, name: str, n: int) -> list[Any]:
    """Publish ``n`` messages to queue ``name`` and take them with acks owed, as a consumer does."""
    queue = Queue(name, Exchange(name, "direct"), routing_key=name)
    producer = conn.Producer(serializer="json")
    for i in range(n):
        producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue])
    bound = queue(conn.default_channel)
    messages = [bound.get(no_ack=False) for _ in range(n)]
    assert all(message is not None for message in messages)
    return messages


def _queued(client: redis.Redis, name: str) -> list[str]:
    """The delivery tags of the messages in queue ``name``."""
    return sorted(json.loads(raw)["properties"]["delivery_tag"] for raw in client.lrange(name, 0, -1))


def _unacked_tags(client: redis.Redis) -> set[str]:
    return {tag.decode() for tag in client.hkeys("unacked")}


@pytest.mark.timeout(60)
def test_an_ack_made_while_redis_is_down_is_sent_by_the_next_connection(own_redis: EmbeddedRedis, queue: str) -> None:
    url, port = _status(own_redis)
    with _connection(url) as conn:
        (message,) = _deliver(conn, queue, 1)
        own_redis.down()
        message.ack()  # kombu's QoS.ack raised here, and the ack was gone
        own_redis.up(port)
    with _connection(url) as conn, redis.Redis.from_url(url) as client:
        assert conn.default_channel is not None  # a new channel sends what the broken connection could not
        assert client.hlen("unacked") == 0
        assert client.zcard("unacked_index") == 0


@pytest.mark.timeout(60)
def test_closing_a_channel_restores_what_was_not_acked_and_nothing_that_was(
    own_redis: EmbeddedRedis, queue: str
) -> None:
    url, port = _status(own_redis)
    with _connection(url) as conn, redis.Redis.from_url(url) as client:
        done, unfinished = _deliver(conn, queue, 2)
        own_redis.down()
        done.ack()
        own_redis.up(port)
        conn.default_channel.close()  # a clean close (a worker's shutdown) restores its unfinished deliveries
        assert _queued(client, queue) == [unfinished.delivery_tag]
        assert client.hlen("unacked") == 0


class _StartedJob:
    """What the worker's state holds for a job that started (``celery.worker.state.task_accepted``)."""

    def __init__(self, message: Any) -> None:
        self.message = message


@pytest.mark.timeout(60)
def test_a_broken_connection_restores_only_jobs_not_started_and_the_others_ack_through_the_next(
    own_redis: EmbeddedRedis, queue: str
) -> None:
    url, _ = _status(own_redis)
    with _connection(url) as old, redis.Redis.from_url(url) as client:
        done, unfinished, waiting = _deliver(old, queue, 3)
        started = [_StartedJob(done), _StartedJob(unfinished)]
        state.active_requests.update(started)
        try:
            own_redis.restart()
            old.collect()  # what Celery's consumer does with a connection that broke; started jobs keep running
        finally:
            state.active_requests.difference_update(started)
        assert _queued(client, queue) == [waiting.delivery_tag]  # dropped by the pool: back in the queue at once
        with _connection(url) as new:
            channel = new.default_channel
            done.ack()  # the job finished after the reconnect: acked through the channel that delivered it
            time.sleep(VISIBILITY_TIMEOUT_S + 0.1)  # both entries are now old enough for the visibility sweep
            channel.qos.restore_visible(num=100, interval=1)
            # The sweep queued the message of the job that never acked, and applied the ack of the other.
            assert _queued(client, queue) == sorted([waiting.delivery_tag, unfinished.delivery_tag])
            assert client.hlen("unacked") == 0


@pytest.mark.timeout(60)
def test_a_restore_the_broken_connection_could_not_make_is_made_by_the_next(
    own_redis: EmbeddedRedis, queue: str
) -> None:
    url, port = _status(own_redis)
    with _connection(url) as old, redis.Redis.from_url(url) as client:
        (waiting,) = _deliver(old, queue, 1)  # its job never started: the pool drops it on the connection loss
        own_redis.down()
        old.collect()  # Redis is still down: the close cannot put it back
        own_redis.up(port)
        with _connection(url) as new:
            assert new.default_channel is not None
            assert _queued(client, queue) == [waiting.delivery_tag]  # at once, not after the visibility timeout
            assert client.hlen("unacked") == 0


@pytest.mark.timeout(60)
def test_a_channel_whose_connection_was_collected_closes_without_crashing(
    own_redis: EmbeddedRedis, queue: str
) -> None:
    url, _ = _status(own_redis)
    with _connection(url) as conn, redis.Redis.from_url(url) as client:
        (message,) = _deliver(conn, queue, 1)
        channel = conn.default_channel
        # kombu.Connection._do_close_transport, as Connection.collect leaves a channel it could not close:
        # kombu's _connparams then raised AttributeError("'NoneType' object has no attribute 'hostname'").
        conn.transport.client = None
        channel.close()
        assert channel.closed
        assert _unacked_tags(client) == {message.delivery_tag}  # still owed: the visibility sweep brings it back


@pytest.mark.timeout(60)
def test_a_channel_closes_when_its_outstanding_fetch_lost_the_connection(own_redis: EmbeddedRedis, queue: str) -> None:
    url, _ = _status(own_redis)
    with _connection(url) as conn:
        _deliver(conn, queue, 0)
        channel = conn.default_channel
        channel.basic_consume(queue, False, lambda message: None, "test-consumer")
        conn.transport.cycle._register_BRPOP(channel)  # as a poll does: the fetch is sent
        with pytest.raises(Empty):
            channel._brpop_read()  # nothing queued: the channel now waits for the queue (BLMOVE)
        assert channel._in_poll
        own_redis.down()
        channel.close()  # kombu read the reply here and let the ConnectionError out, half-way through the close
        assert channel.closed
        assert channel not in conn.transport.channels


# -- bulk put ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("priority", "expires_s", "prefix"), [(0, None, ""), (5, None, ""), (9, 30, ""),
                                                               (0, None, "pfx:")])
def test_put_many_leaves_the_lists_as_one_put_per_message_does(
    redis_url: str, client: redis.Redis, queue: str, priority: int, expires_s: int | None, prefix: str
) -> None:
    """kombu's _put for each message, against put_many for the same entries: same keys, order, expiry."""
    arguments = {"x-expires": expires_s * 1000} if expires_s else None
    options = {"global_keyprefix": prefix} if prefix else {}
    names = {"single": f"{queue}.single", "bulk": f"{queue}.bulk"}
    lists: dict[str, dict[bytes, list[bytes]]] = {}
    with Connection(redis_url, transport=Transport, transport_options=options) as conn:
        channel = conn.default_channel
        for way, name in names.items():
            Queue(name, Exchange(name, "direct"), routing_key=name, queue_arguments=arguments)(channel).declare()
            messages = [channel.prepare_message(f"m{i}", priority) for i in range(3)]
            for message in messages:
                message["properties"]["delivery_tag"] = f"tag-{message['body']}"
            if way == "single":
                for message in messages:
                    channel._put(name, message)
            else:
                channel.put_many(name, messages[0], [json.dumps(message) for message in messages])
            keys = sorted(key for key in client.scan_iter(match=f"{prefix}{name}*") if client.type(key) == b"list")
            lists[way] = {key.replace(name.encode(), b"<queue>"): client.lrange(key, 0, -1) for key in keys}
            if expires_s:
                assert all(0 < client.pttl(key) <= expires_s * 1000 for key in keys)
            client.delete(*keys)
    assert lists["bulk"] == lists["single"] and len(lists["single"]) == 1
    assert all(len(entries) == 3 for entries in lists["bulk"].values())


def test_put_many_of_nothing_sends_nothing(redis_url: str, queue: str) -> None:
    with Connection(redis_url, transport=Transport) as conn:
        conn.default_channel.put_many(queue, {"properties": {}}, [])
