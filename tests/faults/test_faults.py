"""Faults every pool must survive without losing a job, each run counted by the ledger (tests/ledger.py).

Each test has its own Redis (the broker; some faults restart it or cut it off) and records executions in
the session's Redis, which no fault touches. Visibility timeout 4 s and restore sweeps every 0.5 s make
redelivery a matter of seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from celery import Celery
from ledger import Fleet, Ledger, fault_env
from waiting import wait_until

from loopline.embedded_redis import EmbeddedRedis

POOLS = ["prefork", "threads", "gevent", "asyncio"]
CONCURRENCY = {"prefork": 2, "threads": 6, "gevent": 6, "asyncio": 6}
JOBS = 24
HOLD_S = 0.25
RESTART_HOLD_S = 1.0  # long enough that every slot is busy when Redis goes
SETTLE_TIMEOUT_S = 60.0
CHUNK_BYTES = 65536
SLOW_LIMITS = {"LOOPLINE_VISIBILITY_TIMEOUT_S": "30", "LOOPLINE_TASK_TIME_LIMIT_S": "20",
               "LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "15"}
# While Redis is away, storing a result retries with sleeps of up to 1 s; on the asyncio pool those run on
# the event loop thread and hold every coroutine (reported to the asyncio pool's owner), so a 2 s soft
# limit would fail jobs that merely waited. Redelivery of jobs whose ack was lost still takes seconds.
OUTAGE_LIMITS = {"LOOPLINE_VISIBILITY_TIMEOUT_S": "8", "LOOPLINE_TASK_TIME_LIMIT_S": "7",
                 "LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "6"}


class LoopbackProxy:
    """A TCP proxy on 127.0.0.1 in front of a Redis port, that can cut every connection or slow each chunk."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.delay_s = 0.0
        self._refuse_until = 0.0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False

    def __enter__(self) -> LoopbackProxy:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread; close() alone does not
        except OSError:
            pass
        self._listener.close()
        self.cut()
        for thread in self._threads:
            thread.join(5)

    def cut(self, refuse_s: float = 0.0) -> None:
        """Reset every open connection; refuse new ones for ``refuse_s``."""
        self._refuse_until = time.monotonic() + refuse_s
        with self._lock:
            doomed, self._sockets = self._sockets, set()
        for sock in doomed:
            _close(sock)

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)  # an idle connection (pub/sub) stays open, as it would without the proxy
            with self._lock:
                self._sockets.update((client, upstream))
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(CHUNK_BYTES):
                if self.delay_s:
                    time.sleep(self.delay_s)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(source)
            _close(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "broker")
    server.up()
    yield server
    server.down()


@pytest.fixture
def broker_url(private_redis: EmbeddedRedis) -> str:
    status = private_redis.status()
    assert status is not None
    return status.url


@pytest.fixture
def fleet(tmp_path: Path, broker_url: str, redis_url: str) -> Iterator[Fleet]:
    workers = Fleet(tmp_path, fault_env(broker_url, redis_url))
    yield workers
    workers.stop_all()


def _assert_nothing_lost(counts_lost: int, outside: int, log: str) -> None:
    assert counts_lost == 0, log[-3000:]
    assert outside == 0, "duplicates of jobs that were not in flight at the fault"


# -- 1. SIGTERM -----------------------------------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", POOLS)
def test_sigterm_mid_run_finishes_in_flight_jobs_and_loses_nothing(
    pool: str, fleet: Fleet, producer: Celery, broker: redis.Redis, ledger: Ledger, queue: str
) -> None:
    first = fleet.start(pool, CONCURRENCY[pool], queue)
    ledger.enqueue(producer, queue, JOBS, HOLD_S)
    ledger.wait_in_flight(30, done=4, running=2)
    in_flight = ledger.mark_fault()
    assert first.stop(grace_s=30, signum=signal.SIGTERM) == 0, first.log_text()[-3000:]
    # Warm shutdown: what was running when SIGTERM came finished in the stopping worker.
    assert in_flight <= set(ledger.done()), first.log_text()[-3000:]
    fleet.start(pool, CONCURRENCY[pool], queue)
    ledger.settle(broker, queue, SETTLE_TIMEOUT_S)
    counts = ledger.counts("SIGTERM", pool)
    _assert_nothing_lost(counts.lost, counts.duplicates_outside_fault, first.log_text())
    assert "Traceback" not in first.log_text()


# -- 2. SIGKILL of the whole worker ---------------------------------------------------------------------------

@pytest.mark.timeout(90)
@pytest.mark.parametrize("pool", POOLS)
def test_sigkill_of_the_worker_redelivers_within_the_visibility_timeout(
    pool: str, fleet: Fleet, producer: Celery, broker: redis.Redis, ledger: Ledger, queue: str
) -> None:
    first = fleet.start(pool, CONCURRENCY[pool], queue)
    ledger.enqueue(producer, queue, JOBS, HOLD_S)
    ledger.wait_in_flight(30, done=4, running=2)
    os.killpg(first.pid, signal.SIGKILL)  # the worker and its children, as the OOM killer or a lost host would
    killed_at = time.monotonic()
    # Marked after the kill: the dead worker changes nothing more, so this is exactly what it held. (Marked
    # before, the jobs running then could all finish before the kill and leave the mark empty.)
    in_flight = ledger.mark_fault()
    first.stop(grace_s=1)
    fleet.start(pool, CONCURRENCY[pool], queue)
    ledger.wait_done(SETTLE_TIMEOUT_S, ids=in_flight)
    redelivery_s = time.monotonic() - killed_at
    ledger.settle(broker, queue, SETTLE_TIMEOUT_S)
    counts = ledger.counts("SIGKILL worker", pool)
    print(f"jobs in flight at the kill were done again {redelivery_s:.1f} s later")
    _assert_nothing_lost(counts.lost, counts.duplicates_outside_fault, first.log_text())
    # Held by the dead worker: jobs running at the kill, and jobs whose body had finished but whose ack had
    # not gone out yet (at_fault has both; with short jobs the kill can find only the second kind).
    assert ledger.at_fault and counts.redelivered >= 1


