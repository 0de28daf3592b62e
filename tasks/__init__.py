"""The reference pipeline's tasks; ``from tasks import fetch_url, deliver_webhook, io_sleep``.

They are loopline's built-in I/O tasks (:mod:`loopline.jobs.tasks`), registered on the reference app.
"""

from __future__ import annotations

import config.celery_app  # noqa: F401 - the app they run on, made current before the tasks are looked up
from loopline.jobs.tasks import deliver_webhook, fetch_url, io_sleep

__all__ = ["deliver_webhook", "fetch_url", "io_sleep"]
