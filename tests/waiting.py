"""The one way tests wait: for a condition, or for a line in a child's log; AssertionError with context."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from loopline.bench.procs import Child

__all__ = ["WORKER_READY_TIMEOUT_S", "wait_for_log", "wait_until"]

WORKER_READY_TIMEOUT_S = 60.0
T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout_s: float, what: str, *, interval_s: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; AssertionError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def wait_for_log(child: Child, needle: str, timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
    """Wait until ``child`` logged ``needle``; fail early, with the log's tail, if it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in child.log_text():
            return
        if not child.alive():
            break
        time.sleep(0.1)
    raise AssertionError(f"{child.name} never logged {needle!r}:\n{child.log_text()[-4000:]}")
