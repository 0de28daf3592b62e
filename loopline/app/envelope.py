"""A bulk send's Redis list entries spliced from its first one: kombu's envelope encoded once, not per job.

kombu's Redis transport LPUSHes each message as ``kombu.utils.json.dumps`` of the whole envelope (body,
content type and encoding, headers, properties; ``kombu.transport.redis.Channel._put``), around a body it has
encoded in base64 (``virtual.Channel._inplace_augment_message``). Jobs of one batch differ only in a few of
those fields, so :class:`Envelope` encodes the first job's envelope once with a marker in each of them and
fills the markers per job. It is built only when filling them with the first job's own values gives back the
exact entry kombu wrote for it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Collection, Sequence
from typing import Any

from kombu.utils.json import JSONEncoder
from kombu.utils.json import dumps as kombu_dumps

__all__ = ["Envelope", "format_template", "string_encoder"]

_MARK = "\x00loopline-slot-{}\x00"
# The fields that differ by job, by slot: the task id (three times), its reprs, the delivery tag, the body.
_ID, _ARGSREPR, _KWARGSREPR, _TAG, _BODY = range(5)
_SLOTS: tuple[tuple[str, str, int], ...] = (
    ("headers", "id", _ID), ("headers", "root_id", _ID), ("headers", "argsrepr", _ARGSREPR),
    ("headers", "kwargsrepr", _KWARGSREPR), ("properties", "correlation_id", _ID),
    ("properties", "delivery_tag", _TAG),
)
# Ids (hex digits and dashes) and base64 text need no JSON escape: their slots keep the quotes the template has.
_BARE = (_ID, _TAG, _BODY)


def format_template(marked: dict[str, Any], mark: str, counts: Sequence[int], bare: Collection[int]) -> str | None:
    """``kombu_dumps(marked)`` as a ``str.format`` template: each ``mark.format(slot)`` value becomes field
    ``{slot}`` (its quotes kept for a slot in ``bare``, whose values need no JSON escape, else left to the
    value's own encoding), the text's own braces doubled; None unless slot ``n`` appears exactly ``counts[n]``
    times."""
    template = kombu_dumps(marked).replace("{", "{{").replace("}", "}}")
    for slot, count in enumerate(counts):
        encoded = kombu_dumps(mark.format(slot))
        if template.count(encoded) != count:
            return None
        template = template.replace(encoded, f'"{{{slot}}}"' if slot in bare else f"{{{slot}}}")
    return template


def string_encoder() -> Callable[[str], str] | None:
    """The function kombu's ``dumps`` encodes a str with (its JSONEncoder's ``ensure_ascii`` choice), or None."""
    probe = "it's \"q\" \\ \n\t\x00 é \u2028 \U0001f600"
    for encode in (json.encoder.encode_basestring_ascii, json.encoder.encode_basestring):
        if encode(probe) == kombu_dumps(probe):
            return encode
    return None


class Envelope:
    """The first job's Redis entry with the per-job fields left open; :meth:`entry` fills them for another job."""

    def __init__(self, template: str, encode: Callable[[str], str], embed: Any) -> None:
        self._template = template
        self._encode = encode
        self._embed = embed
        # kombu's serializer for "json" is kombu.utils.json.dumps, json.dumps with this encoder class: one
        # instance of it encodes alike (the body is checked against the first job's in :meth:`of`).
        self._body = JSONEncoder().encode

    @classmethod
    def of(cls, message: dict[str, Any], body: str, args: Any, kwargs: Any, embed: Any) -> Envelope | None:
        """The envelope of ``message`` (as kombu's Redis ``_put`` received it, body already encoded) and its JSON
        ``body`` before encoding, sent for ``args`` and ``kwargs``; None unless it reproduces that entry exactly."""
        encode = string_encoder()
        properties = message.get("properties")
        if encode is None or not isinstance(properties, dict) or properties.get("body_encoding") != "base64":
            return None
        marked = {**message, "body": _MARK.format(_BODY), "headers": dict(message["headers"]),
                  "properties": dict(properties)}
        for part, key, slot in _SLOTS:
            if not isinstance(marked[part].get(key), str):
                return None
            marked[part][key] = _MARK.format(slot)
        wire = kombu_dumps(message)  # what _put pushes for the first job
        if any(kombu_dumps(_MARK.format(slot))[1:-1] in wire for slot in range(5)):
            return None
        counts = [sum(1 for *_, s in _SLOTS if s == slot) + (slot == _BODY) for slot in range(5)]
        template = format_template(marked, _MARK, counts, _BARE)
        if template is None:
            return None
        envelope = cls(template, encode, embed)
        headers = message["headers"]
        try:
            if envelope._body((args, kwargs, embed)) != body:
                return None
            if envelope.entry(headers["id"], properties["delivery_tag"], headers["argsrepr"], headers["kwargsrepr"],
                              args, kwargs) != wire:
                return None
        except (TypeError, ValueError):  # arguments apply_async changed before encoding them: not for splicing
            return None
        return envelope

    def entry(self, task_id: str, tag: str, argsrepr: str, kwargsrepr: str, args: Any, kwargs: Any) -> str:
        """The Redis entry kombu would push for the same message with these per-job values."""
        body = base64.b64encode(self._body((args, kwargs, self._embed)).encode()).decode("ascii")
        return self._template.format(task_id, self._encode(argsrepr), self._encode(kwargsrepr), tag, body)
