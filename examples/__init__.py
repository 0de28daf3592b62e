"""Runnable examples of using loopline from application code."""

from __future__ import annotations

__all__: list[str] = []
