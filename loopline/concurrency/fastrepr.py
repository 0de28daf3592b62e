"""Celery's ``saferepr`` of a task's result, exact and without its token stream for flat dicts.

Celery's tracer (``celery.app.trace.build_tracer``) formats every successful result with
``celery.utils.saferepr.saferepr(R, task.resultrepr_maxsize)``: the ``result`` that ``task-succeeded``
carries to Flower and the worker's success log line. saferepr walks the value as a stream of tokens, about
90 µs for the dict ``fetch_url`` returns, a tenth of an asyncio worker's CPU per job. :func:`saferepr` here
gives the same text for a dict of ``str`` keys and ``str``/``int``/``float``/``bool``/``None`` values that
fits ``maxlen`` (then saferepr cuts nothing) and hands anything else to Celery's. The asyncio pool puts it in
the tracer's module while it runs (:func:`install`, :func:`uninstall`).
"""

from __future__ import annotations

from typing import Any

import celery.app.trace
from celery.utils.saferepr import saferepr as celery_saferepr

__all__ = ["install", "saferepr", "uninstall"]

_SCALARS = (int, float, bool)


def saferepr(o: Any, maxlen: int | None = None, maxlevels: int = 3, seen: Any = None) -> str:
    """``celery.utils.saferepr.saferepr(o, maxlen, maxlevels, seen)``, the same text."""
    if type(o) is dict:
        try:
            text = _flat_dict(o)
        except ValueError:  # an int too long for str(): Celery's raises it too, or cuts it
            text = None
        # Strictly shorter: saferepr checks the budget before each token, and at 0 left it writes ", ..."
        if text is not None and (maxlen is None or len(text) < maxlen):
            return text
    return celery_saferepr(o, maxlen, maxlevels, seen)


def _flat_dict(mapping: dict[Any, Any]) -> str | None:
    # saferepr quotes text as "'" + text with ' escaped + "'" (celery.utils.saferepr._format_chars), nothing else
    # escaped, and writes numbers with str() (safe_t); None through repr().
    parts = []
    for key, value in mapping.items():
        if type(key) is not str:
            return None
        kind = type(value)
        if kind is str:
            shown = "'" + value.replace("'", "\\'") + "'"
        elif kind in _SCALARS:
            shown = str(value)
        elif value is None:
            shown = "None"
        else:
            return None
        parts.append("'" + key.replace("'", "\\'") + "': " + shown)
    return "{" + ", ".join(parts) + "}"


def install() -> None:
    """Make the tracer format results with :func:`saferepr` (it reads the module's global at each call)."""
    celery.app.trace.saferepr = saferepr


def uninstall() -> None:
    celery.app.trace.saferepr = celery_saferepr
