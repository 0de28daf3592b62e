"""Signal handlers in the process that runs a job: counting starts of redelivered jobs, dead-lettering jobs
that ran out of retries. ``loopline.install`` connects them for its apps' tasks (:func:`connect`).

A job has exhausted its retries when its final failure came out of ``Task.retry`` past the retry limit:
``MaxRetriesExceededError``, or the ``exc=`` it passed to ``retry`` (which Celery re-raises then, see
``celery.app.task.Task.retry``; ``autoretry_for`` goes through the same call). A job that fails outright,
such as a webhook answered with 400, is an ordinary failure and stays in the result backend only.
"""

from __future__ import annotations

import logging
import traceback as tb_module
from collections.abc import Callable
from types import TracebackType
from typing import Any

import redis
from celery import Task
from celery.exceptions import MaxRetriesExceededError
from celery.signals import task_failure, task_prerun

from loopline.deadletter.deliveries import is_redelivery, record_start
from loopline.deadletter.store import DeadLetter, DeadLetterStore, Reason

__all__ = ["connect", "on_task_failure", "on_task_prerun", "retries_exhausted"]

logger = logging.getLogger(__name__)


def on_task_prerun(sender: Task | None = None, task_id: str | None = None, **_: Any) -> None:
    """Count the start of a redelivered job before its body runs, so a body that kills the process is counted."""
    if sender is None or task_id is None or not is_redelivery(sender.request.delivery_info):
        return
    try:
        record_start(sender.app.backend.client, task_id, sender.request.retries or 0)
    except redis.RedisError as exc:
        logger.error("could not count the start of %s[%s]: %s", sender.name, task_id, exc)


def _raised_by_retry(tb: TracebackType | None) -> bool:
    retry_code = Task.retry.__code__
    return any(frame.f_code is retry_code for frame, _ in tb_module.walk_tb(tb))


def retries_exhausted(task: Task, exc: BaseException | None, tb: TracebackType | None) -> bool:
    """True if ``exc`` ended a job because its retries ran out."""
    if isinstance(exc, MaxRetriesExceededError):
        return True
    # Task.retry(max_retries=...) records the per-call limit on the task as override_max_retries.
    limit = getattr(task, "override_max_retries", task.max_retries)
    if limit is None or (task.request.retries or 0) < limit:
        return False
    return _raised_by_retry(tb)


def on_task_failure(sender: Task | None = None, task_id: str | None = None, exception: BaseException | None = None,
                    args: Any = None, kwargs: Any = None, traceback: TracebackType | None = None, einfo: Any = None,
                    **_: Any) -> None:
    """Dead-letter a job whose retries are exhausted, with its arguments, error and traceback."""
    if sender is None or task_id is None or not retries_exhausted(sender, exception, traceback):
        return
    request = sender.request
    retries = request.retries or 0
    entry = DeadLetter(
        reason=Reason.RETRIES_EXHAUSTED,
        error=f"{type(exception).__name__}: {exception} (after {retries} retries)",
        task=sender.name, task_id=task_id,
        args=list(args or ()), kwargs=dict(kwargs or {}),
        queue=(request.delivery_info or {}).get("routing_key"),
        deliveries=retries + 1, retries=retries,
        traceback=str(einfo) if einfo is not None else None,
    )
    try:
        DeadLetterStore(sender.app.backend.client).add(entry)
    except redis.RedisError as exc:
        logger.error("could not dead-letter %s[%s] after its retries ran out: %s", sender.name, task_id, exc)
        return
    logger.warning("dead-lettered %s[%s]: %s: %s", sender.name, task_id, entry.reason, entry.error)


def connect(serves: Callable[[Any], bool]) -> None:
    """Connect both handlers once per process, for the tasks of the apps ``serves`` accepts
    (``loopline.install`` passes "installed": a plain app in the same process is left alone)."""

    def prerun(sender: Task | None = None, **kwargs: Any) -> None:
        if sender is not None and serves(sender.app):
            on_task_prerun(sender=sender, **kwargs)

    def failure(sender: Task | None = None, **kwargs: Any) -> None:
        if sender is not None and serves(sender.app):
            on_task_failure(sender=sender, **kwargs)

    task_prerun.connect(prerun, weak=False, dispatch_uid="loopline-deadletter-prerun")
    task_failure.connect(failure, weak=False, dispatch_uid="loopline-deadletter-failure")
