"""A job ledger for fault tests, counted the way Jepsen's queue checker counts.

The test enqueues N ``ledger.job`` messages whose task ids are the job ids; each execution records
itself in a Redis that the fault does not touch (``LOOPLINE_LEDGER_URL``, the session's Redis). Once the
broker is quiet (the queue and kombu's ``unacked`` hash are empty) every id is classified: done once,
duplicated (done more than once), or lost (never done). Workers import the task with
``CELERY_WORKER_INCLUDE=ledger`` and this directory on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis
from celery import Celery, Task
from waiting import wait_until

from config.celery_app import app
from loopline.bench.procs import Child, start_worker

__all__ = ["Counts", "Fleet", "Ledger", "fault_env", "job", "producer_app"]

# A job whose done-record was written this long before a fault may still have been waiting for its ack.
ACK_WINDOW_S = 2.0
VISIBILITY_TIMEOUT_S = 4
RESTORE_INTERVAL_S = 0.5
READY_TIMEOUT_S = 60.0
TESTS_DIR = Path(__file__).resolve().parent
_clients: dict[int, redis.Redis] = {}


def _store() -> redis.Redis:
    client = _clients.get(os.getpid())
    if client is None:
        url = os.environ.get("LOOPLINE_LEDGER_URL") or os.environ["LOOPLINE_BROKER_URL"]
        client = _clients[os.getpid()] = redis.Redis.from_url(url, socket_timeout=10)
    return client


def _started(run: str, job_id: str, poison: bool) -> None:
    _store().hincrby(f"ledger:{run}:started", job_id, 1)
    if poison:
        os.kill(os.getpid(), signal.SIGKILL)  # the process running the body: a prefork child, else the worker


def _done(run: str, job_id: str) -> str:
    with _store().pipeline(transaction=True) as pipe:
        pipe.hincrby(f"ledger:{run}:done", job_id, 1)
        pipe.hset(f"ledger:{run}:done_at", job_id, time.time())
        pipe.execute()
    return job_id


async def _job_async(self: Task, run: str, job_id: str, hold_s: float, poison: bool = False) -> str:
    _started(run, job_id, poison)
    await asyncio.sleep(hold_s)
    return _done(run, job_id)


@app.task(bind=True, name="ledger.job", async_body=_job_async)
def job(self: Task, run: str, job_id: str, hold_s: float, poison: bool = False) -> str:
    """Record a start, hold for ``hold_s`` (or kill the process when ``poison``), record the finish."""
    _started(run, job_id, poison)
    time.sleep(hold_s)
    return _done(run, job_id)


def producer_app(broker_url: str) -> Celery:
    """A producer-only app for a broker other than the session's, configured like ``config.celery_app``.

    Its result backend is disabled, so that sending does not subscribe to results (an AsyncResult would
    otherwise unsubscribe when collected, from a Redis that may be gone by then); workers still store them.
    """
    producer = Celery("ledger-producer", broker=broker_url, backend="disabled://", set_as_current=False)
    producer.conf.update({key: app.conf[key] for key in (
        "task_serializer", "accept_content", "result_serializer", "result_accept_content", "broker_transport",
        "broker_transport_options", "task_publish_retry_policy",
    )})
    return producer


@dataclass(frozen=True)
class Counts:
    """The ledger's verdict for one run."""

    fault: str
    pool: str
    enqueued: int
    done_once: int
    duplicated: int
    lost: int
    refused: int  # sends that failed loudly at the producer: never enqueued, so neither done nor lost
    redelivered: int  # jobs started more than once (at-least-once at work)
    dead_lettered: int
    duplicates_outside_fault: int  # duplicates of jobs that were not in flight at the fault: must be 0

    def line(self) -> str:
        return (f"LEDGER fault={self.fault} pool={self.pool} enqueued={self.enqueued} done_once={self.done_once} "
                f"duplicated={self.duplicated} lost={self.lost} refused={self.refused} "
                f"redelivered={self.redelivered} dead_lettered={self.dead_lettered}")


