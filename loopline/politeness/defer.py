"""Deferral: a job whose host is not due goes back to the broker with its due time instead of holding a slot.

The job is sent again, same task id, arguments and retry count, with a countdown to its due time and the
header ``loopline_deferrals`` counting its deferrals; then the running delivery ends with Celery's ``Ignore``,
which acks it (``celery.worker.request.Request.on_failure``: Ignore -> ``acknowledge``) and stores no state.
The new message is published before the old one is acked, so under ``acks_late`` a crash in between gives a
duplicate, never a lost job. A deferral is not a Celery retry: ``request.retries`` is unchanged, so retry
budgets (webhooks) and the dead-letter run counts (keyed by task id and retries) do not move.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery.exceptions import Ignore

from loopline.politeness.slot import HostNotDue, deferrable

__all__ = ["DEFER_HEADER", "DEFER_MAX_S", "defer", "deferrals", "deferring"]

logger = logging.getLogger(__name__)

DEFER_HEADER = "loopline_deferrals"
#: a deferred job comes back at least this often, so a rule change reaches even a long backlog
DEFER_MAX_S = 30.0
#: a deferred job comes back this much before it is due and waits the rest in its slot: a trip through the
#: broker (publish, fetch, the worker's ETA timer) is late by tens of milliseconds, and a late job is a lost turn
EARLY_S = 0.1


def deferrals(request: Any) -> int:
    """How often this job has been deferred so far."""
    value = (getattr(request, "headers", None) or {}).get(DEFER_HEADER, 0)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def defer(task: Any, not_due: HostNotDue) -> None:
    """Send ``task``'s job again for when its host is due, then end this delivery (raises Ignore)."""
    from loopline.settings import settings_for

    request = task.request
    # An ETA message waits unacked in a worker; past the visibility timeout Redis would hand it out again.
    longest_s = min(DEFER_MAX_S, settings_for(task.app).visibility_timeout_s / 2)
    countdown_s = min(max(not_due.wait_ms / 1000 - EARLY_S, 0.0), longest_s)
    headers = {**(request.headers or {}), DEFER_HEADER: deferrals(request) + 1}
    # Task.retry's own path (celery.app.task.Task.retry -> signature_from_request), minus the retry count.
    task.signature_from_request(request, countdown=countdown_s, headers=headers).apply_async()
    logger.debug("deferred %s[%s] by %.3f s: %s", task.name, request.id, countdown_s, not_due)
    raise Ignore(f"deferred by {countdown_s:.3f} s: {not_due}")


@contextmanager
def deferring(task: Any) -> Iterator[None]:
    """Within this block, a host not due for more than a moment defers ``task``'s job (see the module doc)."""
    if getattr(task.request, "called_directly", True):  # not a worker's delivery: nothing to re-send; wait
        yield
        return
    token = deferrable.set(task)
    try:
        yield
    except HostNotDue as not_due:
        defer(task, not_due)
    finally:
        deferrable.reset(token)
