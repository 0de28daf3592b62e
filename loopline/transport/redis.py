"""kombu's Redis transport, made safe: nothing popped is lost, and a bad queue entry is dead-lettered, not fatal.

Three gaps of ``kombu.transport.redis.Channel`` (kombu 5.7) are closed here:

- **Loss on a crash.** ``BRPOP`` removes a message before the worker records it as unacked; see
  ``loopline.transport.fetch``. Consumers whose queues are all acknowledged (every Celery task consumer) fetch
  with the atomic pop instead, on Redis 6.2 and later; others keep kombu's ``BRPOP``.
- **One bad entry stops the worker.** ``_brpop_read`` parses each entry with ``json.loads`` and builds a
  ``virtual.Message`` from it; an entry that is not JSON, or lacks ``properties``, raises out of the event
  loop ("Unrecoverable error"). Such entries, and entries over ``max_message_bytes``, are dead-lettered.
- **An ack lost to a broken connection.** kombu removes an acked message from ``unacked`` with one write; if
  the connection is down the write fails and the ack is forgotten, and the message runs again after the
  visibility timeout (or at once: the channel's close restores it). Here an ack is recorded in memory first;
  one that could not be sent is kept (``unsent_acks``, per broker, for the whole process) and sent by the next
  channel to that broker, also for messages delivered on a connection that has since broken. The
  visibility sweep applies such an ack instead of restoring its message. A connection that broke
  (Celery collects it) restores at close only the deliveries whose job has not started: a started job
  keeps running and acks (if the worker dies first, the visibility timeout brings it back).

The app selects this transport for ``redis://`` and ``rediss://`` brokers (``broker_transport`` in
``loopline.install``); producers use it too, unchanged.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from queue import Empty
from typing import Any

from celery import current_app
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from redis.exceptions import ConnectionError as RedisConnectionError

from loopline.deadletter.messages import envelope_problem
from loopline.deadletter.store import DeadLetter, DeadLetterStore, Reason, truncate_raw
from loopline.transport.fetch import MAX_BATCH, POP_SCRIPT, supports_atomic_fetch

__all__ = ["Channel", "OwedTags", "QoS", "Transport", "started_tags", "unsent_acks", "unsent_restores"]

logger = logging.getLogger(__name__)

POP, WAIT = "pop", "wait"  # which command of the atomic fetch is outstanding
CREDIT_RECHECK_S = 0.05
ACK_DELAY_S = 0.05  # the longest an ack made on the event loop waits to be sent with others
ACK_BATCH = 64  # or until this many are waiting
RESTORE_GATE = 0.9  # of the restore interval: the event loop's timer may fire a little early
ACK_RETRY_S = 0.5  # after a failed ack, the least wait before the next try (a new channel tries at once)


class OwedTags:
    """Delivery tags owed a write that a broken connection could not make (an ack, a restore), per broker,
    until a channel to that broker makes it.

    Process-wide, because the channel that delivered a message is not the one that can settle it after a
    reconnect: Celery replaces the broken connection, its transport and channels, while a message still
    acks through the channel it came from (``kombu.message.Message.ack`` → ``channel.basic_ack``). A
    broker is named by ``Channel.ack_home``: host, port, database and the unacked keys.
    """

    def __init__(self) -> None:
        self._tags: dict[tuple[Any, ...], set[str]] = {}
        self._retry_at: dict[tuple[Any, ...], float] = {}
        self._lock = threading.Lock()

    def add(self, home: tuple[Any, ...], tags: Iterable[str], *, retry_after_s: float = 0.0) -> None:
        with self._lock:
            self._tags.setdefault(home, set()).update(tags)
            self._retry_at[home] = time.monotonic() + retry_after_s

    def due(self, home: tuple[Any, ...]) -> bool:
        return bool(self._tags.get(home)) and time.monotonic() >= self._retry_at.get(home, 0.0)

    def take(self, home: tuple[Any, ...]) -> list[str]:
        with self._lock:
            return list(self._tags.pop(home, ()))

    def holds(self, home: tuple[Any, ...], tag: str) -> bool:
        return tag in self._tags.get(home, ())


unsent_acks = OwedTags()  # acked: remove from unacked
unsent_restores = OwedTags()  # not started, dropped by the pool: back to the queue


def started_tags() -> set[str]:
    """The delivery tags of the jobs this worker process has started and not finished.

    ``celery.worker.state.active_requests`` holds each request from ``task_accepted`` (its job started: a
    pool slot or prefork child took it) to ``task_ready``; with ``worker_cancel_long_running_tasks_on_connection_loss``
    off, such a job runs on after the connection broke. A request still waiting for a slot is not there: the
    pool drops it on a connection loss (``BasePool.flush``, from ``Consumer.on_close``), so its message must
    go back to the queue.
    """
    from celery.worker import state

    return {tag for request in list(state.active_requests)
            if isinstance(tag := getattr(getattr(request, "message", None), "delivery_tag", None), str)}


class QoS(kombu_redis.QoS):
    """kombu's ack emulation, minus the unacked write for messages the pop script already recorded, and
    with the acks made on the event loop sent in batches.

    ``kombu.transport.redis.QoS.ack`` removes each acked message from ``unacked`` and ``unacked_index``
    with its own MULTI/ZREM/HDEL/EXEC. With an event loop (every pool but gevent) Celery makes every ack
    on the loop's thread (``Consumer.call_soon_ack`` → ``hub.call_soon``); a round trip each was the
    largest single cost of a busy asyncio worker. An ack made on that thread is counted at once (the
    prefetch credit returns) and its removal waits, at most ACK_DELAY_S or until ACK_BATCH are pending,
    to go out with the others: one ZREM and one HDEL for all of them (``Poller.on_poll_start`` checks
    before the loop polls, a loop timer every ACK_DELAY_S). Until then the message is still recorded as
    unacked, so a worker that dies in between has it redelivered (at least once, never lost); the channel
    sends what is pending before it closes. Celery runs every pool but gevent on the event loop (the
    threads pool too: ``WorkController.should_use_eventloop``), and routes their acks to its thread; acks
    made on any other thread (gevent's synchronous loop) are sent at once. An ack that cannot be sent
    is kept and sent again (``unsent_acks``), never dropped.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending_acks: list[str] = []
        self._pending_since = 0.0
        self._pending_lock = threading.Lock()

    def append(self, message: Any, delivery_tag: str) -> None:
        recorded: set[str] = self.channel._recorded
        if delivery_tag in recorded:
            recorded.discard(delivery_tag)
            virtual.QoS.append(self, message, delivery_tag)
        else:
            super().append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        # Counted at once, and in memory before any write: the prefetch credit returns, and the channel's close
        # (virtual.QoS.restore_unacked_once drops acked tags first) never restores the message. kombu's
        # QoS.ack writes first and counts only if the write succeeded.
        virtual.QoS.ack(self, delivery_tag)
        channel = self.channel
        if channel.closed or channel.broken or channel.connection is None:  # its connection broke since
            unsent_acks.add(channel.ack_home, [delivery_tag])
            return
        with self._pending_lock:
            if not self._pending_acks:
                self._pending_since = time.monotonic()
            self._pending_acks.append(delivery_tag)
        if threading.get_ident() != channel.connection.cycle.loop_thread:
            self.flush_acks()

    def flush_acks(self, *, due_only: bool = False, retry_now: bool = False) -> None:
        """Remove the acked messages from the unacked records, in one round trip: the pending acks, and those
        kept from failed tries (at most every ACK_RETRY_S, unless ``retry_now``).

        With ``due_only``, the pending acks go only once ACK_BATCH are pending or the oldest has waited
        ACK_DELAY_S. Acks that cannot be sent are kept in ``unsent_acks``, for this or the next channel.
        """
        home = self.channel.ack_home
        carried = retry_now or unsent_acks.due(home)
        if not self._pending_acks and not carried:
            return
        if (due_only and not carried and len(self._pending_acks) < ACK_BATCH
                and time.monotonic() - self._pending_since < ACK_DELAY_S):
            return
        with self._pending_lock:
            tags, self._pending_acks = self._pending_acks, []
        if carried:
            tags += unsent_acks.take(home)
        if not tags:
            return
        try:
            with self.channel.conn_or_acquire() as client:
                client.pipeline().zrem(self.unacked_index_key, *tags).hdel(self.unacked_key, *tags).execute()
        except Exception as exc:  # noqa: BLE001 - as kombu's Message.ack_log_error, but the acks are kept
            unsent_acks.add(home, tags, retry_after_s=ACK_RETRY_S)
            logger.warning("could not acknowledge %d messages (%s: %s); trying again when Redis is back",
                           len(tags), type(exc).__name__, exc)

    def restore_by_tag(self, tag: Any, client: Any = None, leftmost: bool = False) -> None:
        # The visibility sweep (kombu's QoS.restore_visible) and the close (restore_unacked) restore through here.
        # A message acked but not yet removed from unacked ran to its end: remove it instead.
        name = bytes_to_str(tag)
        if name in self._pending_acks or unsent_acks.holds(self.channel.ack_home, name):
            with self.pipe_or_acquire(client=client) as pipe:
                self._remove_from_indices(tag, pipe).execute()
            return
        super().restore_by_tag(tag, client=client, leftmost=leftmost)

    def restore_unacked(self, client: Any = None) -> None:
        # Called by virtual.QoS.restore_unacked_once when the channel closes. kombu's raises a connection error
        # out of Channel.close, which then never finishes; the messages are still in unacked, and the visibility
        # sweep brings them back.
        delivered: Any = self._delivered  # kombu declares None; virtual.QoS.__init__ sets an OrderedDict
        if self.channel.broken:
            for tag in started_tags() & set(delivered):
                del delivered[tag]  # left in unacked: the job acks when it ends (unsent_acks sends it)
        try:
            super().restore_unacked(client)
        except self.channel.connection_errors as exc:
            unsent_restores.add(self.channel.ack_home, list(delivered))
            logger.warning("could not restore %d messages at close (%s: %s); the next connection restores them",
                           len(delivered), type(exc).__name__, exc)
            delivered.clear()

    def restore_owed(self) -> None:
        """Put back in their queues the messages a broken connection's close could not restore."""
        tags = unsent_restores.take(self.channel.ack_home)
        for at, tag in enumerate(tags):
            try:
                self.restore_by_tag(tag)  # a no-op for a tag no longer in unacked (a sweep restored it)
            except self.channel.connection_errors as exc:
                unsent_restores.add(self.channel.ack_home, tags[at:], retry_after_s=ACK_RETRY_S)
                logger.warning("could not restore %d messages (%s: %s); trying again on the next connection",
                               len(tags) - at, type(exc).__name__, exc)
                return


class Channel(kombu_redis.Channel):
    """A Redis channel that fetches atomically and checks each entry before kombu builds a message from it."""

    QoS = QoS
    #: Entries longer than this are refused unread (transport option, from LOOPLINE_MAX_MESSAGE_BYTES).
    max_message_bytes: int | None = None
    #: The share of the prefetch window that must be free before an event-loop consumer fetches again
    #: (transport option; loopline/worker/sizing.py sets it for the asyncio pool). 0: fetch when one message fits.
    fetch_when_free: float = 0.0
    from_transport_options: tuple[str, ...] = (  # type: ignore[assignment]  # two options more than kombu's
        *kombu_redis.Channel.from_transport_options, "max_message_bytes", "fetch_when_free",
    )
    _fetch: str | None = None
    _fetch_queue: str = ""
    _atomic_server: bool | None = None
    _sync_client: Any = None
    ack_home: tuple[Any, ...] = ()
    #: Set when Celery collects the connection after it broke (Transport._collect).
    broken = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._acked_queues: set[str] = set()
        self._recorded: set[str] = set()
        super().__init__(*args, **kwargs)  # pings Redis: it is reachable now
        conninfo = self.connection.client
        self.ack_home = (conninfo.hostname, conninfo.port, str(conninfo.virtual_host), self.global_keyprefix,
                         self.unacked_key, self.unacked_index_key)
        # A new connection: first the acks the broken one could not send, then the restores.
        self.qos.flush_acks(retry_now=True)
        self.qos.restore_owed()

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        # kombu.transport.redis.Channel.conn_or_acquire builds a new redis.Redis on every call (every ack,
        # every restore sweep); one client on the same connection pool serves them all, from any thread.
        if client is not None:
            yield client
            return
        if self.connection is None or self.connection.client is None:
            # Closed, or its kombu Connection collected (Connection.collect → _do_close_transport): kombu's
            # _connparams would raise AttributeError ('NoneType' ... 'hostname'), which no caller treats as the
            # connection loss it is; Celery's consumer then dies with "Unrecoverable error".
            raise RedisConnectionError("the channel's connection is closed")
        if self._sync_client is None or self._sync_client.connection_pool is not self.pool:  # new after a reconnect
            self._sync_client = self._create_client()
        yield self._sync_client

    def close(self) -> None:
        if not self.closed:
            self.qos.flush_acks(retry_now=True)
            self._closing = True  # as kombu's close sets it: an empty pop must not start a wait
            if self._in_poll:
                # kombu.transport.redis.Channel.close reads the outstanding reply and lets anything but Empty
                # out, so a broken connection stops the close half-way: the channel stays open and registered,
                # and kombu closes it again once its Connection is gone (then _connparams raises).
                try:
                    self._brpop_read()
                except Empty:
                    pass
                except self.connection_errors as exc:
                    logger.debug("the outstanding fetch failed at close: %r", exc)
        super().close()

    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if not no_ack:
            self._acked_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._acked_queues.discard(self._tag_to_queue.get(consumer_tag))
        return super().basic_cancel(consumer_tag)

    def put_many(self, queue: str, message: dict[str, Any], entries: list[str]) -> None:
        """Deliver ``entries``, serialised messages of ``message``'s priority, to ``queue`` in one LPUSH.

        What ``kombu.transport.redis.Channel._put`` does for each message (the key of its priority, the queue's
        expiry renewed), with one command for all: LPUSH pushes its values in order, so the list ends as after
        one LPUSH each. For bulk producers (``loopline.app.producer.send_many``); no retry, as kombu's publish
        batches (``PublishBatch.flush``).
        """
        if not entries:
            return
        key = self._q_for_pri(queue, self._get_message_priority(message, reverse=False))
        with self.conn_or_acquire() as client:
            if not (self._expires and queue in self._expires):
                client.lpush(key, *entries)
                return
            pipe = client.pipeline(transaction=False)
            pipe.lpush(key, *entries)
            for pri in self.priority_steps:
                pipe.pexpire(self._q_for_pri(queue, pri), self._expires[queue])
            pipe.execute()

    # -- fetching ------------------------------------------------------------------------------------------

    def _atomic(self) -> bool:
        if not self.ack_emulation or not self.active_queues or not set(self.active_queues) <= self._acked_queues:
            return False
        if self._atomic_server is None:
            try:
                with self.conn_or_acquire() as client:
                    version = str(client.info("server").get("redis_version", "0"))
            except Exception as exc:  # noqa: BLE001 - INFO may be renamed or refused: keep kombu's BRPOP
                logger.warning("cannot read the Redis version (%s); fetching with BRPOP", exc)
                version = "0"
            self._atomic_server = supports_atomic_fetch(version)
            if not self._atomic_server:
                logger.warning("Redis %s has no BLMOVE: a worker killed mid-fetch can lose a message", version)
        return self._atomic_server

    def _key(self, key: str) -> str:
        return self.global_keyprefix + key

    def _send(self, state: str, *command: Any) -> None:
        self._fetch = state
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]  # kombu declares None
        self.client.connection.send_command(*command)

    def _brpop_start(self, timeout: float | None = None) -> None:
        # Replaces kombu.transport.redis.Channel._brpop_start: the same keys, fetched with POP_SCRIPT.
        if not self._atomic():
            self._fetch = None
            return super()._brpop_start(timeout)
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return None
        # The keys and order of kombu's BRPOP: every priority level of every queue, highest priority first.
        queue_keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in queues]
        # As many messages as the prefetch window has room for: one round trip per batch, not per message.
        credit = self.qos.can_consume_max_estimate()
        if credit is not None and credit < self._refill_at():
            return None  # the loop calls again each iteration, after the acks that return credit
        wanted = MAX_BATCH if credit is None else max(1, min(credit, MAX_BATCH))
        self._fetch_queue = queues[0]
        keys = [self._key(key) for key in (*queue_keys, self.unacked_key, self.unacked_index_key)]
        self._send(POP, "EVAL", POP_SCRIPT, len(keys), *keys, time.time(), self.max_message_bytes or 0, wanted)
        return None

    def _refill_at(self) -> int:
        """The credit to wait for before fetching: a share of the window (``fetch_when_free``) on the event
        loop's thread, where returning credit wakes the loop; one message anywhere else (a synchronous
        consumer would sleep through the credit returning)."""
        window = self.qos.prefetch_count or 0
        if not self.fetch_when_free or threading.get_ident() != self.connection.cycle.loop_thread:
            return 1
        return max(1, min(MAX_BATCH, int(window * self.fetch_when_free)))

    def _brpop_read(self, **options: Any) -> bool:
        if self._fetch is None:
            return self._guarded_brpop_read(**options)
        state, self._fetch = self._fetch, None
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "EVAL" if state == POP else "BLMOVE",
                                                   **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # as kombu does: the next poll reconnects
                raise
            except self.ResponseError as exc:
                logger.error("atomic fetch failed (%s); fetching with BRPOP from now on", exc)
                self._atomic_server = False
                raise Empty() from None
            if state == POP and reply:
                return self._deliver_popped(reply)
            if state == POP and not self._closing:
                # Nothing queued: block until the first queue has an entry, without taking it.
                key = self._key(self._q_for_pri(self._fetch_queue, 0))
                self._send(WAIT, "BLMOVE", key, key, "RIGHT", "RIGHT", self.brpop_timeout or 0)
            elif state == WAIT and not reply:
                self._queue_cycle.rotate(self._fetch_queue)  # idle: wait on the next queue next time
            raise Empty()
        finally:
            if self._fetch is None:
                self._in_poll = None  # type: ignore[assignment]  # as kombu does; it declares a bool
                self._flush_brpop_reauth()

    def _deliver_popped(self, reply: list[Any]) -> bool:
        """Deliver each entry of a POP_SCRIPT reply: (key, entry, recorded tag or 0) triples.

        Every entry is delivered even if one delivery raises (the first error is raised afterwards): the
        entries after it are already popped and recorded, and would otherwise wait for the visibility timeout.
        """
        failure: Exception | None = None
        for at in range(0, len(reply), 3):
            key, entry, recorded = reply[at:at + 3]
            queue = bytes_to_str(key)[len(self.global_keyprefix):].rsplit(self.sep, 1)[0]
            payload = self._checked(entry, queue)
            if payload is not None and isinstance(recorded, bytes) and recorded != str_to_bytes(
                    payload["properties"]["delivery_tag"]):
                # Recorded under a tag that is not UTF-8: the tag Python reads differs, so the message's ack
                # would remove nothing and it would come back after every visibility timeout.
                self._dead_letter(entry, queue, Reason.INVALID, "the envelope's delivery_tag is not UTF-8")
                payload = None
            if payload is None:
                if isinstance(recorded, bytes):  # recorded by the script, refused here: unrecord it, raw
                    self.qos._remove_from_indices(recorded).execute()
                continue
            if isinstance(recorded, bytes):
                self._recorded.add(payload["properties"]["delivery_tag"])
            try:
                self.connection._deliver(payload, queue)
            except Exception as exc:  # noqa: BLE001 - raised below, once the rest of the batch is delivered
                failure = failure or exc
        self._queue_cycle.rotate(queue)
        if failure is not None:
            raise failure
        return True

    def _guarded_brpop_read(self, **options: Any) -> bool:
        # kombu.transport.redis.Channel._brpop_read (kombu 5.7), with _checked() between the pop and the delivery.
        try:
            try:
                dest__item = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if not dest__item:
                raise Empty()
            dest, item = dest__item
            dest = bytes_to_str(dest).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            payload = self._checked(item, dest)
            if payload is not None:
                self.connection._deliver(payload, dest)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]  # as kombu does; it declares a bool
            self._flush_brpop_reauth()

    # -- checking ------------------------------------------------------------------------------------------

    def _checked(self, item: bytes, queue: str) -> dict[str, Any] | None:
        """The parsed envelope, or None after dead-lettering an entry that cannot become a message."""
        if self.max_message_bytes and len(item) > self.max_message_bytes:
            self._dead_letter(item, queue, Reason.OVERSIZED, f"the message is {len(item)} bytes, "
                              f"over LOOPLINE_MAX_MESSAGE_BYTES={self.max_message_bytes}")
            return None
        try:
            payload = json.loads(bytes_to_str(item))
        except ValueError as exc:
            self._dead_letter(item, queue, Reason.UNDECODABLE, f"the envelope is not JSON: {exc}")
            return None
        problem = envelope_problem(payload, self.decode_body)
        if problem is not None:
            self._dead_letter(item, queue, Reason.INVALID, problem)
            return None
        return payload

    def _dead_letter(self, item: bytes, queue: str, reason: str, error: str) -> None:
        entry = DeadLetter(reason=reason, error=error, queue=queue, raw=truncate_raw(item))
        try:
            # The consumer's store (loopline.worker.consumer): the result backend's Redis, of the worker's app.
            DeadLetterStore(current_app.backend.client).add(entry)
        except Exception as exc:  # noqa: BLE001 - the entry is already popped: log what was in it rather than crash
            logger.error("dropped a message from queue %r (%s: %s) and could not dead-letter it: %s; it began %r",
                         queue, reason, error, exc, item[:200])
            return
        logger.error("dead-lettered %s from queue %r: %s: %s", entry.id, queue, reason, error)


