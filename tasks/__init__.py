"""The reference pipeline's tasks; ``from tasks import fetch_url, deliver_webhook, io_sleep``.

They are loopline's built-in I/O tasks (:mod:`loopline.jobs.tasks`, Celery shared tasks), as registered on the
reference app: the task objects themselves, not ``current_app`` proxies, so they send through that app from any
thread.
"""

from __future__ import annotations

from config.celery_app import app

deliver_webhook = app.tasks["tasks.deliver_webhook"]
fetch_url = app.tasks["tasks.fetch_url"]
io_sleep = app.tasks["tasks.io_sleep"]

__all__ = ["deliver_webhook", "fetch_url", "io_sleep"]
