"""Runs N worker processes under one parent: forwards signals, restarts a child that dies.

``loopline worker --pool asyncio --processes 4`` uses every core: each child is a complete Celery
worker (its own consumer, its own event loop) with its own node name, so Celery, Flower and
``inspect`` see N workers. The parent only supervises: SIGTERM/SIGINT/SIGQUIT are sent to every child
once (each child is in its own session, so a terminal's Ctrl-C does not reach it twice and turn a
warm shutdown into a cold one); a child that exits while no shutdown is under way is restarted
after a delay that doubles with each quick crash.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

__all__ = ["Supervisor"]

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.2
RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 30.0
STABLE_AFTER_S = 30.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


@dataclass
class _Slot:
    index: int
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_delay_s: float = RESTART_DELAY_S
    restart_at: float | None = None
    restarts: int = 0
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Keeps ``processes`` children of ``argv_for(index)`` running until told to stop."""

    def __init__(self, argv_for: Callable[[int], list[str]], processes: int, env: dict[str, str] | None = None,
                 *, restart_delay_s: float = RESTART_DELAY_S) -> None:
        if processes < 1:
            raise ValueError(f"--processes must be at least 1, got {processes}")
        self.argv_for, self.env = argv_for, {**os.environ, **(env or {})}
        self.slots = [_Slot(i, restart_delay_s=restart_delay_s) for i in range(processes)]
        self.base_delay_s = restart_delay_s
        self.stopping: int | None = None

    def run(self) -> int:
        """Start every child, supervise until a signal stops them all; 0 when every child exited cleanly."""
        previous = {signum: signal.signal(signum, self._on_signal) for signum in FORWARDED}
        try:
            for slot in self.slots:
                self._start(slot)
            while any(slot.popen is not None for slot in self.slots) or (
                self.stopping is None and any(slot.restart_at is not None for slot in self.slots)
            ):
                self._reap()
                time.sleep(POLL_INTERVAL_S)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        last = [slot.exit_codes[-1] for slot in self.slots if slot.exit_codes]
        return 0 if all(code == 0 for code in last) else 1

    def _start(self, slot: _Slot) -> None:
        slot.popen = subprocess.Popen(self.argv_for(slot.index), env=self.env, start_new_session=True)
        slot.started_at, slot.restart_at = time.monotonic(), None
        logger.info("supervisor: child %d started (pid %d)", slot.index, slot.popen.pid)

    def _reap(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.popen is not None and (code := slot.popen.poll()) is not None:
                slot.exit_codes.append(code)
                slot.popen = None
                if self.stopping is None:
                    # A child that ran a while before dying is not crash-looping: start again from the base delay.
                    quick = now - slot.started_at < STABLE_AFTER_S
                    slot.restart_delay_s = min(slot.restart_delay_s * 2, MAX_RESTART_DELAY_S) if quick else (
                        self.base_delay_s)
                    slot.restart_at = now + slot.restart_delay_s
                    logger.warning("supervisor: child %d exited with %d; restarting in %.1f s", slot.index, code,
                                   slot.restart_delay_s)
            if slot.popen is None and slot.restart_at is not None and now >= slot.restart_at and self.stopping is None:
                slot.restarts += 1
                self._start(slot)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = signum
        for slot in self.slots:
            slot.restart_at = None
            if slot.popen is not None and slot.popen.poll() is None:
                os.kill(slot.popen.pid, signum)
