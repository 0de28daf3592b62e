"""The loopline dashboard: which pool wins for a workload, from ``loopline bench`` run files, live while one runs."""

from __future__ import annotations

__all__: list[str] = []
