"""loopline: Celery for I/O-bound jobs, with an asyncio pool that serves any Celery app.

``loopline.install(app)`` gives a Celery app the rest of the engine (see :mod:`loopline.app.install`).
Importing loopline reads no environment, resolves no broker and connects no signal handler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["__version__", "install"]
__version__ = "0.2.0"

if TYPE_CHECKING:
    from loopline.app.install import install


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import loopline`` (and ``python -m loopline --help``) does not import Celery.
    if name == "install":
        from loopline.app.install import install

        return install
    raise AttributeError(f"module 'loopline' has no attribute {name!r}")
