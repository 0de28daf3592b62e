"""Back-off from the remote side: ``fetch_url`` tries again, a bounded number of times, once a 429/503 pause ends."""

from __future__ import annotations

from typing import Any

from loopline.jobs.specs import FetchResult
from loopline.politeness.engine import engine_for
from loopline.politeness.rules import host_of
from loopline.politeness.slot import PAUSE_STATUSES

__all__ = ["retry_when_paused"]

#: the soonest a paused fetch is tried again (the pause is checked again then, and the job deferred if need be)
MIN_RETRY_S = 0.05


def retry_when_paused(task: Any, result: FetchResult) -> FetchResult:
    """``result``, unless it is a 429/503 that paused its host: then retry the job once the pause ends.

    A Celery retry (it counts), at most ``LOOPLINE_FETCH_MAX_RETRIES`` times; past that the answer is the result.
    """
    if result.status not in PAUSE_STATUSES or getattr(task.request, "called_directly", True):
        return result
    from loopline.settings import settings_for

    left_s = engine_for(task.app).pause_left_s(host_of(result.final_url))
    max_retries = settings_for(task.app).fetch_max_retries
    if left_s <= 0 or (task.request.retries or 0) >= max_retries:
        return result
    raise task.retry(countdown=max(left_s, MIN_RETRY_S), max_retries=max_retries)
