"""A bulk send's messages built from its first one, as ``apply_async`` built it: the same bytes but for ids.

Celery's ``apply_async`` spends most of a bulk send on work that is the same for every job of one task with
one set of options: merging options, routing, ``celery.app.amqp.AMQP.as_task_v2``'s headers, kombu's
``Producer.publish`` wrapping (retry policy, declarations). :class:`MessageTemplate` watches the batch's
first job go through all of it (``Producer._publish``, the call kombu makes with the finished headers,
properties and serialized body) and then builds each other job's message the way ``as_task_v2`` does:
the new task id in ``id``, ``root_id`` (when it was the task's own) and ``correlation_id``, ``argsrepr`` and
``kwargsrepr`` from Celery's ``saferepr``, the body ``[args, kwargs, embed]`` through kombu's serializer
registry, the ``task-sent`` event fields likewise. The message goes through the same ``Producer._publish``,
so the transport adds its delivery tag and body encoding as for any other.

:func:`MessageTemplate.usable` says when that is exact; otherwise each job takes ``apply_async`` itself:
anything that differs by job or runs code per message (publish signals, ``task_routes``, eta, countdown and
expiry times, stamps, compression, a parent task, a task class with its own ``apply_async``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from celery import Task, signals
from celery.utils.saferepr import saferepr
from kombu.serialization import dumps

__all__ = ["MessageTemplate"]

_PUBLISH_SIGNALS = (signals.before_task_publish, signals.after_task_publish, signals.task_sent)


class MessageTemplate:
    """The first job's ``Producer._publish`` call and its ``task-sent`` event fields, to build the rest from."""

    def __init__(self, app: Any) -> None:
        self.amqp = app.amqp
        self.repr_maxlevels = app.conf.task_repr_maxlevels
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]] = []
        self.event: tuple[str, dict[str, Any]] | None = None
        self._embed: Any = None

    def watch(self, producer: Any) -> Callable[[], None]:
        """Record ``producer``'s next ``_publish`` calls (kombu's Producer.publish looks it up on the instance)."""
        real = producer._publish

        def record(*args: Any, **kwargs: Any) -> Any:
            # Copies: the transport fills in the properties (delivery_info, delivery_tag) as it publishes.
            self.calls.append((args, dict(args[4]), dict(args[5])))
            return real(*args, **kwargs)

        producer._publish = record
        return lambda: producer.__dict__.pop("_publish", None)

    def usable(self, task: Task, options: dict[str, Any]) -> bool:
        """True when every other job's message can be built from the first one's exactly."""
        from loopline.app.task import IOTask, LooplineTask

        if len(self.calls) != 1 or any(signal.receivers for signal in _PUBLISH_SIGNALS):
            return False
        resolved = task._get_current_object() if hasattr(task, "_get_current_object") else task  # shared_task
        if type(resolved).apply_async not in (Task.apply_async, LooplineTask.apply_async, IOTask.apply_async):
            return False
        if self.amqp.router.routes or task.app.current_worker_task is not None or "argsrepr" in options \
                or "kwargsrepr" in options:
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

    def publish(self, producer: Any, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                events: Any) -> None:
        """Publish the message ``apply_async(args, kwargs, task_id=task_id, **options)`` would have sent."""
        call, headers, properties = self.calls[0]
        argsrepr = saferepr(args, self.amqp.argsrepr_maxsize, maxlevels=self.repr_maxlevels)
        kwargsrepr = saferepr(kwargs, self.amqp.kwargsrepr_maxsize, maxlevels=self.repr_maxlevels)
        headers = {**headers, "id": task_id, "root_id": task_id, "argsrepr": argsrepr, "kwargsrepr": kwargsrepr}
        properties = {**properties, "correlation_id": task_id}
        _, _, body = dumps((args, kwargs, self._embed), serializer="json")
        # Producer._publish(body, priority, content_type, content_encoding, headers, properties, routing_key,
        # mandatory, immediate, exchange, declare, timeout, confirm_timeout, retry, retry_policy): no declare,
        # the first job declared the queue.
        producer._publish(body, call[1], call[2], call[3], headers, properties, *call[6:10], [], *call[11:])
        if self.event is not None:
            kind, fields = self.event
            events.publish(kind, {**fields, "uuid": task_id, "root_id": task_id, "args": argsrepr,
                                  "kwargs": kwargsrepr}, producer)
