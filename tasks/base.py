"""The base class of loopline's tasks: checks a job at ``.delay()`` so bad input fails where it is made."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from celery import Task

from config.celery_app import settings
from tasks.errors import InvalidJob, JobTooLarge

__all__ = ["IOTask"]


class IOTask(Task):
    """A Celery task whose arguments are validated and size-checked before the message is sent.

    ``validate`` (set per task through ``@app.task(validate=...)``) receives the call's arguments and
    raises :class:`InvalidJob`; the same core runs again in the worker, so a message that bypassed
    the producer (``send_task``, another client) is checked too.
    """

    abstract = True
    validate: Callable[..., object] | None = None

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        self.check_job(tuple(args or ()), dict(kwargs or {}))
        return super().apply_async(args, kwargs, *rest, **options)

    def check_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise InvalidJob (or JobTooLarge) for a job that would fail anyway; TypeError for a bad signature."""
        try:
            size = len(json.dumps([args, kwargs]))
        except (TypeError, ValueError) as exc:
            raise InvalidJob(f"{self.name}: arguments are not JSON-serialisable: {exc}") from None
        if size > settings.max_arg_bytes:
            raise JobTooLarge(
                f"{self.name}: arguments are {size} bytes, over LOOPLINE_MAX_ARG_BYTES={settings.max_arg_bytes}"
            )
        if self.validate is not None:
            self.validate(*args, **kwargs)