class Poller(kombu_redis.MultiChannelPoller):
    """kombu's poller, with restore sweeps gated by time and no sleeping through returned credit.

    - ``maybe_restore_messages`` runs from the event loop's timer (every ``unacked_restore_interval``) and, in
      the synchronous loop (gevent), after every empty poll; with ``unacked_restore_throttle`` 1 that would
      scan Redis on every poll. Here a sweep runs at most once per interval, whoever calls, and the
      synchronous loop calls it on every poll, so its sweeps do not depend on polls coming back empty.
    - Celery's synchronous loop drains with a 2 s timeout. While the prefetch window is full no fetch is
      outstanding, so the credit a finished job returns goes unnoticed until the timeout: a gevent worker
      with short jobs idles in bursts. Polls are cut to CREDIT_RECHECK_S while any window is full.
    """

    _restored_at = float("-inf")
    #: The thread running the event loop this poller is registered with (Transport.register_with_event_loop).
    loop_thread: int | None = None
    ack_flush_tref: Any = None

    def on_poll_start(self) -> None:
        # The hub's on_tick, once per iteration after its ready callbacks (the acks) ran and before it polls.
        for channel in self._channels:
            channel.qos.flush_acks(due_only=True)
        super().on_poll_start()

    def flush_acks(self) -> None:
        for channel in self._channels:
            channel.qos.flush_acks()

    def maybe_restore_messages(self) -> Any:
        intervals = [channel.unacked_restore_interval for channel in self._channels]
        now = time.monotonic()
        if intervals and now - self._restored_at < RESTORE_GATE * min(intervals):
            return None
        self._restored_at = now
        return super().maybe_restore_messages()

    def get(self, callback: Any, timeout: float | None = None) -> Any:
        self.maybe_restore_messages()
        if (timeout is None or timeout > CREDIT_RECHECK_S) and any(
            channel.active_queues and not channel.qos.can_consume() for channel in self._channels
        ):
            timeout = CREDIT_RECHECK_S
        return super().get(callback, timeout=timeout)


