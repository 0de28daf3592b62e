"""Enqueueing from any code: many jobs in one Redis round trip, and awaitable sends for asyncio apps.

::

    from tasks import fetch_url
    from loopline.app.producer import send_many, asend_many

    results = send_many(fetch_url, [((url,), {}) for url in urls])          # one pipeline, validated first
    result = await fetch_url.delay_async(url)                               # from an ASGI handler
    results = await asend_many(fetch_url, [((url,), {}) for url in urls])

Validation runs for every job before any is sent, so a bad job in a batch sends nothing.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from celery import Task
from celery.result import AsyncResult
from kombu import Queue
from kombu.serialization import dumps as kombu_serialize
from kombu.utils.url import maybe_sanitize_url

from loopline.app.envelope import Envelope
from loopline.app.message_template import MessageTemplate
from loopline.app.sent_events import SentEvents
from loopline.app.task_ids import uuid4_strings
from loopline.errors import CONNECTION_FAILURES, RedisUnavailable

__all__ = ["BATCH_MAX_COMMANDS", "ENTRIES_PER_PUSH", "EVENTS_PER_MESSAGE", "PUSH_MAX_CHARS", "Call", "asend_many",
           "release_result_subscriptions", "send_many"]

Call = tuple[Sequence[Any], dict[str, Any]]
# kombu flushes its publish pipeline every this many Redis commands.
BATCH_MAX_COMMANDS = 1000
# task-sent events per task.multi message.
EVENTS_PER_MESSAGE = 500
# Spliced list entries per LPUSH (loopline's Redis transport): about 1.3 kB each for a small job, and fewer when
# their text adds up to PUSH_MAX_CHARS (jobs with large arguments), so one command stays a few MB at most.
ENTRIES_PER_PUSH = 500
PUSH_MAX_CHARS = 4 * 1024 * 1024


def _bound_queue(app: Any, producer: Any, queue: Any) -> Any:
    """The queue every job of the batch goes to, bound to the producer's channel; None when routes choose it.

    ``celery.app.routes.Router.expand_destination`` turns a queue name into the app's unbound ``Queue`` for every
    message, and ``kombu.common.maybe_declare`` then binds a copy of it to the channel each time (a fifth of
    a bulk send) before finding it declared. Given once bound, the same queue is declared once. Without a
    queue the router picks ``task_default_queue`` when the app has no ``task_routes``; with routes it may
    pick by arguments, so each job keeps its own routing.
    """
    if queue is None:
        if app.amqp.router.routes:
            return None
        queue = app.conf.task_default_queue
    if isinstance(queue, str):
        try:
            queue = app.amqp.queues[queue]  # the Queue Celery creates on demand (task_create_missing_queues)
        except KeyError:
            return None  # not created on demand: Celery's router raises its QueueNotFound for each job
    return queue.bind(producer.channel) if isinstance(queue, Queue) else None


def send_many(task: Task, calls: Iterable[Call], **options: Any) -> list[AsyncResult]:
    """Send one ``task`` message per (args, kwargs) over one connection, in few round trips.

    The first job's message is built and published by Celery's ``apply_async``, as one ``.delay()`` would be.
    The others are built from it where that is exact (:class:`MessageTemplate`); on loopline's Redis transport
    their list entries are spliced from the first one's (:class:`~loopline.app.envelope.Envelope`) and pushed
    ENTRIES_PER_PUSH to an LPUSH (``Channel.put_many``), elsewhere they go through kombu's ``Producer.batch``
    (kombu.messaging, Redis transport's ``PublishBatch``), one pipelined LPUSH each. The results' channels are
    subscribed in a few SUBSCRIBEs (``RedisBackend.on_tasks_call``) instead of one each, and the ``task-sent``
    events go out as ``task.multi`` lists (:class:`~loopline.app.sent_events.SentEvents`) instead of a message
    each, spliced from the first job's too where its entry is.
    """
    batch = [(tuple(args), dict(kwargs)) for args, kwargs in calls]
    _check_each(task, batch, options)
    app = task.app
    if "task_id" in options:
        raise TypeError("send_many: task_id would name every job alike; each job gets an id of its own")
    if not batch:
        return []
    ids = uuid4_strings(len(batch))
    events = SentEvents(app.amqp._event_dispatcher)
    options.setdefault("event_dispatcher", events)
    try:
        with _collector_paused(), app.producer_or_acquire() as producer:
            with producer.batch(BATCH_MAX_COMMANDS):
                queue = _bound_queue(app, producer, options.get("queue"))
                if queue is not None:
                    options["queue"] = queue
                subscribe = getattr(app.backend, "on_tasks_call", None)
                if subscribe is not None and not options.get("ignore_result", task.ignore_result):
                    subscribe(ids)
                template = MessageTemplate(app)
                unwatch = template.watch(producer)
                try:
                    first = task.apply_async(*batch[0], task_id=ids[0], producer=producer, **options)
                finally:
                    unwatch()
                template.event = events.last
                usable = len(batch) > 1 and template.usable(task, options)
                spliced = template.envelope(producer, *batch[0]) if usable else None
                if spliced is None:
                    results = [first, *_send(task, producer, batch, ids, events, options, template, usable)]
                    events.flush(producer)
                    return results
            # The batch is written, the first job with it: the others follow it in the queue.
            results = [first, *_push(task, producer, batch, ids, events, options, template, *spliced)]
            events.flush(producer)
            return results
    except CONNECTION_FAILURES as exc:
        # Written without kombu's retries (PublishBatch.flush, Channel.put_many): what was written before the
        # failure is queued.
        url = maybe_sanitize_url(task.app.conf.broker_url or "?")
        raise RedisUnavailable(f"{task.name}: lost {url} while sending {len(batch)} jobs ({type(exc).__name__}: "
                               f"{exc}); jobs written before it (in chunks of up to {BATCH_MAX_COMMANDS} commands "
                               f"or {ENTRIES_PER_PUSH} jobs) may be queued, the rest were not sent") from exc


def _check_each(task: Task, batch: list[tuple[tuple[Any, ...], dict[str, Any]]], options: dict[str, Any]) -> None:
    """What ``apply_async`` would refuse, refused for every job before any is sent: a bad job sends none.

    The task's own ``check_job`` (loopline's tasks); Celery's argument check against the signature when the task
    is ``typing`` (``celery.app.task.Task.apply_async``: a TypeError); and for a task without ``check_job``
    whose arguments go out as they are (not pydantic models, which ``apply_async`` dumps first), that they
    encode with the message's serializer (kombu's EncodeError).
    """
    resolved = task._get_current_object() if hasattr(task, "_get_current_object") else task  # shared_task
    check = getattr(resolved, "check_job", None)
    signature = getattr(resolved, "__header__", None) if resolved.typing else None
    serializer = None
    if check is None and getattr(resolved, "_dump_pydantic_arguments", None) is None:
        serializer = options.get("serializer") or resolved.serializer
    for args, kwargs in batch:
        if check is not None:
            check(args, kwargs)
        if signature is not None:
            signature(*args, **kwargs)
        if serializer is not None:
            kombu_serialize((args, kwargs), serializer=serializer)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the send, if it was on (and on again after).

    A bulk send allocates a few containers per job that all stay alive (each AsyncResult holds a promise and a
    WeakMethod, ``celery.result.AsyncResult.__init__``): the collector's generations fill again and again and
    each collection walks the growing heap, which cost more than half of building the results (5 of 9 µs per
    AsyncResult in a 20,000-job send). Reference counting still frees what the send drops; a cycle it leaves
    waits for the next collection after the send. Process-wide, as the collector is: a call made while another
    thread's send has paused it leaves it to that send to turn back on.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _subscriber(task: Task, options: dict[str, Any]) -> Any:
    """The backend to subscribe each job's result with, as Celery's ``send_task`` does; None when
    ``send_many`` subscribed them all at once (loopline's backend) or the results are ignored."""
    if hasattr(task.app.backend, "on_tasks_call") or options.get("ignore_result", task.ignore_result):
        return None
    return task.app.backend


def _result(task: Task, task_id: str, ignored: bool) -> AsyncResult:
    result = task.AsyncResult(task_id)
    result.ignored = ignored  # as Celery.send_task sets it
    return result


def _push(task: Task, producer: Any, batch: list[tuple[tuple[Any, ...], dict[str, Any]]], ids: list[str],
          events: SentEvents, options: dict[str, Any], template: MessageTemplate, envelope: Envelope, queue: str,
          message: dict[str, Any]) -> list[AsyncResult]:
    """Jobs 2..N as list entries spliced from the first one's, pushed ENTRIES_PER_PUSH to a command."""
    ignored = options.get("ignore_result", task.ignore_result)
    subscribe_each = _subscriber(task, options)
    put_many = producer.channel.put_many
    # Delivery tags, as virtual.Channel._next_delivery_tag gives each message; the first job's has one.
    tags = ["", *uuid4_strings(len(batch) - 1)]
    spliced_events = events.splice()
    results: list[AsyncResult] = []
    entries: list[str] = []
    size = 0
    for at in range(1, len(batch)):
        (args, kwargs), task_id = batch[at], ids[at]
        if subscribe_each is not None:
            subscribe_each.on_task_call(producer, task_id)
        argsrepr, kwargsrepr = template.reprs(args, kwargs)
        entry = envelope.entry(task_id, tags[at], argsrepr, kwargsrepr, args, kwargs)
        entries.append(entry)
        size += len(entry)
        if spliced_events:
            events.add(task_id, argsrepr, kwargsrepr)
        else:
            template.sent_event(task_id, argsrepr, kwargsrepr, events, producer)
        results.append(_result(task, task_id, ignored))
        if len(entries) == ENTRIES_PER_PUSH or size >= PUSH_MAX_CHARS or at == len(batch) - 1:
            put_many(queue, message, entries)
            entries, size = [], 0
            if events.pending >= EVENTS_PER_MESSAGE:
                events.flush(producer)
    return results


def _send(task: Task, producer: Any, batch: list[tuple[tuple[Any, ...], dict[str, Any]]], ids: list[str],
          events: SentEvents, options: dict[str, Any], template: MessageTemplate,
          usable: bool) -> list[AsyncResult]:
    """Jobs 2..N in kombu's publish batch: built from the first one's message when ``usable``, else each by
    ``apply_async``."""
    results: list[AsyncResult] = []
    if usable:
        ignored = options.get("ignore_result", task.ignore_result)
        subscribe_each = _subscriber(task, options)
        for (args, kwargs), task_id in zip(batch[1:], ids[1:], strict=True):
            if subscribe_each is not None:
                subscribe_each.on_task_call(producer, task_id)
            template.publish(producer, task_id, args, kwargs, events)
            results.append(_result(task, task_id, ignored))
            if events.pending >= EVENTS_PER_MESSAGE:
                events.flush(producer)
        return results
    for (args, kwargs), task_id in zip(batch[1:], ids[1:], strict=True):
        results.append(task.apply_async(args, kwargs, task_id=task_id, producer=producer, **options))
        if events.pending >= EVENTS_PER_MESSAGE:
            events.flush(producer)
    return results


async def asend_many(task: Task, calls: Iterable[Call], **options: Any) -> list[AsyncResult]:
    """:func:`send_many` without blocking the running event loop (the send runs on a worker thread)."""
    # A shared task is a proxy for ``current_app.tasks[name]``, and the current app is per thread: resolved on
    # the worker thread it would be Celery's fallback app, with its default broker.
    resolved = task._get_current_object() if hasattr(task, "_get_current_object") else task
    return await asyncio.to_thread(send_many, resolved, list(calls), **options)


def release_result_subscriptions(app: Any) -> None:
    """Before a producer exits: drop its result subscriptions and close their connection.

    Each ``AsyncResult`` unsubscribes from its Redis channel when it is garbage-collected
    (``celery.backends.redis.ResultConsumer.cancel_for``); at interpreter exit that runs after Redis or
    the import system is gone, and prints a "must be restarted" or ``sys.meta_path is None`` traceback.
    """
    consumer = getattr(app.backend, "result_consumer", None)
    if consumer is None:
        return
    subscribed = getattr(consumer, "subscribed_to", None)
    if isinstance(subscribed, set):
        subscribed.clear()
    try:
        consumer.stop()
    except Exception:  # noqa: BLE001 - the connection may already be gone; there is nothing left to release
        pass