@dataclass
class Ledger:
    """The ids of one run, what the producer managed to enqueue, and what the workers recorded."""

    client: redis.Redis
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    enqueued: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    poison: set[str] = field(default_factory=set)
    at_fault: set[str] | None = None

    def enqueue(self, producer: Celery, queue: str, n: int, hold_s: float, *, poison: bool = False) -> list[str]:
        """Send ``n`` jobs; a send that raises is counted as refused (the producer failed loudly)."""
        sent = []
        for _ in range(n):
            job_id = f"{self.run}-{len(self.enqueued) + len(self.refused):04d}"
            try:
                producer.send_task("ledger.job", (self.run, job_id, hold_s, poison), task_id=job_id, queue=queue)
            except Exception as exc:  # noqa: BLE001 - kombu's OperationalError, or redis-py's own errors
                self.refused[job_id] = repr(exc)
                continue
            self.enqueued.append(job_id)
            sent.append(job_id)
            if poison:
                self.poison.add(job_id)
        return sent

    def _counts(self, what: str) -> dict[str, int]:
        raw = self.client.hgetall(f"ledger:{self.run}:{what}")
        return {key.decode(): int(value) for key, value in raw.items()}

    def started(self) -> dict[str, int]:
        return self._counts("started")

    def done(self) -> dict[str, int]:
        return self._counts("done")

    def mark_fault(self, since: float | None = None) -> set[str]:
        """Add the jobs in flight now to those at the fault: started and not done, or done since the fault
        began (``since``, a time.time(); default now) or within ACK_WINDOW_S before, so maybe not yet acked.

        Call it when the fault strikes, and for a fault that lasts (Redis down, connection cut) again
        when it ends, with ``since`` the time it began. Returns the jobs in flight now.
        """
        started, done = self.started(), self.done()
        horizon = (time.time() if since is None else since) - ACK_WINDOW_S
        done_at = self.client.hgetall(f"ledger:{self.run}:done_at")
        recent = {key.decode() for key, value in done_at.items() if float(value) >= horizon}
        running = {i for i in started if i not in done}
        self.at_fault = (self.at_fault or set()) | running | recent
        return running

    def wait_done(self, timeout_s: float, ids: Iterable[str] | None = None, at_least: int | None = None) -> None:
        """Wait until ``at_least`` of ``ids`` (default: every non-poison enqueued job) are done."""
        wanted = set(self.enqueued) - self.poison if ids is None else set(ids)
        need = len(wanted) if at_least is None else at_least
        deadline = time.monotonic() + timeout_s
        while len(wanted & set(self.done())) < need:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(wanted & set(self.done()))} of {need} jobs done after {timeout_s} s")
            time.sleep(0.05)

    def wait_in_flight(self, timeout_s: float, *, done: int, running: int) -> None:
        """Wait until at least ``done`` jobs finished and ``running`` others are started but not finished."""
        def ready() -> bool:
            finished = set(self.done())
            return len(finished) >= done and len(set(self.started()) - finished) >= running

        wait_until(ready, timeout_s, f"{done} jobs done and {running} running")

    def settle(self, broker: redis.Redis, queue: str, timeout_s: float) -> None:
        """Wait until every job is done and the broker holds nothing that could run one again."""
        self.wait_done(timeout_s)
        deadline = time.monotonic() + timeout_s
        while broker.llen(queue) or broker.hlen("unacked"):
            if time.monotonic() > deadline:
                raise AssertionError(f"broker not quiet after {timeout_s} s: {broker.llen(queue)} queued, "
                                     f"{broker.hlen('unacked')} unacked")
            time.sleep(0.1)

    def counts(self, fault: str, pool: str, dead_lettered: Iterable[str] = ()) -> Counts:
        done, started = self.done(), self.started()
        regular = [i for i in self.enqueued if i not in self.poison]
        duplicated = {i for i in regular if done.get(i, 0) > 1}
        counts = Counts(
            fault=fault, pool=pool, enqueued=len(self.enqueued),
            done_once=sum(1 for i in regular if done.get(i, 0) == 1), duplicated=len(duplicated),
            lost=sum(1 for i in regular if done.get(i, 0) == 0), refused=len(self.refused),
            redelivered=sum(1 for i in self.enqueued if started.get(i, 0) > 1),
            dead_lettered=len(set(dead_lettered) & set(self.enqueued)),
            duplicates_outside_fault=len(duplicated - (self.at_fault or set())),
        )
        print(counts.line())
        return counts

    def forget(self) -> None:
        self.client.delete(*(f"ledger:{self.run}:{what}" for what in ("started", "done", "done_at")))


class Fleet:
    """The workers of one test: started with the fault settings, every one stopped at the end."""

    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir, self.env = log_dir, env
        self.children: list[Child] = []

    def start(self, pool: str, concurrency: int, queue: str, *, wait: bool = True, **env: str) -> Child:
        log_path = self.log_dir / f"{pool}-{len(self.children)}.log"
        child = start_worker(pool, concurrency, queues=[queue], log_path=log_path, env={**self.env, **env})
        self.children.append(child)
        if wait:
            wait_until(lambda: " ready." in child.log_text() or not child.alive(), READY_TIMEOUT_S,
                       f"{child.name} ready")
            assert " ready." in child.log_text(), f"{child.name} exited at start-up:\n{child.log_text()[-3000:]}"
        return child

    def stop_all(self) -> None:
        for child in self.children:
            child.stop(grace_s=20)




def fault_env(broker_url: str, ledger_url: str, **extra: str) -> dict[str, str]:
    """Worker settings that make redelivery take seconds: short visibility timeout, fast restore sweeps."""
    return {
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        "CELERY_WORKER_INCLUDE": "ledger",
        "CELERY_WORKER_WITHOUT_MINGLE": "1",
        "CELERY_WORKER_WITHOUT_GOSSIP": "1",
        "LOOPLINE_BROKER_URL": broker_url,
        "LOOPLINE_RESULT_BACKEND": "",
        "LOOPLINE_LEDGER_URL": ledger_url,
        "LOOPLINE_VISIBILITY_TIMEOUT_S": str(VISIBILITY_TIMEOUT_S),
        "LOOPLINE_TASK_TIME_LIMIT_S": str(VISIBILITY_TIMEOUT_S - 1),
        "LOOPLINE_TASK_SOFT_TIME_LIMIT_S": str(VISIBILITY_TIMEOUT_S - 2),
        "LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "1",
        "LOOPLINE_RESTORE_INTERVAL_S": str(RESTORE_INTERVAL_S),
        "LOOPLINE_REDIS_SOCKET_TIMEOUT_S": "3",
        "LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S": "10",
        **extra,
    }
