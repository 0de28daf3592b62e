"""Worker side of loopline: the launcher behind ``loopline worker`` (and, later, the asyncio pool)."""

from __future__ import annotations

from workers.launcher import POOLS, PoolChoice, exec_worker, worker_command

__all__ = ["POOLS", "PoolChoice", "exec_worker", "worker_command"]
