"""What the dashboard can read from Celery: the broker, and the workers online with their pool and concurrency.

``loopline.app.default`` is imported lazily, on the first look: it needs a broker (``LOOPLINE_BROKER_URL`` or a
running embedded Redis). Without one the dashboard still serves its runs and shows "no broker".
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

__all__ = ["POOL_NAMES", "ClusterView"]

logger = logging.getLogger(__name__)

INSPECT_TIMEOUT_S = 1.0
CACHE_S = 3.0
# ``inspect stats`` names a worker's pool by its class; the dashboard shows loopline's pool names.
POOL_NAMES = {
    "celery.concurrency.prefork:TaskPool": "prefork",
    "celery.concurrency.thread:TaskPool": "threads",
    "celery.concurrency.gevent:TaskPool": "gevent",
    "celery.concurrency.eventlet:TaskPool": "eventlet",
    "celery.concurrency.solo:TaskPool": "solo",
    "loopline.concurrency.asyncio:TaskPool": "asyncio",
}


def _worker(name: str, stats: dict[str, Any]) -> dict[str, Any]:
    pool = stats.get("pool") or {}
    implementation = str(pool.get("implementation", ""))
    return {
        "name": name,
        "pool": POOL_NAMES.get(implementation, implementation or "unknown"),
        "concurrency": pool.get("max-concurrency"),
        "processes": len(pool.get("processes") or []) or 1,
        "pid": stats.get("pid"),
        "tasks_done": sum((stats.get("total") or {}).values()),
    }


def _read(timeout_s: float) -> dict[str, Any]:
    try:
        from loopline.app.default import app
        from loopline.settings import redact_url
    except Exception as exc:  # BrokerNotFound, ConfigError, or a broken install: the page says why
        message = str(exc) if str(exc).startswith("no broker") else f"no broker: {exc}"
        return {"broker": None, "workers": [], "error": message}
    broker = redact_url(app.conf.broker_url)
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout_s)
            stats = app.control.inspect(timeout=timeout_s, connection=conn).stats() or {}
    except Exception as exc:  # a refused or dropped connection, whatever the transport calls it
        logger.warning("cluster state: broker %s unreachable: %s", broker, exc)
        return {"broker": broker, "workers": [], "error": f"no broker: {broker} is unreachable ({exc})"}
    workers = sorted((_worker(name, s) for name, s in stats.items()), key=lambda w: w["name"])
    return {"broker": broker, "workers": workers, "error": None, "dead_letters": _dead_letters(app)}


def _dead_letters(app: Any) -> int | None:
    """Size of the dead-letter store (it lives in the result backend's Redis); None when unreadable."""
    from loopline.deadletter import size

    try:
        return size(app.backend.client)
    except Exception as exc:  # a backend that is not Redis, or one that went away since the inspect
        logger.warning("cluster state: dead-letter size unreadable: %s", exc)
        return None


class ClusterView:
    """Reads the cluster state at most every ``cache_s``; callers on several threads share one answer."""

    def __init__(self, flower_url: str | None, *, timeout_s: float = INSPECT_TIMEOUT_S, cache_s: float = CACHE_S):
        self.flower_url, self.timeout_s, self.cache_s = flower_url, timeout_s, cache_s
        self._lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._read_at = 0.0

    def state(self) -> dict[str, Any]:
        """Blocking (up to about twice the inspect timeout): run it in a worker thread."""
        with self._lock:
            if self._state is None or time.monotonic() - self._read_at > self.cache_s:
                self._state = {**_read(self.timeout_s), "flower_url": self.flower_url}
                self._read_at = time.monotonic()
            return self._state
