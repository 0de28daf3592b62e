"""The ``task-sent`` events of a bulk send, sent as ``task.multi`` lists, built by Celery's dispatcher or spliced.

``celery.app.amqp.AMQP.send_task_message`` publishes one event message per task through
``event_dispatcher.publish`` (``EventDispatcher._publish``: a second kombu publish per job). :class:`SentEvents`
stands in for the dispatcher there and keeps the events (prepared by Celery's dispatcher: hostname, clock, pid,
utcoffset), to send them as one list per ``task.multi`` message, as a worker sends its buffered task events
(``EventDispatcher.flush``), which every ``EventReceiver`` (Flower, ``celery events``) takes apart again.

Jobs of one batch differ in a few fields of their event only; after :meth:`SentEvents.splice`, the others'
events are written from the first one's JSON text with those fields filled in (the clock, timestamp and UTC
offset taken per event, as ``EventDispatcher._prepare_event`` takes them), not prepared and encoded each.
"""

from __future__ import annotations

import json
import time
from typing import Any

from celery.utils.time import utcoffset
from kombu.serialization import dumps

from loopline.app.envelope import format_template, string_encoder

__all__ = ["SentEvents"]

_MARK = "\x00loopline-event-slot-{}\x00"
# The fields that differ by event, by slot (the task id twice); numbers and ids are written without escapes.
_UTCOFFSET, _CLOCK, _ID, _ARGS, _KWARGS, _TIMESTAMP = range(6)
_SLOTS = (("utcoffset", _UTCOFFSET), ("clock", _CLOCK), ("uuid", _ID), ("root_id", _ID), ("args", _ARGS),
          ("kwargs", _KWARGS), ("timestamp", _TIMESTAMP))
_ROUTING_KEY = "task.multi"


class SentEvents:
    """Stands in for Celery's event dispatcher in ``send_task_message``: keeps the ``task-sent`` events."""

    def __init__(self, dispatcher: Any) -> None:
        self.dispatcher = dispatcher
        self.events: list[dict[str, Any]] = []
        self.texts: list[str] = []
        self.last: tuple[str, dict[str, Any]] | None = None
        self.retry: bool | None = None
        self.retry_policy: Any = None
        self._template = ""
        self._encode = json.encoder.encode_basestring_ascii
        self._content: tuple[str, str] = ("", "")

    @property
    def pending(self) -> int:
        return len(self.events) + len(self.texts)

    def publish(self, type: str, fields: dict[str, Any], producer: Any, retry: bool | None = None,
                retry_policy: Any = None, **kwargs: Any) -> None:
        self.events.append(self.dispatcher._prepare_event(type, fields, **kwargs))
        self.last = (type, fields)
        if retry is not None:
            self.retry, self.retry_policy = retry, retry_policy

    def splice(self) -> bool:
        """From the one event kept so far, a template for the others' (:meth:`add`); False, and nothing changed,
        unless it writes that event as the dispatcher's serializer does and the result decodes as the event."""
        encode = string_encoder()
        if len(self.events) != 1 or encode is None:
            return False
        event = self.events[0]
        if not (isinstance(event.get("uuid"), str) and event.get("root_id") == event["uuid"]
                and isinstance(event.get("args"), str) and isinstance(event.get("kwargs"), str)
                and type(event.get("clock")) is int and type(event.get("timestamp")) is float
                and type(event.get("utcoffset")) in (int, float)):
            return False
        marked = dict(event)
        for key, slot in _SLOTS:
            marked[key] = _MARK.format(slot)
        text = format_template(marked, _MARK, [2 if slot == _ID else 1 for slot in range(6)], (_ID,))
        if text is None:
            return False
        written = text.format(repr(event["utcoffset"]), event["clock"], event["uuid"], encode(event["args"]),
                              encode(event["kwargs"]), repr(event["timestamp"]))
        content_type, content_encoding, payload = dumps([event], serializer=self.dispatcher.serializer)
        if content_type != "application/json" or payload != f"[{written}]" or json.loads(written) != event:
            return False
        self._template, self._encode, self._content = text, encode, (content_type, content_encoding)
        self.texts.append(written)
        self.events.clear()
        return True

    def add(self, task_id: str, argsrepr: str, kwargsrepr: str) -> None:
        """After :meth:`splice`: the event of the job ``task_id``, as the dispatcher would have prepared it."""
        clock = self.dispatcher.clock.forward()
        self.texts.append(self._template.format(repr(utcoffset()), clock, task_id, self._encode(argsrepr),
                                                self._encode(kwargsrepr), repr(time.time())))

    def flush(self, producer: Any) -> None:
        dispatcher = self.dispatcher
        if self.events:
            events, self.events = self.events, []
            with dispatcher.mutex:
                dispatcher._publish(events, producer, _ROUTING_KEY, retry=self.retry, retry_policy=self.retry_policy)
        if self.texts:
            body, self.texts = "[" + ", ".join(self.texts) + "]", []
            content_type, content_encoding = self._content
            with dispatcher.mutex:
                # EventDispatcher._publish (celery 5.7), with the body serialized already.
                try:
                    producer.publish(body, routing_key=_ROUTING_KEY, exchange=dispatcher.exchange.name,
                                     retry=self.retry, retry_policy=self.retry_policy, declare=[dispatcher.exchange],
                                     content_type=content_type, content_encoding=content_encoding,
                                     headers=dispatcher.headers, delivery_mode=dispatcher.delivery_mode)
                except Exception:
                    if not dispatcher.buffer_while_offline:
                        raise
                    dispatcher._outbound_buffer.append((json.loads(body), _ROUTING_KEY))
