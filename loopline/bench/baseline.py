"""The systems a bench run compares: loopline, and stock Celery as a user would run it (``--baseline stock``).

The stock baseline is a plain ``Celery(broker=..., backend=...)`` app with Celery's defaults (no loopline
transport, result backend, consumer, sizing or ``install()``), its tasks plain bodies: ``requests`` for the
sync pools, and for the asyncio pool, which stock Celery lacks, an ``async def`` aiohttp body (one session
per worker process, ``loop_resources.http_session``) run by loopline's pool under ``-P custom``. Its workers
are ``celery -A loopline.bench.baseline worker`` at Celery's default log level (WARNING); a ``worker_ready``
handler prints the ``ready.`` line the runner waits for, as INFO would. Importing this module builds nothing:
``app`` is built on first access (PEP 562), from ``LOOPLINE_BROKER_URL``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery

from loopline.bench.procs import Child, spawn, start_worker

__all__ = ["BASELINES", "LOOPLINE", "STOCK", "System", "create_stock_app"]

STOCK_APP = "loopline.bench.baseline"
REQUEST_TIMEOUT_S = 30.0
_built: dict[str, Celery] = {}


_plain_sessions: dict[int, Any] = {}


def _plain_session() -> Any:
    """One plain aiohttp session per event loop, as a user's own task would keep (no URL guard, no loopline)."""
    import asyncio

    import aiohttp

    loop = asyncio.get_running_loop()
    session = _plain_sessions.get(id(loop))
    if session is None or session.closed:
        session = _plain_sessions[id(loop)] = aiohttp.ClientSession()
    return session


def create_stock_app(broker_url: str) -> Celery:
    """A plain Celery app on ``broker_url`` (results there too) with the bench's three tasks as plain bodies."""
    from celery.signals import worker_ready

    app = Celery("stock", broker=broker_url, backend=broker_url, set_as_current=False)

    @app.task(name="stock.fetch_url")
    def fetch_url(url: str) -> dict[str, Any]:
        import requests

        started_at = time.time()
        response = requests.get(url, timeout=REQUEST_TIMEOUT_S)
        return {"url": url, "status": response.status_code, "bytes": len(response.content),
                "started_at": started_at, "finished_at": time.time()}

    @app.task(name="stock.deliver_webhook")
    def deliver_webhook(url: str, payload: Any) -> dict[str, Any]:
        import requests

        started_at = time.time()
        response = requests.post(url, json=payload, timeout=REQUEST_TIMEOUT_S)
        return {"url": url, "status": response.status_code, "started_at": started_at, "finished_at": time.time()}

    @app.task(name="stock.io_sleep")
    def io_sleep(ms: float) -> dict[str, Any]:
        started_at = time.time()
        time.sleep(ms / 1000)
        return {"slept_ms": ms, "started_at": started_at, "finished_at": time.time()}

    @app.task(name="stock.fetch_url_async")
    async def fetch_url_async(url: str) -> dict[str, Any]:
        started_at = time.time()
        async with _plain_session().get(url) as response:
            body = await response.read()
        return {"url": url, "status": response.status, "bytes": len(body), "started_at": started_at,
                "finished_at": time.time()}

    @app.task(name="stock.deliver_webhook_async")
    async def deliver_webhook_async(url: str, payload: Any) -> dict[str, Any]:
        started_at = time.time()
        async with _plain_session().post(url, json=payload) as response:
            await response.read()
        return {"url": url, "status": response.status, "started_at": started_at, "finished_at": time.time()}

    @app.task(name="stock.io_sleep_async")
    async def io_sleep_async(ms: float) -> dict[str, Any]:
        import asyncio

        started_at = time.time()
        await asyncio.sleep(ms / 1000)
        return {"slept_ms": ms, "started_at": started_at, "finished_at": time.time()}

    @worker_ready.connect(weak=False)
    def announce_ready(sender: Any = None, **kwargs: Any) -> None:
        print(f"{sender.hostname} ready.", file=sys.stderr, flush=True)

    return app


@dataclass(frozen=True)
class System:
    """One side of the comparison: the app that sends and reads its jobs, the task for a pool, its workers."""

    name: str

    def app(self) -> Celery:
        if self.name == "loopline":
            from loopline.app.default import app

            return app
        return _stock_app()

    def task_name(self, pool: str, task: str) -> str:
        if self.name == "loopline":
            return f"tasks.{task}"
        return f"stock.{task}_async" if pool == "asyncio" else f"stock.{task}"

    def start_worker(self, pool: str, concurrency: int, *, queues: Sequence[str], log_path: Path,
                     env: dict[str, str] | None = None, processes: int = 1) -> Child:
        if self.name == "loopline":
            extra: Sequence[str] = ("--processes", str(processes)) if processes > 1 else ()
            return start_worker(pool, concurrency, queues=queues, log_path=log_path, env=env, extra=extra)
        from loopline.worker.launcher import ASYNCIO_POOL, POOLS

        changes: dict[str, str | None] = {"CELERY_CUSTOM_WORKER_POOL": ASYNCIO_POOL} if pool == "asyncio" else {}
        argv = [sys.executable, "-m", "celery", "-A", STOCK_APP, "worker", "-P", POOLS[pool].celery_pool,
                "-c", str(concurrency), "-Q", ",".join(queues), "--loglevel", "WARNING"]
        return spawn(f"stock {pool} worker", argv, log_path, changes)


LOOPLINE = System("loopline")
STOCK = System("stock")
BASELINES = {"stock": STOCK}


def _stock_app() -> Celery:
    if "app" not in _built:
        url = os.environ.get("LOOPLINE_BROKER_URL")
        if not url:
            raise RuntimeError("the stock baseline needs LOOPLINE_BROKER_URL (loopline bench sets it)")
        _built["app"] = create_stock_app(url)
    return _built["app"]


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _stock_app()
