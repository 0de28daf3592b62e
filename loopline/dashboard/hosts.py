"""The dashboard's hosts view: per-host rules and live figures (``politeness.stats``) from the broker's Redis.

Like the cluster view, it finds the broker through ``loopline.app.default`` on first use; without one (or
with a broker that is not Redis) the page shows why instead of a table.
"""

from __future__ import annotations

import logging
from typing import Any

from loopline.dashboard.cached import CachedState

__all__ = ["HostsView"]

logger = logging.getLogger(__name__)

CACHE_S = 1.0


def _read() -> dict[str, Any]:
    try:
        import redis

        from loopline.app.default import app
        from loopline.politeness.engine import redis_url_of
        from loopline.politeness.stats import host_figures
        from loopline.settings import redact_url

        url = redis_url_of(app)
    except Exception as exc:  # BrokerNotFound, a broker that is not Redis, a broken install: the page says why
        return {"hosts": [], "error": str(exc)}
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            figures = host_figures(client)
    except redis.RedisError as exc:
        logger.warning("hosts view: %s unreachable: %s", redact_url(url), exc)
        return {"hosts": [], "error": f"{redact_url(url)} is unreachable ({exc})"}
    return {"hosts": [f.as_dict() for f in figures], "error": None}


class HostsView(CachedState):
    """The host figures (one pipelined read), read at most every ``cache_s``."""

    def __init__(self, *, cache_s: float = CACHE_S) -> None:
        super().__init__(cache_s=cache_s)

    def _read(self) -> dict[str, Any]:
        return _read()
