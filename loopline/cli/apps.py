"""Which Celery app a command talks to: ``-A/--app`` as Celery reads it, else loopline's default app."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["DEFAULT_APP", "add_app_argument", "load_app"]

DEFAULT_APP = "loopline.app.default"


def add_app_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("-A", "--app", default=DEFAULT_APP, metavar="APP",
                   help="the Celery app, as `celery -A` takes it (module, module:attribute or package with a "
                        "celery module), imported from the current directory (default: loopline's own app, "
                        f"{DEFAULT_APP}, configured by LOOPLINE_* variables)")


def load_app(spec: str) -> Any:
    """Import the Celery app ``spec`` names, as ``celery -A`` would (``celery.app.utils.find_app``)."""
    from celery.app.utils import find_app
    from celery.utils.imports import import_from_cwd

    try:
        return find_app(spec, imp=import_from_cwd)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load the Celery app {spec!r}: {type(exc).__name__}: {exc}") from None
