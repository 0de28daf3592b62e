"""The one way tests wait: until a condition holds, or until a child logs a line; AssertionError with context.

Waits have generous timeouts and no test asserts how long one took: a timeout here means "never happened".
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from loopline.bench.procs import Child

__all__ = ["WORKER_READY_TIMEOUT_S", "wait_for_log", "wait_until"]

WORKER_READY_TIMEOUT_S = 60.0
T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, *, child: Child | None = None,
               interval_s: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    AssertionError naming ``what`` after ``timeout_s``, or at once if ``child`` exited while the condition was
    still false (with the tail of its log).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        gone = child is not None and not child.alive()
        if gone or time.monotonic() > deadline:
            reason = f"{child.name} exited" if gone and child is not None else f"timed out after {timeout_s:g} s"
            tail = f":\n{child.log_text()[-4000:]}" if child is not None else ""
            raise AssertionError(f"{reason} waiting for {what}{tail}")
        time.sleep(interval_s)


def wait_for_log(child: Child, needle: str, timeout_s: float = WORKER_READY_TIMEOUT_S) -> str:
    """Wait until ``child`` logged ``needle``; returns its log. Fails early, with the log's tail, if it exits."""
    return wait_until(lambda: (log := child.log_text()) and needle in log and log, timeout_s,
                      f"{child.name} to log {needle!r}", child=child, interval_s=0.1)
