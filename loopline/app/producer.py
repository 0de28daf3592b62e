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
from kombu.utils.url import maybe_sanitize_url

from loopline.errors import CONNECTION_FAILURES, RedisUnavailable

__all__ = ["BATCH_MAX_COMMANDS", "Call", "asend_many", "release_result_subscriptions", "send_many"]

Call = tuple[Sequence[Any], dict[str, Any]]
# kombu flushes its publish pipeline every this many Redis commands.
BATCH_MAX_COMMANDS = 1000


def send_many(task: Task, calls: Iterable[Call], **options: Any) -> list[AsyncResult]:
    """Send one ``task`` message per (args, kwargs) over one connection, in pipelined round trips.

    Uses kombu's ``Producer.batch`` (kombu.messaging, Redis transport's ``PublishBatch``): the LPUSHes
    of all messages go out in one non-transactional pipeline instead of one round trip each.
    """
    batch = [(tuple(args), dict(kwargs)) for args, kwargs in calls]
    check = getattr(task, "check_job", None)
    if check is not None:
        for args, kwargs in batch:
            check(args, kwargs)
    try:
        with task.app.producer_or_acquire() as producer, producer.batch(BATCH_MAX_COMMANDS):
            return [task.apply_async(args, kwargs, producer=producer, **options) for args, kwargs in batch]
    except CONNECTION_FAILURES as exc:
        # The batch is written without kombu's retries (PublishBatch.flush), every BATCH_MAX_COMMANDS commands
        # and at the end: chunks written before the failure are queued.
        url = maybe_sanitize_url(task.app.conf.broker_url or "?")
        raise RedisUnavailable(f"{task.name}: lost {url} while sending {len(batch)} jobs ({type(exc).__name__}: "
                               f"{exc}); jobs in chunks of {BATCH_MAX_COMMANDS} commands written before it may "
                               "be queued, the rest were not sent") from exc


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
