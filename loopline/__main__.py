"""``python -m loopline``: the same as the ``loopline`` console script."""

from __future__ import annotations

from loopline.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    main()
