"""The reference pipeline's Celery app, ``config.celery_app:app``: loopline's default app, with its tasks.

``celery -A config.celery_app worker -P gevent -c 500`` from the repository root works as well as
``loopline worker``: the app is :mod:`loopline.app.default`'s, built from ``LOOPLINE_*`` variables, with
loopline installed (``loopline.install``), so everything pool-dependent is decided when the worker starts.
"""

from __future__ import annotations

from loopline.app.default import BrokerNotFound
from loopline.app.default import app as app
from loopline.app.default import settings as settings

__all__ = ["BrokerNotFound", "app", "settings"]
