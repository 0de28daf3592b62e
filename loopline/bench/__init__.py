"""The pool benchmark: a local target server and a runner that times each pool on the same work."""

from __future__ import annotations

__all__: list[str] = []
