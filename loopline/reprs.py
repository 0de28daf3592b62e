"""Celery's ``saferepr``, quickly, for the plain values JSON arguments and results are made of.

Celery writes two reprs per job with ``celery.utils.saferepr.saferepr``, a streaming repr that truncates at a
length and elides containers below a depth: ``argsrepr``/``kwargsrepr`` in ``celery.app.amqp.AMQP.as_task_v2``
(the headers Flower and the worker's logs show), and the result that ``task-succeeded`` carries, in
``celery.app.trace.build_tracer``. For short values of plain types its output is a fixed function of the
value, which :func:`plain_saferepr` computes without the token stream (a sixth of a bulk send; about 90 µs,
a tenth of an asyncio worker's CPU, for the dict ``fetch_url`` returns). Where it cannot be sure of the same
text (another type, too deep, long enough that saferepr might cut it) it returns None and the caller takes
Celery's. :func:`saferepr` is the drop-in that does so; the asyncio pool puts it in the tracer's module while
it runs (:func:`install_in_tracer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import celery.app.trace
from celery.utils.saferepr import saferepr as celery_saferepr

__all__ = ["install_in_tracer", "plain_saferepr", "saferepr", "uninstall_from_tracer"]


class _NotPlain(Exception):
    """The value holds something saferepr may show differently from the rules below."""


def _plain(value: Any, level: int, maxlevels: int) -> str:
    kind = type(value)
    if kind is str:
        # saferepr._format_chars: quotes, and only the quote escaped (no repr escapes, no other change).
        return "'" + value.replace("'", "\\'") + "'"
    if kind is int or kind is float or kind is bool:
        return str(value)  # reprstream: a Number is shown as str(value)
    if value is None:
        return "None"  # reprstream's _repr: repr(None)
    # A container at saferepr's depth limit is elided as '[...]': left to saferepr (and a cycle ends here too).
    if level >= maxlevels:
        raise _NotPlain
    if kind is tuple:
        inner = ", ".join([_plain(item, level + 1, maxlevels) for item in value])
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if kind is list:
        return "[" + ", ".join([_plain(item, level + 1, maxlevels) for item in value]) + "]"
    if kind is dict:
        parts = []
        for key, item in value.items():
            if type(key) is not str:
                raise _NotPlain
            parts.append("'" + key.replace("'", "\\'") + "': " + _plain(item, level + 1, maxlevels))
        return "{" + ", ".join(parts) + "}"
    raise _NotPlain


def plain_saferepr(value: Any, maxlen: int, maxlevels: int) -> str | None:
    """``saferepr(value, maxlen, maxlevels=maxlevels)`` for str, int, float, bool and None in tuples, lists and
    str-keyed dicts, nested at most ``maxlevels`` deep, and shorter than ``maxlen``; None for anything else.

    Shorter than ``maxlen``: saferepr subtracts each token's length from the budget and truncates a token once
    the budget is spent or smaller than it (``celery.utils.text.truncate`` cuts at ``len >= maxlen``); a text
    shorter than the whole budget never reaches either. A ``maxlevels`` of 0 (unlimited in saferepr) or a
    ``maxlen`` of 0 or None is left to saferepr.
    """
    if not maxlevels or not maxlen:
        return None
    try:
        text = _plain(value, 0, maxlevels)
    except (_NotPlain, RecursionError, ValueError):  # ValueError: an int too long for str(); saferepr decides
        return None
    return text if len(text) < maxlen else None


def saferepr(o: Any, maxlen: int | None = None, maxlevels: int = 3, seen: Any = None) -> str:
    """``celery.utils.saferepr.saferepr(o, maxlen, maxlevels, seen)``: the same text, through
    :func:`plain_saferepr` where it applies."""
    if maxlen is not None and seen is None:
        text = plain_saferepr(o, maxlen, maxlevels)
        if text is not None:
            return text
    return celery_saferepr(o, maxlen, maxlevels, seen)


def install_in_tracer() -> Callable[..., str]:
    """Make Celery's tracer format results with :func:`saferepr`: ``build_tracer``'s ``trace_task`` looks up the
    module global ``saferepr`` at each call (``Rstr = saferepr(R, resultrepr_maxsize)``).

    Returns the function it replaced, for :func:`uninstall_from_tracer`: not always Celery's, if something else
    patched the tracer first.
    """
    previous: Callable[..., str] = celery.app.trace.saferepr
    celery.app.trace.saferepr = saferepr
    return previous


def uninstall_from_tracer(previous: Callable[..., str]) -> None:
    """Put back what :func:`install_in_tracer` replaced."""
    celery.app.trace.saferepr = previous
