"""The worker's consumer: bad messages and poison jobs dead-lettered, task events sent in batches.

**Dead-lettering.** Configured as the app's ``worker_consumer`` by ``loopline.install``, so it runs in every
worker whatever the pool. Stock Celery logs a bad message with a multi-line dump and drops it, and a message its
checks miss (a non-string id, a body that is not ``[args, kwargs, embed]``) raises out of the consumer and stops
the worker; a job that kills its worker is redelivered forever. Here each of them lands in the dead-letter store
with the reason, the task's result becomes a failure that says why, and the worker keeps serving the jobs around
it.

**Events in batches.** With an event loop (every pool but gevent: ``WorkController.should_use_eventloop``),
Celery buffers task events (``task-received``, ``task-started``, ``task-succeeded`` …) and sends each buffer as
one ``task.multi`` message; but ``celery.worker.consumer.consumer.Consumer.on_send_event_buffered`` schedules a
flush on the hub's very next iteration, so a busy worker publishes one small message per task or two. On an
asyncio worker at -c 1000 that was a sixth of its CPU. Here the buffer goes out every
``LOOPLINE_EVENT_FLUSH_MS`` (100 ms), or as soon as it holds EVENT_BUFFER_LIMIT events, and once more when the
consumer shuts down: Flower and ``celery events`` see every event, at most that much later. The gevent pool,
which Celery runs without an event loop (and so without buffering), gets the same buffer and a timer greenlet
that flushes it (``Consumer.on_ready``).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import redis
from celery import Task, signals
from celery.app.trace import TraceInfo, report_internal_error, trace_ok_t
from celery.exceptions import NotRegistered, Reject
from celery.states import FAILURE
from celery.utils.collections import AttributeDict
from celery.worker import state
from celery.worker.consumer.consumer import Consumer as CeleryConsumer
from celery.worker.request import Request
from celery.worker.worker import WorkController
from kombu.exceptions import ContentDisallowed
from kombu.message import Message
from vine import promise

from loopline.deadletter.deliveries import is_redelivery, runs_so_far
from loopline.deadletter.messages import message_problem, task_fields
from loopline.deadletter.store import DeadLetter, DeadLettered, DeadLetterStore, Reason, truncate_raw
from loopline.settings import settings_for

__all__ = ["EVENT_BUFFER_LIMIT", "Consumer", "DeadLetterConsumer"]

EVENT_BUFFER_LIMIT = 500  # events; about 150 KB of JSON in one message

logger = logging.getLogger(__name__)


class DeadLetterConsumer(CeleryConsumer):
    """Celery's consumer plus message checks, delivery counting and dead-lettering."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.settings = settings_for(self.app)
        self.max_deliveries = self.settings.max_deliveries

    @property
    def dead_letters(self) -> DeadLetterStore:
        # The result backend's Redis client: its pool, TLS settings and timeouts (celery.backends.redis).
        return DeadLetterStore(self.app.backend.client)

    def update_strategies(self) -> None:
        """Celery's strategies and tracers (``Consumer.update_strategies``), each tracer guarded (_guarded)."""
        super().update_strategies()
        for task in self.app.tasks.values():
            task.__trace__ = _guarded(task, task.__trace__)

    def create_task_handler(self, promise: Any = promise) -> Callable[[Message], Any]:
        """Wrap Celery's handler (``Consumer.create_task_handler``), which both event loops install as on_message."""
        on_task_received = super().create_task_handler(promise)

        def on_message(message: Message) -> Any:
            problem = message_problem(message)
            if problem is not None:
                return self.dead_letter(message, *problem)
            if self._over_delivered(message):
                return None
            try:
                return on_task_received(message)
            except self.connection_errors:
                raise  # the broker connection broke: Celery's consumer reconnects (Consumer.start)
            except Exception as exc:  # noqa: BLE001 - whatever Celery raised for this one message
                return self._on_unusable(message, exc)

        return on_message

    def _on_unusable(self, message: Message, exc: Exception) -> None:
        """Dead-letter a message that Celery raised on while turning it into a request or handing it over.

        ``on_task_received`` handles the errors it expects (InvalidTaskError, ContentDisallowed,
        DecodeError); anything else -- an empty ``expires`` that ``Request.__init__`` takes for a date, a
        stamp in ``stamped_headers`` that ``Request.revoked`` cannot look up, whatever the strategy
        (``celery.worker.strategy.default``) trips on -- escapes to the event loop and stops the worker, and
        the message, left unacked, stops the next one too.
        """
        request = _reserved_request(message)
        if request is not None and request._apply_result is not None:
            # In the pool already (Request.execute_using_pool returned): the pool acks or fails it.
            logger.exception("%s[%s] was handed to the pool, but Celery raised after that", request.name, request.id)
            return
        if request is not None:
            self._forget(request)
        error = f"Celery could not take the message: {type(exc).__name__}: {exc}"
        # Settled by Celery before it raised (Request.revoked acks a revoked task); Request.acknowledge may
        # have left the ack to the next loop iteration (Consumer.call_soon_ack), so the message can't tell yet.
        if message.acknowledged or (request is not None and request.acknowledged):
            logger.error("%s; it was already acknowledged", error)
            return
        self.dead_letter(message, Reason.INVALID, error, traceback=traceback.format_exc())

    def _forget(self, request: Request) -> None:
        """Undo what the strategy did for a request that never reached the pool."""
        state.task_ready(request)  # task_reserved() put it in the worker's reserved set (celery.worker.state)
        controller = self.controller
        if (controller is not None and controller.semaphore is not None
                and getattr(self.on_task_request, "__func__", None) is WorkController._process_task_sem):
            # WorkController._process_task_sem took a pool slot and _process_task raised before the pool
            # had the job; only a finished job gives the slot back (prefork: the pool's on-ready callback).
            controller.semaphore.release()

    def _over_delivered(self, message: Message) -> bool:
        headers = message.headers
        if not isinstance(headers, dict) or not isinstance(headers.get("id"), str):
            return False
        if not is_redelivery(headers, message.delivery_info):
            return False
        runs = runs_so_far(self.app.backend.client, headers["id"], headers.get("retries") or 0)
        if runs < self.max_deliveries:
            return False
        self.dead_letter(
            message, Reason.POISON,
            f"started {runs} times without being acknowledged (LOOPLINE_MAX_DELIVERIES={self.max_deliveries}): "
            "its worker died or was stopped each time it ran", deliveries=runs + 1,
        )
        return True

    # -- Celery's handlers for messages it cannot use (celery.worker.consumer.consumer.Consumer) --------------

    def on_decode_error(self, message: Message, exc: Exception) -> None:
        self.dead_letter(message, Reason.UNDECODABLE,
                         f"cannot decode the body as {message.content_type!r}: {exc}")

    def on_invalid_task(self, body: Any, message: Message, exc: Exception) -> None:
        if isinstance(exc, ContentDisallowed):
            self.dead_letter(message, Reason.DISALLOWED,
                             f"content type {message.content_type!r} is refused ({exc}); workers accept JSON only")
        else:
            self.dead_letter(message, Reason.INVALID, f"invalid task message: {exc}")

    def on_unknown_message(self, body: Any, message: Message) -> None:
        self.dead_letter(message, Reason.INVALID, "not a task message: no 'task' header and no task in the body")

    def on_unknown_task(self, body: Any, message: Message, exc: Exception) -> None:
        name = message.headers.get("task") if isinstance(message.headers, dict) else None
        if not isinstance(name, str) and isinstance(body, dict):
            name = body.get("task")
        self.dead_letter(message, Reason.UNKNOWN_TASK,
                         f"no task named {name!r} is registered in this worker", failure=NotRegistered(name))

    # -- dead-lettering ------------------------------------------------------------------------------------------

    def dead_letter(self, message: Message, reason: str, error: str, *, deliveries: int = 1,
                    failure: Exception | None = None, traceback: str | None = None) -> None:
        """Store the message with ``reason``, log it once, ack it, and fail its task's result with the reason."""
        entry = DeadLetter(reason=reason, error=error, deliveries=deliveries, traceback=traceback,
                           **task_fields(message))
        if not entry.replayable:
            entry = replace(entry, raw=truncate_raw(message.body))
        label = f"{entry.task or 'message'}[{entry.task_id or '?'}] from queue {entry.queue!r}"
        try:
            self.dead_letters.add(entry)
        except redis.RedisError as exc:
            # Not acked: the message comes back after the visibility timeout and is tried again.
            logger.error("could not dead-letter %s (%s: %s): %s; it stays unacknowledged", label, reason, error, exc)
            return
        logger.error("dead-lettered %s: %s: %s", label, reason, error)
        message.ack_log_error(logger, self.connection_errors)
        if entry.task_id is not None:
            self._fail_result(entry, message, failure or DeadLettered(f"{reason}: {error}"))
        if reason == Reason.UNKNOWN_TASK:
            signals.task_unknown.send(sender=self, message=message, exc=failure, name=entry.task, id=entry.task_id)
        elif reason != Reason.POISON:
            signals.task_rejected.send(sender=self, message=message, exc=None)

    def _fail_result(self, entry: DeadLetter, message: Message, exc: Exception) -> None:
        """Make ``AsyncResult.get()`` raise with the reason instead of waiting forever (as on_unknown_task does)."""
        headers = message.headers if isinstance(message.headers, dict) else {}
        properties = message.properties if isinstance(message.properties, dict) else {}
        request = AttributeDict(
            task=entry.task, args=entry.args, kwargs=entry.kwargs, retries=entry.retries, chord=None, errbacks=None,
            root_id=headers.get("root_id"), parent_id=headers.get("parent_id"), hostname=self.hostname,
            correlation_id=properties.get("correlation_id"), reply_to=properties.get("reply_to"),
            delivery_info={"routing_key": entry.queue},
        )
        try:
            self.app.backend.mark_as_failure(entry.task_id, exc, request=request)
        except redis.RedisError as store_exc:
            logger.error("dead-lettered %s, but could not record its failure: %s", entry.task_id, store_exc)
        if self.event_dispatcher:
            self.event_dispatcher.send("task-failed", uuid=entry.task_id, exception=repr(exc))