# -- 3. SIGKILL of one prefork child --------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_sigkill_of_a_prefork_child_redelivers_its_job(
    fleet: Fleet, producer: Celery, broker: redis.Redis, ledger: Ledger, queue: str
) -> None:
    # billiard sometimes notices a killed child only at its 5 s maintain_pool tick; a hard time limit
    # shorter than that would fail the job as timed out (and ack it) before it could be redelivered.
    worker = fleet.start("prefork", 2, queue, **SLOW_LIMITS)
    ledger.enqueue(producer, queue, 6, 1.0)
    # Both children busy with a 1 s job: whichever is killed was running one.
    wait_until(lambda: len(ledger.started()) >= 2, 30, "two jobs started")
    ledger.mark_fault()
    victim = psutil.Process(worker.pid).children()[0]
    victim.kill()
    ledger.settle(broker, queue, SETTLE_TIMEOUT_S)
    counts = ledger.counts("SIGKILL prefork child", "prefork")
    _assert_nothing_lost(counts.lost, counts.duplicates_outside_fault, worker.log_text())
    assert counts.redelivered == 1
    assert worker.alive()
    assert worker.stop(grace_s=30, signum=signal.SIGTERM) == 0


# -- 4. Redis restarted ---------------------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", POOLS)
def test_redis_restart_mid_run_workers_reconnect_and_run_every_job_once(
    pool: str, fleet: Fleet, producer: Celery, broker: redis.Redis, ledger: Ledger, queue: str,
    private_redis: EmbeddedRedis,
) -> None:
    worker = fleet.start(pool, CONCURRENCY[pool], queue, **OUTAGE_LIMITS)
    ledger.enqueue(producer, queue, JOBS, RESTART_HOLD_S)
    # Jobs running when Redis goes: they finish during the outage or just after it, so their acks are
    # made while the connection is broken, or on the channel of the connection that broke.
    ledger.wait_in_flight(30, done=2, running=CONCURRENCY[pool])
    down_at = time.time()
    ledger.mark_fault()
    restart = threading.Thread(target=private_redis.restart)
    restart.start()
    while restart.is_alive():  # the producer keeps sending through the restart: each send succeeds or raises
        ledger.enqueue(producer, queue, 1, HOLD_S)
        time.sleep(0.05)
    restart.join()
    ledger.mark_fault(since=down_at)
    ledger.enqueue(producer, queue, JOBS // 2, HOLD_S)  # after the restart, the worker must still consume
    # Quiet means nothing left in the queue or in ``unacked``: an ack that was lost leaves its entry there
    # until the visibility sweep (8 s) queues the job again, so settling waits past that re-run.
    ledger.settle(broker, queue, SETTLE_TIMEOUT_S)
    counts = ledger.counts("Redis restart", pool)
    assert counts.lost == 0, worker.log_text()[-3000:]
    # Every job that reached its end ran once: an ack made during the outage is applied after the reconnect.
    assert counts.duplicated == 0, worker.log_text()[-3000:]
    assert "Unrecoverable error" not in worker.log_text()
    assert worker.stop(grace_s=30, signum=signal.SIGTERM) == 0, worker.log_text()[-3000:]


# -- 5. connection cut, then slowed ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", POOLS)
def test_cut_and_slow_connection_to_redis_loses_nothing(
    pool: str, tmp_path: Path, broker_url: str, redis_url: str, producer: Celery, broker: redis.Redis,
    ledger: Ledger, queue: str,
) -> None:
    port = int(broker_url.rsplit(":", 1)[1].split("/")[0])
    with LoopbackProxy(port) as proxy:
        fleet = Fleet(tmp_path, fault_env(f"redis://127.0.0.1:{proxy.port}/0", redis_url))
        try:
            worker = fleet.start(pool, CONCURRENCY[pool], queue, **OUTAGE_LIMITS)
            ledger.enqueue(producer, queue, JOBS, HOLD_S)
            ledger.wait_in_flight(30, done=4, running=2)
            cut_at = time.time()
            ledger.mark_fault()
            proxy.cut(refuse_s=2.0)  # every connection reset, new ones refused for 2 s
            time.sleep(2.0)
            ledger.mark_fault(since=cut_at)
            ledger.wait_done(SETTLE_TIMEOUT_S)
            proxy.delay_s = 0.01  # then every chunk each way waits 10 ms
            ledger.enqueue(producer, queue, JOBS // 4, HOLD_S)
            ledger.settle(broker, queue, SETTLE_TIMEOUT_S)
            proxy.delay_s = 0.0
            counts = ledger.counts("connection cut + slowed", pool)
            _assert_nothing_lost(counts.lost, counts.duplicates_outside_fault, worker.log_text())
            assert worker.stop(grace_s=30, signum=signal.SIGTERM) == 0, worker.log_text()[-3000:]
        finally:
            fleet.stop_all()
