"""The ``loopline`` command line: redis, worker, enqueue, flower, bench, dashboard, dlq."""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