class Transport(kombu_redis.Transport):
    """``broker_transport`` for Redis brokers: kombu's transport with the safe Channel and Poller."""

    Channel = Channel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = Poller()  # type: ignore[assignment]  # replaces the MultiChannelPoller kombu's __init__ built

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        # Called by Celery's asynloop on the thread that then runs the loop (the worker's main thread).
        super().register_with_event_loop(connection, loop)
        poller: Poller = self.cycle  # type: ignore[assignment]  # kombu declares it None
        poller.loop_thread = threading.get_ident()
        # As kombu does with its own timers here: drop the entry of a previous connection, then add one.
        if poller.ack_flush_tref is not None:
            poller.ack_flush_tref.cancel()
        poller.ack_flush_tref = loop.call_repeatedly(ACK_DELAY_S, poller.flush_acks)

    def _collect(self, connection: Any) -> None:
        """Close a connection that broke, leaving the deliveries of started jobs recorded as unacked.

        ``kombu.Connection.collect`` calls this instead of closing the channels itself; Celery collects the
        consumer's connection only after it broke (``Consumer.on_connection_error_after_connected``), with
        ``worker_cancel_long_running_tasks_on_connection_loss`` off, so the jobs it delivered that have started
        keep running and ack through ``unsent_acks``: restoring their messages (kombu's close restores every
        delivery) ran each of them twice. The close restores only the others (``QoS.restore_unacked``).
        """
        poller: Poller = self.cycle  # type: ignore[assignment]  # kombu declares it None
        poller.close()
        avail: list[Any] = self._avail_channels
        channels = [*avail, *(self.channels or ())]
        avail.clear()
        for channel in channels:
            channel.broken = True
            try:
                channel.close()
            except Exception as exc:  # noqa: BLE001 - one channel's trouble must not leave the others open
                logger.warning("closing a channel of a broken connection failed (%s: %s)", type(exc).__name__, exc)
