"""``workers.asyncio_pool:TaskPool``: the older name of ``loopline.concurrency.asyncio:TaskPool``."""

from __future__ import annotations

from loopline.concurrency.asyncio import TaskPool

__all__ = ["TaskPool"]
