"""loopline.dashboard.cached: one read per period, shared by every caller."""

from __future__ import annotations

import threading
from typing import Any

from loopline.dashboard.cached import CachedState


class Counting(CachedState):
    def __init__(self, *, cache_s: float) -> None:
        super().__init__(cache_s=cache_s)
        self.reads = 0

    def _read(self) -> dict[str, Any]:
        self.reads += 1
        return {"read": self.reads}


def test_a_fresh_answer_is_reused_until_it_is_older_than_the_period() -> None:
    view = Counting(cache_s=60)
    assert view.state() == {"read": 1}
    assert view.state() == {"read": 1} and view.reads == 1


def test_a_zero_period_reads_on_every_look() -> None:
    view = Counting(cache_s=0)
    view.state()
    view.state()
    assert view.reads == 2


def test_callers_on_many_threads_share_one_read() -> None:
    view = Counting(cache_s=60)
    threads = [threading.Thread(target=view.state) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert view.reads == 1
