"""loopline's I/O tasks; ``from tasks import fetch_url, deliver_webhook, io_sleep``."""

from __future__ import annotations

from tasks.definitions import deliver_webhook, fetch_url, io_sleep

__all__ = ["deliver_webhook", "fetch_url", "io_sleep"]
