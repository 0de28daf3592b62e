"""The producer side of the CLI: turn command-line arguments into jobs, send them, optionally wait."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import TimeoutError as ResultTimeout
from celery.result import AsyncResult

__all__ = ["Job", "jobs_from_args", "send", "wait"]

TASKS = ("fetch_url", "deliver_webhook", "io_sleep")


@dataclass(frozen=True)
class Job:
    """One call to make: task name, positional and keyword arguments."""

    task: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _lines(path: Path) -> list[str]:
    try:
        text = path.read_text() if str(path) != "-" else sys.stdin.read()
    except OSError as exc:
        raise ValueError(f"cannot read --file {path}: {exc.strerror or exc}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _not_json(token: str) -> Any:
    # Python's json reads NaN, Infinity and -Infinity, which JSON does not have.
    raise json.JSONDecodeError(f"{token} is not a JSON value", token, 0)


def jobs_from_args(task: str, values: Sequence[str], file: Path | None = None, payload: str | None = None,
                   secret: str | None = None) -> list[Job]:
    """Build jobs: one per URL (fetch_url, deliver_webhook) or per duration in ms (io_sleep)."""
    items = [*values, *(_lines(file) if file else [])]
    if not items:
        raise ValueError("nothing to enqueue: give at least one argument or --file")
    if task == "fetch_url":
        return [Job(task, (url,), {}) for url in items]
    if task == "deliver_webhook":
        try:
            body = json.loads(payload, parse_constant=_not_json) if payload is not None else {}
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"--payload is not valid JSON: {exc or 'nested too deeply'}") from None
        return [Job(task, (url, body), {"secret": secret} if secret else {}) for url in items]
    if task == "io_sleep":
        try:
            return [Job(task, (float(ms),), {}) for ms in items]
        except ValueError:
            raise ValueError(f"io_sleep takes durations in milliseconds, got {items!r}") from None
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


def send(app: Any, jobs: Iterable[Job], queue: str | None = None) -> list[AsyncResult]:
    """Send every job through ``app`` in pipelined round trips; if any job is bad, none is sent."""
    from loopline.app.producer import send_many

    jobs = list(jobs)
    if not jobs:
        return []
    name = f"tasks.{jobs[0].task}"  # the built-in tasks' wire names (loopline.jobs.tasks)
    if name not in app.tasks:
        app.loader.import_default_modules()  # the app's include/imports, as a worker imports them
    if name not in app.tasks:
        raise ValueError(f"the app {app.main!r} has no task {name!r}: import loopline.jobs.tasks in it "
                         "(or include it) to register loopline's built-in tasks")
    task = app.tasks[name]
    options = {"queue": queue} if queue else {}
    return send_many(task, [(job.args, job.kwargs) for job in jobs], **options)


def wait(results: Sequence[AsyncResult], timeout_s: float) -> list[tuple[str, str, Any]]:
    """(id, state, result or error message) for each job, waiting up to ``timeout_s`` for each."""
    out = []
    for res in results:
        try:
            value = res.get(timeout=timeout_s, propagate=False)
        except ResultTimeout:
            out.append((res.id, res.state, f"not finished after {timeout_s:g} s"))
            continue
        out.append((res.id, res.state, value if res.successful() else f"{type(value).__name__}: {value}"))
    return out
