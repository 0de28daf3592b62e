"""What the dashboard can read from Celery: the broker, and the workers online with their pool and concurrency.

``loopline.app.default`` is imported lazily, on the first look: it needs a broker (``LOOPLINE_BROKER_URL`` or a
running embedded Redis). Without one the dashboard still serves its runs and shows "no broker".
"""

from __future__ import annotations

import logging
from typing import Any

from loopline.dashboard.cached import CachedState

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


class ClusterView(CachedState):
    """The cluster state, read at most every ``cache_s`` (an inspect takes up to about twice its timeout)."""

    def __init__(self, flower_url: str | None, *, timeout_s: float = INSPECT_TIMEOUT_S, cache_s: float = CACHE_S):
        super().__init__(cache_s=cache_s)
        self.flower_url, self.timeout_s = flower_url, timeout_s

    def _read(self) -> dict[str, Any]:
        return {**_read(self.timeout_s), "flower_url": self.flower_url}