class Consumer(DeadLetterConsumer):
    """The ``worker_consumer`` that ``loopline.install`` configures: dead-lettering plus batched events."""

    def register_with_event_loop(self, hub: Any) -> None:
        # Called by celery.worker.loops.asynloop on every (re)connection, after the Events step built the
        # dispatcher; timer entries added here are among those asynloop cancels when the connection fails.
        super().register_with_event_loop(hub)
        if self.event_dispatcher is not None:
            self.event_dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        hub.call_repeatedly(self.settings.event_flush_ms / 1000, self._flush_events)

    def on_ready(self) -> None:
        # The gevent pool runs without a hub (celery.worker.loops.synloop), and Celery's Events step then buffers
        # nothing ("XXX This excludes eventlet/gevent, which should actually buffer", Events.start): a PUBLISH
        # round trip for each of a task's three events, a quarter of a gevent worker's CPU at -c 1000. Here the
        # green pools buffer task events too, flushed by a timer greenlet (the pool's Timer) every
        # LOOPLINE_EVENT_FLUSH_MS. synloop calls this after each (re)connection, once Events made the dispatcher.
        super().on_ready()
        dispatcher = self.event_dispatcher
        if self.hub is not None or dispatcher is None or not getattr(self.pool, "is_green", False):
            return
        dispatcher.buffer_group = frozenset({"task"})
        dispatcher.buffer_limit = EVENT_BUFFER_LIMIT
        previous = getattr(self, "_green_flush", None)
        if previous is not None:
            previous.cancel()
        self._green_flush = self.timer.call_repeatedly(self.settings.event_flush_ms / 1000, self._flush_events)

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        # Celery closes the broken connection here (the Redis channel puts every unacked message back in its
        # queue) and only then, from on_close, calls pool.flush(). A job of the asyncio pool that was waiting
        # for a slot could start in between and then run twice; flushed first, it never starts.
        if self.pool is not None and self.pool.flush:  # as Celery's on_close checks: billiard's may be None
            self.pool.flush()
        super().on_connection_error_after_connected(exc)

    def on_send_event_buffered(self) -> None:
        """Leave the buffer to the timer (Celery's flushes on the next loop iteration)."""

    def shutdown(self) -> None:
        self._flush_events()  # what the timer has not sent yet: the last jobs' events
        super().shutdown()


