"""A bulk send's messages built from its first one, as ``apply_async`` built it: the same bytes but for ids.

Celery's ``apply_async`` spends most of a bulk send on work that is the same for every job of one task with
one set of options: merging options, routing, ``celery.app.amqp.AMQP.as_task_v2``'s headers, kombu's
``Producer.publish`` wrapping (retry policy, declarations). :class:`MessageTemplate` watches the batch's
first job go through all of it (``Producer._publish``, the call kombu makes with the finished headers,
properties and serialized body, and the channel's ``basic_publish``, which gets the final message) and then
builds each other job's message the way ``as_task_v2`` does: the new task id in ``id``, ``root_id`` (when it
was the task's own) and ``correlation_id``, ``argsrepr`` and ``kwargsrepr`` as Celery's ``saferepr`` writes
them (:func:`loopline.reprs.saferepr`: the same text, faster for plain values), the body
``[args, kwargs, embed]`` through kombu's JSON, the ``task-sent`` event fields likewise.

Two ways to send them: :meth:`MessageTemplate.envelope` gives the first job's Redis list entry as an
:class:`~loopline.app.envelope.Envelope` to splice the others' from (loopline's Redis transport, anonymous
exchange); otherwise :meth:`MessageTemplate.publish` hands each message to the same ``Producer._publish``, so
the transport adds its delivery tag and body encoding as for any other.

:func:`MessageTemplate.usable` says when building from the first job is exact; otherwise each job takes
``apply_async`` itself: anything that differs by job or runs code per message (publish signals,
``task_routes``, eta, countdown and expiry times, stamps, compression, a parent task, a task class with its
own ``apply_async``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from celery import Task, signals
from kombu.serialization import dumps

from loopline.app.envelope import Envelope
from loopline.reprs import saferepr

__all__ = ["MessageTemplate"]

_PUBLISH_SIGNALS = (signals.before_task_publish, signals.after_task_publish, signals.task_sent)
# Message headers that differ by job: a ``headers=`` option naming one makes apply_async's value win for each job.
_PER_JOB_HEADERS = frozenset({"id", "root_id", "parent_id", "argsrepr", "kwargsrepr"})


class MessageTemplate:
    """The first job's ``Producer._publish`` call and its ``task-sent`` event fields, to build the rest from."""

    def __init__(self, app: Any) -> None:
        self.amqp = app.amqp
        self.repr_maxlevels = app.conf.task_repr_maxlevels
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]] = []
        #: What the channel's ``basic_publish`` received for those calls: (message, exchange, routing key).
        self.delivered: list[tuple[dict[str, Any], Any, Any]] = []
        self.event: tuple[str, dict[str, Any]] | None = None
        self._embed: Any = None

    def watch(self, producer: Any) -> Callable[[], None]:
        """Record ``producer``'s next ``_publish`` calls (kombu's Producer.publish looks it up on the instance)
        and the messages its channel's ``basic_publish`` gets for them (kombu's publish batch and
        ``Producer._publish`` look that up on the channel instance)."""
        real = producer._publish
        channel = producer.channel
        real_basic_publish = channel.basic_publish

        def record(*args: Any, **kwargs: Any) -> Any:
            # Copies: the transport fills in the properties (delivery_info, delivery_tag) as it publishes.
            self.calls.append((args, dict(args[4]), dict(args[5])))
            return real(*args, **kwargs)

        def record_delivery(message: dict[str, Any], exchange: Any, routing_key: Any, **kwargs: Any) -> Any:
            # Kept after the call: virtual.Channel.basic_publish encodes the body and adds the delivery tag in
            # place, and the Redis transport then pushes this very dict.
            result = real_basic_publish(message, exchange, routing_key, **kwargs)
            self.delivered.append((message, exchange, routing_key))
            return result

        producer._publish = record
        channel.basic_publish = record_delivery

        def unwatch() -> None:
            producer.__dict__.pop("_publish", None)
            channel.__dict__.pop("basic_publish", None)

        return unwatch

    def usable(self, task: Task, options: dict[str, Any]) -> bool:
        """True when every other job's message can be built from the first one's exactly."""
        from loopline.app.task import IOTask, LooplineTask

        if len(self.calls) != 1 or any(signal.receivers for signal in _PUBLISH_SIGNALS):
            return False
        resolved = task._get_current_object() if hasattr(task, "_get_current_object") else task  # shared_task
        if type(resolved).apply_async not in (Task.apply_async, LooplineTask.apply_async, IOTask.apply_async):
            return False
        if self.amqp.router.routes or task.app.current_worker_task is not None or "argsrepr" in options \
                or "kwargsrepr" in options or _PER_JOB_HEADERS & set(options.get("headers") or ()):
            return False
        # Work Task.apply_async does per job on the arguments: a shadow name made from them, pydantic models dumped.
        if type(resolved).shadow_name is not Task.shadow_name \
                or getattr(resolved, "_dump_pydantic_arguments", None) is not None:
            return False
        args, headers, _ = self.calls[0]
        body, content_type, content_encoding = args[0], args[2], args[3]
        if content_type != "application/json" or content_encoding != "utf-8" or "compression" in headers:
            return False
        if headers.get("eta") or headers.get("expires") or headers.get("stamped_headers") or headers.get("stamps"):
            return False
        if headers.get("root_id") != headers.get("id") or headers.get("parent_id"):
            return False
        decoded = json.loads(body)
        if not (isinstance(decoded, list) and len(decoded) == 3):
            return False
        self._embed = decoded[2]
        return True

    def envelope(self, producer: Any, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[Envelope, str, dict[str, Any]] | None:
        """After :meth:`usable`, given the first job's arguments: its Redis entry as an :class:`Envelope`, with the
        queue and message to push the others with (``put_many`` of loopline's Redis channel); None when that
        would not be exact.

        Exact when the one message went to the anonymous exchange, which kombu's Redis transport turns into one
        LPUSH to the routing key's list (``virtual.Channel.basic_publish`` → ``Channel._put``), on a channel of
        loopline's transport, and the envelope reproduces that entry.
        """
        if len(self.delivered) != 1 or not callable(getattr(producer.channel, "put_many", None)):
            return None
        message, exchange, routing_key = self.delivered[0]
        if exchange or not isinstance(routing_key, str) or not routing_key:
            return None
        (call, _, _), = self.calls
        envelope = Envelope.of(message, call[0], args, kwargs, self._embed)
        return None if envelope is None else (envelope, routing_key, message)

    def reprs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[str, str]:
        """``argsrepr`` and ``kwargsrepr`` as ``as_task_v2`` writes them."""
        amqp, levels = self.amqp, self.repr_maxlevels
        return saferepr(args, amqp.argsrepr_maxsize, levels), saferepr(kwargs, amqp.kwargsrepr_maxsize, levels)

    def sent_event(self, task_id: str, argsrepr: str, kwargsrepr: str, events: Any, producer: Any) -> None:
        """Hand ``events`` the ``task-sent`` event ``send_task_message`` would have published for this job."""
        if self.event is not None:
            kind, fields = self.event
            events.publish(kind, {**fields, "uuid": task_id, "root_id": task_id, "args": argsrepr,
                                  "kwargs": kwargsrepr}, producer)

    def publish(self, producer: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                events: Any) -> None:
        """Publish the message ``apply_async(args, kwargs, task_id=task_id, **options)`` would have sent."""
        call, headers, properties = self.calls[0]
        argsrepr, kwargsrepr = self.reprs(args, kwargs)
        headers = {**headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr, "kwargsrepr": kwargsrepr}
        properties = {**properties, "correlation_id": task_id}
        _, _, body = dumps((args, kwargs, self._embed), serializer="json")
        # Producer._publish(body, priority, content_type, content_encoding, headers, properties, routing_key,
        # mandatory, immediate, exchange, declare, timeout, confirm_timeout, retry, retry_policy): no declare,
        # the first job declared the queue.
        producer._publish(body, call[1], call[2], call[3], headers, properties, *call[6:10], [], *call[11:])
        self.sent_event(task_id, argsrepr, kwargsrepr, events, producer)
