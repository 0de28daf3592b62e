"""The asyncio pool end to end: real workers, the session's Redis, the local HTTP target.

Test-only tasks live in ``tests/async_tasks.py``; a worker imports them through ``CELERY_WORKER_INCLUDE``
(see that module), so ``loopline worker`` is started exactly as a user would start it.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import async_tasks
import pytest
import redis
from celery.exceptions import TimeLimitExceeded
from waiting import wait_for_log, wait_until

from config.celery_app import app
from loopline.bench.procs import Child, spawn
from loopline.concurrency.asyncio import GC_THRESHOLDS, TaskPool
from loopline.worker.launcher import ASYNCIO_POOL
from tasks import fetch_url, io_sleep

TESTS_DIR = Path(__file__).resolve().parents[1]
INCLUDE_ENV = {
    # tests/ for async_tasks; the repository root so that a worker started from elsewhere finds the project.
    "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", ""))
                                  if p),
    "CELERY_WORKER_INCLUDE": "async_tasks",
}
RESULT_TIMEOUT_S = 30
# A job at a gate waits up to async_tasks.GATE_TIMEOUT_S for the rest of its group.
GATE_RESULT_TIMEOUT_S = async_tasks.GATE_TIMEOUT_S + RESULT_TIMEOUT_S
READY_TIMEOUT_S = 60




def _node(child: Child) -> str:
    match = re.search(r"(\S+@\S+) ready\.", wait_for_log(child, " ready."))
    assert match is not None
    return match.group(1)




def _runs(key: str) -> int:
    """How many times a marked_sleep with this key has started its body."""
    return int(async_tasks.store().get(key) or 0)


def _key() -> str:
    return f"ran:{uuid.uuid4().hex}"


def _active(node: str) -> list[dict[str, Any]]:
    return (app.control.inspect(destination=[node], timeout=5).active() or {}).get(node, [])


def _async(pool: str, concurrency: int, worker: Callable[..., Child], **env: str) -> Child:
    return worker(pool, concurrency, env={**INCLUDE_ENV, **env})


@pytest.fixture
def stock_worker(tmp_path: Path, queue: str) -> Iterator[Callable[[int], Child]]:
    """``celery -A config.celery_app worker -P custom`` with CELERY_CUSTOM_WORKER_POOL: no loopline CLI."""
    started: list[Child] = []

    def start(concurrency: int) -> Child:
        argv = [sys.executable, "-m", "celery", "-A", "config.celery_app", "worker", "-P", "custom",
                "-c", str(concurrency), "-Q", queue, "-E", "-n", f"stock-{uuid.uuid4().hex[:8]}@%h",
                "--loglevel", "INFO", "--include", "async_tasks"]
        env = {"PYTHONPATH": INCLUDE_ENV["PYTHONPATH"], "CELERY_CUSTOM_WORKER_POOL": ASYNCIO_POOL}
        child = spawn("stock celery worker", argv, tmp_path / f"stock-{len(started)}.log", env)
        started.append(child)
        wait_for_log(child, " ready.")
        return child

    yield start
    for child in started:
        child.stop(grace_s=20)


# -- concurrency ----------------------------------------------------------------------------------------------

def test_200_jobs_are_in_flight_at_once_on_200_slots(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 200, worker)
    key = _key()
    # Each job waits at a gate that opens only once all 200 are in flight together, however slow the machine.
    results = [async_tasks.gather.apply_async((key, 200), queue=queue) for _ in range(200)]
    assert sorted(r.get(timeout=GATE_RESULT_TIMEOUT_S) for r in results) == list(range(1, 201))


def test_stock_celery_command_runs_the_pool(stock_worker: Callable[[int], Child], queue: str, target_url: str) -> None:
    child = stock_worker(50)
    results = [fetch_url.apply_async((f"{target_url}/job?bytes=100",), queue=queue) for _ in range(40)]
    pages = [r.get(timeout=RESULT_TIMEOUT_S) for r in results]
    assert all(page["status"] == 200 and page["bytes"] == 100 for page in pages)
    key = _key()
    gathered = [async_tasks.gather.apply_async((key, 40), queue=queue) for _ in range(40)]
    assert sorted(r.get(timeout=GATE_RESULT_TIMEOUT_S) for r in gathered) == list(range(1, 41))
    assert "asyncio pool: 50 slots" in child.log_text()
    assert child.stop(grace_s=20) == 0


def test_sync_tasks_run_on_threads_and_leave_the_loop_free(
    worker: Callable[..., Child], queue: str, redis_client: redis.Redis
) -> None:
    _async("asyncio", 60, worker)
    key = _key()
    # Four sync jobs block in their threads at a gate for five: it opens only when the test arrives too.
    blocked = [async_tasks.sync_gather.apply_async((key, 5), queue=queue) for _ in range(4)]
    wait_until(lambda: _runs(key) == 4, RESULT_TIMEOUT_S, "all 4 sync jobs in flight at once")
    sleeps = [io_sleep.apply_async((100,), queue=queue) for _ in range(50)]
    assert all(r.get(timeout=RESULT_TIMEOUT_S)["slept_ms"] == 100 for r in sleeps)
    assert not any(r.ready() for r in blocked)  # the loop ran all 50 while every sync job still held its thread
    redis_client.incr(key)
    async_tasks.open_gate(redis_client, key, 5)
    assert sorted(r.get(timeout=RESULT_TIMEOUT_S) for r in blocked) == [1, 2, 3, 4]


def test_each_coroutine_sees_its_own_request(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 100, worker)
    _assert_each_sees_its_own_request(queue, 100)


def _assert_each_sees_its_own_request(queue: str, count: int) -> None:
    """``count`` context probes, all in flight at once, each see their own request after every await."""
    key = _key()
    results = [async_tasks.context_probe.apply_async((n, key, count), queue=queue) for n in range(count)]
    for n, result in enumerate(results):
        expected = {"id": result.id, "retries": 0, "args": [n, key, count], "current_id": result.id}
        assert result.get(timeout=GATE_RESULT_TIMEOUT_S) == [expected] * 4


# -- retries and time limits ----------------------------------------------------------------------------------

def test_self_retry_in_an_async_task(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 4, worker)
    result = async_tasks.retry_twice.apply_async(queue=queue)
    assert result.get(timeout=RESULT_TIMEOUT_S) == {"retries": 2, "id": result.id}


def test_autoretry_for_an_async_task(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 4, worker)
    key = _key()
    result = async_tasks.always_value_error.apply_async((key,), queue=queue)
    with pytest.raises(ValueError, match="attempt failed"):
        result.get(timeout=RESULT_TIMEOUT_S)
    assert result.state == "FAILURE"
    assert _runs(key) == 3


def test_soft_limit_is_raised_at_the_await_and_can_be_handled(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 4, worker)
    assert async_tasks.soft_cleanup.apply_async(queue=queue).get(timeout=RESULT_TIMEOUT_S) == "cleaned up"


def test_hard_limit_fails_the_task_and_the_worker_keeps_serving(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 4, worker)
    result = async_tasks.hard_sleep.apply_async(queue=queue)
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=RESULT_TIMEOUT_S)
    assert result.state == "FAILURE"
    assert async_tasks.marked_sleep.apply_async((0.01,), queue=queue).get(timeout=RESULT_TIMEOUT_S)


# -- revoke ---------------------------------------------------------------------------------------------------

def test_revoke_terminate_cancels_a_running_coroutine(worker: Callable[..., Child], queue: str) -> None:
    _async("asyncio", 4, worker)
    key = _key()
    result = async_tasks.marked_sleep.apply_async((30, key), queue=queue)
    wait_until(lambda: _runs(key) == 1, 15, "started")
    app.control.revoke(result.id, terminate=True)
    wait_until(lambda: result.state == "REVOKED", 5, "revoked")
    assert async_tasks.marked_sleep.apply_async((0.01,), queue=queue).get(timeout=RESULT_TIMEOUT_S)
    assert result.state == "REVOKED"  # the cancelled tracer did not overwrite it


def test_task_revoked_while_waiting_for_a_slot_never_runs(worker: Callable[..., Child], queue: str) -> None:
    # Prefetch two per slot (through click's CELERY_WORKER_* variables), so a message waits inside the pool.
    child = _async("asyncio", 1, worker, CELERY_WORKER_PREFETCH_MULTIPLIER="2")
    first_key, second_key = _key(), _key()
    first = async_tasks.marked_sleep.apply_async((2, first_key), queue=queue)
    wait_until(lambda: _runs(first_key) == 1, 15, "started")
    second = async_tasks.marked_sleep.apply_async((0.01, second_key), queue=queue)
    wait_for_log(child, f"[{second.id}] received", timeout_s=5)  # handed to the pool, waiting for the slot
    app.control.revoke(second.id)
    assert first.get(timeout=RESULT_TIMEOUT_S)
    assert async_tasks.marked_sleep.apply_async((0.01,), queue=queue).get(timeout=RESULT_TIMEOUT_S)
    assert second.state == "REVOKED"
    assert (_runs(first_key), _runs(second_key)) == (1, 0)


def test_revoke_terminate_of_a_job_waiting_for_a_slot_settles_it_at_once(
    worker: Callable[..., Child], queue: str,
) -> None:
    child = _async("asyncio", 1, worker, CELERY_WORKER_PREFETCH_MULTIPLIER="2")
    node = _node(child)
    first_key, second_key = _key(), _key()
    first = async_tasks.marked_sleep.apply_async((60, first_key), queue=queue)
    wait_until(lambda: _runs(first_key) == 1, 15, "started")
    second = async_tasks.marked_sleep.apply_async((0.01, second_key), queue=queue)
    wait_for_log(child, f"[{second.id}] received", timeout_s=5)  # handed to the pool, waiting for the slot
    app.control.revoke(second.id, terminate=True)
    # While the only slot is still busy: REVOKED, acked, and no longer reserved by the worker.
    wait_until(lambda: second.state == "REVOKED", 10, "revoked while the slot is busy")
    reserved = (app.control.inspect(destination=[node], timeout=5).reserved() or {}).get(node, [])
    assert second.id not in {task["id"] for task in reserved}
    assert _runs(first_key) == 1 and not first.ready()
    app.control.revoke(first.id, terminate=True)
    wait_until(lambda: first.state == "REVOKED", 10, "the running job revoked")
    assert async_tasks.marked_sleep.apply_async((0.01,), queue=queue).get(timeout=RESULT_TIMEOUT_S)
    assert (_runs(first_key), _runs(second_key)) == (1, 0)
    assert "Traceback" not in child.log_text()


# -- shutdown -------------------------------------------------------------------------------------------------

def test_sigterm_lets_running_tasks_finish(worker: Callable[..., Child], queue: str) -> None:
    child = worker("asyncio", 10)
    node = _node(child)
    results = [io_sleep.apply_async((1500,), queue=queue) for _ in range(5)]
    wait_until(lambda: len(_active(node)) == 5, 15, "5 running")
    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0
    assert [r.state for r in results] == ["SUCCESS"] * 5
    log = child.log_text()
    assert "Traceback" not in log
    assert "Task was destroyed but it is pending" not in log  # the pool's own loop tasks are stopped too


@pytest.mark.timeout(90)
def test_shutdown_grace_cancels_the_rest_and_they_are_redelivered(worker: Callable[..., Child], queue: str) -> None:
    first = _async("asyncio", 10, worker, LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S="1")
    keys = [_key() for _ in range(3)]
    results = [async_tasks.marked_sleep.apply_async((10, key), queue=queue) for key in keys]
    wait_until(lambda: [_runs(key) for key in keys] == [1, 1, 1], 15, "all 3 started")
    assert first.stop(grace_s=30, signum=signal.SIGTERM) == 0
    assert "cancelling 3 unfinished tasks" in first.log_text()
    assert not any(r.ready() for r in results)  # cancelled after the 1 s grace, before the 10 s sleeps ended

    _async("asyncio", 10, worker)
    for result in results:
        assert result.get(timeout=RESULT_TIMEOUT_S)
    assert [_runs(key) for key in keys] == [2, 2, 2]  # cancelled on the first worker, run again on the second


@pytest.mark.timeout(90)
def test_a_job_waiting_for_a_slot_goes_back_at_a_warm_shutdown_instead_of_running(
    worker: Callable[..., Child], queue: str
) -> None:
    first = _async("asyncio", 1, worker)  # one slot and, with two messages per slot, one job waiting for it
    keys = [_key() for _ in range(3)]
    results = [async_tasks.marked_sleep.apply_async((1.5, key), queue=queue) for key in keys]
    wait_until(lambda: _runs(keys[0]) == 1, 15, "the first job started")
    wait_for_log(first, results[1].id)  # received: it waits for the slot
    assert first.stop(grace_s=30, signum=signal.SIGTERM) == 0, first.log_text()[-3000:]
    assert results[0].ready() and [_runs(key) for key in keys] == [1, 0, 0]
    assert "1 jobs that had not started go back to the queue" in first.log_text()

    _async("asyncio", 2, worker)
    for result in results:
        assert result.get(timeout=RESULT_TIMEOUT_S)
    assert [_runs(key) for key in keys] == [1, 1, 1]


@pytest.mark.timeout(120)
def test_sigquit_is_a_cold_shutdown_that_cancels_at_once_and_the_jobs_are_redelivered(
    worker: Callable[..., Child], queue: str
) -> None:
    # With a 600 s grace, a warm shutdown would let the 15 s sleeps finish; a cold one cancels them unacked.
    first = _async("asyncio", 2, worker, LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S="600")
    keys = [_key() for _ in range(2)]
    results = [async_tasks.marked_sleep.apply_async((15, key), queue=queue) for key in keys]
    wait_until(lambda: [_runs(key) for key in keys] == [1, 1], 15, "both started")
    code = first.stop(grace_s=30, signum=signal.SIGQUIT)
    log = first.log_text()
    assert code in (0, 1), log[-3000:]  # it exited by itself (Celery's cold shutdown), not killed by stop()
    assert "Restoring 2 unacknowledged message(s)" in log  # kombu, as the channel closes: both went back
    assert not any(result.state == "SUCCESS" for result in results)

    _async("asyncio", 2, worker)
    for result in results:
        assert result.get(timeout=60)
    assert [_runs(key) for key in keys] == [2, 2]


@pytest.mark.timeout(120)
def test_sigquit_during_a_warm_shutdowns_grace_cancels_at_once(worker: Callable[..., Child], queue: str) -> None:
    first = _async("asyncio", 2, worker, LOOPLINE_ASYNCIO_SHUTDOWN_GRACE_S="600")
    keys = [_key() for _ in range(2)]
    results = [async_tasks.marked_sleep.apply_async((20, key), queue=queue) for key in keys]
    wait_until(lambda: [_runs(key) for key in keys] == [1, 1], 15, "both started")
    os.kill(first.pid, signal.SIGTERM)
    wait_for_log(first, "waiting up to 600 s for 2 running tasks", timeout_s=15)
    code = first.stop(grace_s=30, signum=signal.SIGQUIT)  # the warm shutdown would wait for the 20 s sleeps
    log = first.log_text()
    assert code in (0, 1), log[-3000:]
    assert not any(result.state == "SUCCESS" for result in results), log[-3000:]
    assert "Traceback" not in log and "did not complete cleanly" not in log, log[-3000:]

    _async("asyncio", 2, worker)
    for result in results:
        assert result.get(timeout=60)
    assert [_runs(key) for key in keys] == [2, 2]


# -- control and monitoring -----------------------------------------------------------------------------------

def _stats(node: str) -> dict[str, Any]:
    replies = app.control.inspect(destination=[node], timeout=5).stats() or {}
    return replies[node]["pool"]  # type: ignore[no-any-return]


def test_inspect_shows_pool_stats_and_active_coroutines(worker: Callable[..., Child], queue: str) -> None:
    node = _node(_async("asyncio", 7, worker))
    key = _key()
    result = async_tasks.marked_sleep.apply_async((3, key), queue=queue)
    wait_until(lambda: _runs(key) == 1, 15, "started")
    pool = _stats(node)
    assert pool["implementation"] == ASYNCIO_POOL
    assert pool["max-concurrency"] == 7
    assert pool["in-flight"] == 1
    assert pool["sync-threads"] == 16
    assert isinstance(pool["loop-lag-ms"], int | float) and pool["loop-lag-ms"] >= 0
    assert [(task["id"], task["name"]) for task in _active(node)] == [(result.id, "async_tasks.marked_sleep")]
    assert result.get(timeout=RESULT_TIMEOUT_S)


def test_a_blocking_step_is_logged_with_the_task_name(worker: Callable[..., Child], queue: str) -> None:
    child = _async("asyncio", 4, worker)
    result = async_tasks.blocker.apply_async(queue=queue)
    assert result.get(timeout=RESULT_TIMEOUT_S) == "blocked"
    wait_for_log(child, f"async_tasks.blocker[{result.id}] blocked the event loop for", timeout_s=5)


def test_pool_grow_and_shrink_change_the_slots(worker: Callable[..., Child], queue: str) -> None:
    node = _node(_async("asyncio", 1, worker))
    app.control.pool_grow(4, destination=[node], reply=True, timeout=5)
    assert _stats(node)["max-concurrency"] == 5
    key = _key()
    results = [async_tasks.gather.apply_async((key, 5), queue=queue) for _ in range(5)]
    assert sorted(r.get(timeout=GATE_RESULT_TIMEOUT_S) for r in results) == [1, 2, 3, 4, 5]
    app.control.pool_shrink(3, destination=[node], reply=True, timeout=5)
    assert _stats(node)["max-concurrency"] == 2


def test_consecutive_resizes_add_up_before_the_loop_applies_them() -> None:
    """grow/shrink run on the consumer thread; the loop thread applies each later. No worker needed."""
    pool = TaskPool(limit=3, app=app)
    try:
        pool.grow(2)
        pool.grow(2)
        assert pool.num_processes == 7  # what the consumer reads to resize its prefetch
        pool.shrink(10)
        assert pool.num_processes == 1
    finally:
        pool.loop.close()
        pool.executor.shutdown()


def test_a_celery_callback_that_raises_is_logged_with_the_task(caplog: pytest.LogCaptureFixture) -> None:
    """In process, no worker: the pool runs a target for an async task name and hands its result to a callback."""
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    called = threading.Event()

    def on_success(result: Any) -> None:
        called.set()
        raise RuntimeError(f"on_success broke on {result}")

    try:
        with caplog.at_level(logging.ERROR, logger="loopline.concurrency.asyncio"):
            pool.on_apply(lambda *args: 42, args=("async_tasks.marked_sleep", "job-1"), callback=on_success)
            assert called.wait(10)
            wait_until(lambda: any("finished, but Celery's on_success failed" in r.getMessage()
                                    for r in caplog.records), 5, "the failure logged")
    finally:
        pool.on_stop()
    record = next(r for r in caplog.records if "on_success failed" in r.getMessage())
    assert "async_tasks.marked_sleep[job-1]" in record.getMessage()
    assert record.exc_info is not None and "on_success broke on 42" in str(record.exc_info[1])



def test_the_pool_tunes_the_collector_while_it_runs_and_restores_it_when_it_stops() -> None:
    """In process: start-up objects frozen out of collections and higher thresholds; the stop restores the
    thresholds and leaves the frozen objects frozen (see tests/concurrency/test_process_tuning.py)."""
    before = gc.get_threshold()
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    try:
        assert gc.get_threshold() == GC_THRESHOLDS
        frozen = gc.get_freeze_count()
        assert frozen > 0
    finally:
        pool.on_stop()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() >= frozen

# -- async def tasks under every pool -------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent", "solo", "asyncio"])
def test_async_task_runs_under_every_pool(
    pool: str, worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    concurrency = {"solo": 1, "prefork": 2}.get(pool, 20)
    _async(pool, concurrency, worker)
    result = async_tasks.async_fetch.apply_async((f"{target_url}/job?bytes=10",), queue=queue)
    assert result.get(timeout=RESULT_TIMEOUT_S)["status"] == 200
    if concurrency == 20:
        # The bridge waits without blocking the pool: 20 coroutines are all in flight together.
        key = _key()
        results = [async_tasks.gather.apply_async((key, 20), queue=queue) for _ in range(20)]
        assert sorted(r.get(timeout=GATE_RESULT_TIMEOUT_S) for r in results) == list(range(1, 21))


@pytest.mark.parametrize(("pool", "concurrency"),
                         [("prefork", 3), ("threads", 20), ("gevent", 20), ("solo", 1), ("asyncio", 20)])
def test_self_request_and_current_task_are_right_after_every_await_under_every_pool(
    pool: str, concurrency: int, worker: Callable[..., Child], queue: str
) -> None:
    _async(pool, concurrency, worker)
    _assert_each_sees_its_own_request(queue, concurrency)


# -- time limits a task sets for itself -----------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["prefork", "asyncio"])
def test_a_task_with_only_a_hard_limit_is_stopped_by_it(pool: str, worker: Callable[..., Child], queue: str) -> None:
    _async(pool, 2, worker)
    result = async_tasks.hard_limit_only.apply_async(queue=queue)  # no ValueError from a default soft limit
    with pytest.raises(TimeLimitExceeded):
        result.get(timeout=RESULT_TIMEOUT_S)
    assert async_tasks.marked_sleep.apply_async((0.01,), queue=queue).get(timeout=RESULT_TIMEOUT_S)


@pytest.mark.parametrize("pool", ["prefork", "asyncio"])
def test_a_task_with_only_a_soft_limit_is_not_cut_by_the_default_hard_limit(
    pool: str, worker: Callable[..., Child], queue: str
) -> None:
    # The worker's defaults: hard 2 s, soft 1 s. The task's own soft limit of 400 s is the only one that applies.
    _async(pool, 2, worker, LOOPLINE_TASK_TIME_LIMIT_S="2", LOOPLINE_TASK_SOFT_TIME_LIMIT_S="1")
    assert async_tasks.soft_limit_only.apply_async((3,), queue=queue).get(timeout=RESULT_TIMEOUT_S) == "done"


def test_events_for_async_tasks_are_what_flower_shows(worker: Callable[..., Child], queue: str) -> None:
    """received/started/succeeded/failed/retried/revoked events, read the way Flower reads them."""
    import threading

    seen: dict[str, set[str]] = {}

    def record(event: dict[str, Any]) -> None:
        seen.setdefault(event.get("uuid", ""), set()).add(event["type"])

    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": record})
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=True), daemon=True)
        thread.start()
        # The receiver binds its queue while the worker boots (seconds), before any task event is sent.
        child = _async("asyncio", 10, worker)
        node = _node(child)
        ok = io_sleep.apply_async((10,), queue=queue)
        retried = async_tasks.retry_twice.apply_async(queue=queue)
        failed = async_tasks.always_value_error.apply_async((_key(),), queue=queue)
        revoked = async_tasks.marked_sleep.apply_async((30, _key()), queue=queue)
        ok.get(timeout=RESULT_TIMEOUT_S)
        retried.get(timeout=RESULT_TIMEOUT_S)
        with pytest.raises(ValueError):
            failed.get(timeout=RESULT_TIMEOUT_S)
        wait_until(lambda: any(t["id"] == revoked.id for t in _active(node)), 15, "the long task running")
        app.control.revoke(revoked.id, terminate=True)

        def complete() -> bool:
            return (
                {"task-received", "task-started", "task-succeeded"} <= seen.get(ok.id, set())
                and "task-retried" in seen.get(retried.id, set())
                and "task-failed" in seen.get(failed.id, set())
                and "task-revoked" in seen.get(revoked.id, set())
            )

        try:
            wait_until(complete, 30, "all event types seen")
        finally:
            receiver.should_stop = True
            thread.join(10)
