"""Builds the ``celery worker`` command line for a pool and replaces the current process with it."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

__all__ = ["APP", "ASYNCIO_POOL", "POOLS", "PoolChoice", "exec_worker", "worker_command", "worker_env"]

APP = "loopline.app.default"
ASYNCIO_POOL = "loopline.concurrency.asyncio:TaskPool"


@dataclass(frozen=True)
class PoolChoice:
    """One pool ``loopline worker --pool`` offers, with the advice ``--help`` prints."""

    name: str
    celery_pool: str
    default_concurrency: int
    advice: str


POOLS: dict[str, PoolChoice] = {
    choice.name: choice
    for choice in (
        PoolChoice(
            "prefork", "prefork", os.cpu_count() or 1,
            "one OS process per slot. Isolation and real CPU parallelism; memory-heavy, so concurrency stays "
            "near the core count. Choose it for CPU-bound or crash-prone code.",
        ),
        PoolChoice(
            "threads", "threads", 32,
            "a thread pool in one process. Fine for blocking I/O libraries at tens to a few hundred slots; "
            "the GIL limits CPU work. No time limits: Celery's threads pool drops both.",
        ),
        PoolChoice(
            "gevent", "gevent", 500,
            "greenlets with monkey-patched sockets: hundreds to thousands of blocking-style requests "
            "(requests, redis-py) in flight in one process. Code that blocks without yielding stalls every slot. "
            "Hard time limit only.",
        ),
        PoolChoice(
            "asyncio", "custom", 1000,
            "loopline's pool: coroutines on one asyncio event loop (uvloop when installed). async def tasks and "
            "the built-in tasks' async bodies run -c at once; sync tasks go to a bounded thread pool. Soft and "
            "hard time limits (for async tasks), revoke and warm shutdown work per coroutine. The highest "
            "throughput per CPU for I/O.",
        ),
        PoolChoice(
            "solo", "solo", 1,
            "runs one task at a time in the worker process itself. For debugging and for strictly serial queues. "
            "No time limits.",
        ),
    )
}


def worker_command(
    pool: str,
    concurrency: int | None = None,
    *,
    app: str = APP,
    queues: Sequence[str] = (),
    loglevel: str = "INFO",
    hostname: str | None = None,
    autoscale: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The argv of ``celery worker`` for ``pool``.

    The pool goes through ``-P`` on the command line: ``celery.__main__.main`` calls
    ``maybe_patch_concurrency`` on argv, so gevent's monkey-patching runs before anything else imports
    ``socket`` or ``ssl``. Choosing gevent any later leaves half the process unpatched.
    """
    try:
        choice = POOLS[pool]
    except KeyError:
        raise ValueError(f"unknown pool {pool!r}; choose one of {', '.join(POOLS)}") from None
    slots = choice.default_concurrency if concurrency is None else concurrency
    if slots < 1:
        raise ValueError(f"concurrency must be at least 1, got {slots}")
    node = hostname or f"{pool}-{os.getpid()}@%h"
    argv = [sys.executable, "-m", "celery", "-A", app, "worker", "-P", choice.celery_pool, "-c", str(slots),
            "-n", node, "-E", "--loglevel", loglevel]
    if queues:
        argv += ["-Q", ",".join(queues)]
    if autoscale:
        argv += ["--autoscale", autoscale]
    return argv + list(extra)


def worker_env(pool: str) -> dict[str, str]:
    """Environment the worker needs for ``pool``: Celery finds a custom pool class through this variable."""
    return {"CELERY_CUSTOM_WORKER_POOL": ASYNCIO_POOL} if pool == "asyncio" else {}


def exec_worker(argv: list[str], env: dict[str, str] | None = None) -> NoReturn:
    """Replace this process with the worker, so signals (SIGTERM, SIGQUIT) reach Celery directly."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, {**os.environ, **(env or {})})
