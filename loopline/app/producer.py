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
from collections.abc import Iterable, Sequence
from typing import Any

from celery import Task
from celery.result import AsyncResult
from kombu import Queue
from kombu.utils.url import maybe_sanitize_url
from kombu.utils.uuid import uuid

from loopline.app.message_template import MessageTemplate
from loopline.errors import CONNECTION_FAILURES, RedisUnavailable

__all__ = ["BATCH_MAX_COMMANDS", "EVENTS_PER_MESSAGE", "Call", "asend_many", "release_result_subscriptions",
           "send_many"]

Call = tuple[Sequence[Any], dict[str, Any]]
# kombu flushes its publish pipeline every this many Redis commands.
BATCH_MAX_COMMANDS = 1000
# task-sent events per task.multi message.
EVENTS_PER_MESSAGE = 500


class _SentEvents:
    """Stands in for Celery's event dispatcher in ``send_task_message``: keeps the ``task-sent`` events.

    ``celery.app.amqp.AMQP.send_task_message`` publishes one event message per task through
    ``event_dispatcher.publish`` (``EventDispatcher._publish``: a second kombu publish per job). Kept here,
    the same events (prepared by Celery's dispatcher: hostname, clock, pid, utcoffset) go out as one list per
    ``task.multi`` message, as a worker sends its buffered task events (``EventDispatcher.flush``), which
    every ``EventReceiver`` (Flower, ``celery events``) takes apart again.
    """

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self.events: list[dict[str, Any]] = []
        self.last: tuple[str, dict[str, Any]] | None = None
        self.retry: bool | None = None
        self.retry_policy: Any = None

    def publish(self, type: str, fields: dict[str, Any], producer: Any, retry: bool | None = None,
                retry_policy: Any = None, **kwargs: Any) -> None:
        self.events.append(self.dispatcher._prepare_event(type, fields, **kwargs))
        self.last = (type, fields)
        if retry is not None:
            self.retry, self.retry_policy = retry, retry_policy

    def flush(self, producer: Any) -> None:
        if self.events:
            events, self.events = self.events, []
            with self.dispatcher.mutex:
                self.dispatcher._publish(events, producer, "task.multi", retry=self.retry,
                                         retry_policy=self.retry_policy)


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
    """Send one ``task`` message per (args, kwargs) over one connection, in pipelined round trips.

    Each message is built and published by Celery's ``apply_async``, as one ``.delay()`` would be. The
    batch saves the round trips and per-job commands around it: kombu's ``Producer.batch`` (kombu.messaging,
    Redis transport's ``PublishBatch``) sends the LPUSHes in one non-transactional pipeline, the results'
    channels are subscribed in a few SUBSCRIBEs (``RedisBackend.on_tasks_call``) instead of one each, and the
    ``task-sent`` events go out as ``task.multi`` lists (:class:`_SentEvents`) instead of a message each.
    """
    batch = [(tuple(args), dict(kwargs)) for args, kwargs in calls]
    check = getattr(task, "check_job", None)
    if check is not None:
        for args, kwargs in batch:
            check(args, kwargs)
    app = task.app
    if "task_id" in options:
        raise TypeError("send_many: task_id would name every job alike; each job gets an id of its own")
    ids = [uuid() for _ in batch]
    events = _SentEvents(app.amqp._event_dispatcher)
    options.setdefault("event_dispatcher", events)
    try:
        with app.producer_or_acquire() as producer, producer.batch(BATCH_MAX_COMMANDS):
            queue = _bound_queue(app, producer, options.get("queue"))
            if queue is not None:
                options["queue"] = queue
            subscribe = getattr(app.backend, "on_tasks_call", None)
            if subscribe is not None and not options.get("ignore_result", task.ignore_result):
                subscribe(ids)
            results = _send(task, producer, batch, ids, events, options)
            events.flush(producer)
            return results
    except CONNECTION_FAILURES as exc:
        # The batch is written without kombu's retries (PublishBatch.flush), every BATCH_MAX_COMMANDS commands
        # and at the end: chunks written before the failure are queued.
        url = maybe_sanitize_url(task.app.conf.broker_url or "?")
        raise RedisUnavailable(f"{task.name}: lost {url} while sending {len(batch)} jobs ({type(exc).__name__}: "
                               f"{exc}); jobs in chunks of {BATCH_MAX_COMMANDS} commands written before it may "
                               "be queued, the rest were not sent") from exc


def _send(task: Task, producer: Any, batch: list[tuple[tuple[Any, ...], dict[str, Any]]], ids: list[str],
          events: _SentEvents, options: dict[str, Any]) -> list[AsyncResult]:
    """The first job through ``apply_async``; the others built from its message when that is exact."""
    if not batch:
        return []
    template = MessageTemplate(task.app)
    unwatch = template.watch(producer)
    try:
        results = [task.apply_async(*batch[0], task_id=ids[0], producer=producer, **options)]
    finally:
        unwatch()
    template.event = events.last
    if template.usable(task, options):
        ignored = options.get("ignore_result", task.ignore_result)
        # Without a bulk subscription (a backend other than loopline's), each job subscribes as Celery's does.
        subscribe_each = None if hasattr(task.app.backend, "on_tasks_call") or ignored else task.app.backend
        for (args, kwargs), task_id in zip(batch[1:], ids[1:], strict=True):
            if subscribe_each is not None:
                subscribe_each.on_task_call(producer, task_id)
            template.publish(producer, task_id, args, kwargs, events)
            result = task.AsyncResult(task_id)
            result.ignored = ignored  # as Celery.send_task sets it
            results.append(result)
            if len(events.events) >= EVENTS_PER_MESSAGE:
                events.flush(producer)
        return results
    for (args, kwargs), task_id in zip(batch[1:], ids[1:], strict=True):
        results.append(task.apply_async(args, kwargs, task_id=task_id, producer=producer, **options))
        if len(events.events) >= EVENTS_PER_MESSAGE:
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
