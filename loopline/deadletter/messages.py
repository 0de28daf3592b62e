"""Checks of incoming messages: what makes an envelope or a task message unusable, said in one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from kombu.exceptions import ContentDisallowed
from kombu.message import Message

from loopline.deadletter.store import Reason

__all__ = ["TYPED_HEADERS", "Problem", "envelope_problem", "message_problem", "task_fields"]

Problem = tuple[str, str]  # (Reason.*, what is wrong)


def envelope_problem(payload: object, decode_body: Callable[[Any, str | None], object]) -> str | None:
    """What keeps kombu from building a Message out of a Redis queue entry, or None.

    Mirrors what ``kombu.transport.virtual.base.Message.__init__`` and ``QoS.append`` (kombu.transport.redis)
    read: a KeyError or TypeError there would escape the transport and stop the worker's consumer.
    """
    if not isinstance(payload, dict):
        return f"the envelope is JSON but not an object ({type(payload).__name__})"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return "the envelope has no 'properties' object"
    if not isinstance(properties.get("delivery_tag"), str):
        return "the envelope has no 'properties.delivery_tag' string"
    info = properties.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return "the envelope has no 'properties.delivery_info' with exchange and routing_key"
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        return "the envelope's 'body' is not a string"
    if body:
        try:
            decode_body(body, properties.get("body_encoding"))
        except Exception as exc:  # noqa: BLE001 - binascii.Error, or AttributeError for an unknown encoding
            return f"the body cannot be decoded as {properties.get('body_encoding')!r}: {exc}"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return "the envelope's 'headers' is not an object"
    return None


# Optional headers (None is fine) that Celery reads after the consumer has handed the request to the pool, where a
# wrong type raises out of the pool's callbacks or the result backend and the task never gets a result:
# ``shadow`` becomes the task's name, a key of the worker's counters (``celery.worker.state.task_accepted``);
# ``stamps`` and ``stamped_headers`` go into every stored result (``celery.backends.base.Backend._get_result_meta``).
TYPED_HEADERS: dict[str, type] = {"shadow": str, "stamps": dict, "stamped_headers": list}


def _time_limit_problem(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in value
    ):
        return f"header 'timelimit' must be [soft, hard] seconds or nulls, got {value!r}"
    return None


def message_problem(message: Message) -> Problem | None:
    """Why Celery could not run this protocol-2 task message, or None (also for messages Celery itself rejects).

    Celery's consumer (``celery.worker.consumer.consumer.Consumer.create_task_handler``) handles a missing
    ``task`` header, an unknown task, an undecodable body and a refused serializer; what it does not check
    (a non-string id, a body that is not ``[args, kwargs, embed]``, a malformed time limit) raises from
    ``celery.worker.request.Request`` and stops the consumer. Those are caught here, before it runs, and so
    are the TYPED_HEADERS, which raise later, where nothing could report them. Whatever else Celery raises
    on while taking the message, the consumer dead-letters (``DeadLetterConsumer._on_unusable``).
    """
    headers = message.headers
    if not isinstance(headers, dict) or "task" not in headers:
        return None
    for name in ("task", "id"):
        if not isinstance(headers.get(name), str) or not headers[name]:
            return Reason.INVALID, f"header {name!r} must be a non-empty string, got {headers.get(name)!r}"
    retries = headers.get("retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return Reason.INVALID, f"header 'retries' must be a non-negative integer, got {retries!r}"
    for name, kind in TYPED_HEADERS.items():
        if headers.get(name) is not None and not isinstance(headers[name], kind):
            return Reason.INVALID, f"header {name!r} must be a {kind.__name__} or null, got {headers[name]!r}"
    limit_problem = _time_limit_problem(headers.get("timelimit"))
    if limit_problem:
        return Reason.INVALID, limit_problem
    try:
        payload = message.decode()
    except ContentDisallowed as exc:
        return Reason.DISALLOWED, f"content type {message.content_type!r} is refused ({exc}); workers accept JSON only"
    except Exception as exc:  # noqa: BLE001 - kombu raises DecodeError, or the codec's own error
        return Reason.UNDECODABLE, f"the body is not valid {message.content_type!r}: {exc}"
    if isinstance(payload, dict) and "args" in payload:
        return None  # Celery's hybrid format (celery.worker.strategy.hybrid_to_proto2) checks its own fields
    if not (isinstance(payload, list | tuple) and len(payload) == 3 and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict) and (payload[2] is None or isinstance(payload[2], dict))):
        return Reason.INVALID, "the body is not a protocol 2 task body [args, kwargs, embed]"
    return None


def task_fields(message: Message) -> dict[str, Any]:
    """Task name, id, retries, queue and arguments of a message, as far as they can be read safely."""
    headers = message.headers if isinstance(message.headers, dict) else {}
    info = message.delivery_info if isinstance(message.delivery_info, dict) else {}
    fields: dict[str, Any] = {
        "task": headers.get("task") if isinstance(headers.get("task"), str) else None,
        "task_id": headers.get("id") if isinstance(headers.get("id"), str) else None,
        "retries": headers.get("retries") if isinstance(headers.get("retries"), int) else 0,
        "queue": info.get("routing_key") if isinstance(info.get("routing_key"), str) else None,
    }
    try:
        payload = message.decode()  # never unpickles: the consumer's accept list refuses pickle before loading
    except Exception:  # noqa: BLE001 - an undecodable body just leaves the arguments unknown
        return fields
    if isinstance(payload, list | tuple) and len(payload) == 3:
        args, kwargs = payload[0], payload[1]
    elif isinstance(payload, dict):  # protocol 1 or hybrid
        args, kwargs = payload.get("args"), payload.get("kwargs")
        fields["task"] = fields["task"] or (payload.get("task") if isinstance(payload.get("task"), str) else None)
        fields["task_id"] = fields["task_id"] or (payload.get("id") if isinstance(payload.get("id"), str) else None)
    else:
        return fields
    if isinstance(args, list | tuple) and isinstance(kwargs, dict):
        fields.update(args=list(args), kwargs=kwargs)
    return fields