def _guarded(task: Task, tracer: Callable[..., Any]) -> Callable[..., Any]:
    """``tracer``, with an exception it raises outside the task body turned into the task's failure.

    The tracer (``celery.app.trace.build_tracer``) stores a failure for an error outside the body, but
    storing it can raise again: ``mark_as_failure`` reads the message's ``chain`` and ``errbacks``. Out of
    the tracer, prefork's child reports it to the pool, which fails the task; the threads and gevent pools
    run it through ``celery.concurrency.base.apply_target``, which re-raises without calling back, so the
    message was never acked. This returns the failure as ``celery.app.trace.trace_task`` does for its
    internal errors: ``Request.on_success`` then acks it once as a failure (``on_failure``).
    """
    def trace(uuid: str, args: Any, kwargs: Any, request: Any = None) -> Any:
        try:
            return tracer(uuid, args, kwargs, request)
        except Reject:
            raise
        except Exception as exc:  # noqa: BLE001 - the tracer already caught everything from the body
            return trace_ok_t(report_internal_error(task, exc), TraceInfo(FAILURE, exc), 0.0, None)

    return trace


def _reserved_request(message: Message) -> Request | None:
    """The request the strategy built for ``message`` and reserved (``celery.worker.state.task_reserved``)."""
    return next((request for request in list(state.reserved_requests) if request.message is message), None)
