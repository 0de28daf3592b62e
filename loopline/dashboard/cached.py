"""A state the dashboard reads from a slow source (an inspect broadcast, Redis) at most once per period."""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["CachedState"]


class CachedState:
    """Reads ``_read()`` at most every ``cache_s``; callers on several threads share one answer."""

    def __init__(self, *, cache_s: float) -> None:
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._state: dict[str, Any] | None = None
        self._read_at = 0.0

    def state(self) -> dict[str, Any]:
        """Blocking while a read runs: call it from a worker thread."""
        with self._lock:
            if self._state is None or time.monotonic() - self._read_at > self.cache_s:
                self._state = self._read()
                self._read_at = time.monotonic()
            return self._state

    def _read(self) -> dict[str, Any]:
        raise NotImplementedError
