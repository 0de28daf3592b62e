"""The asyncio pool: ``-c N`` task bodies in flight at once on one event loop per worker process.

Use it as ``loopline worker --pool asyncio -c 1000`` or, with stock Celery,
``CELERY_CUSTOM_WORKER_POOL=loopline.concurrency.asyncio:TaskPool celery -A proj worker -P custom``, with any
Celery app: its settings come from that app's ``loopline_*`` configuration (:mod:`loopline.settings`).

Celery's consumer stays on the main thread and hands each request to :meth:`TaskPool.on_apply`; the
pool runs it on an event loop in a second thread. Async tasks (``async def`` bodies, and the
loopline tasks' async bodies) run through Celery's own tracer inside a greenlet (see
``loopline.concurrency.bridge``); sync tasks run in a bounded thread pool so they never block the loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import celery.app.trace
from billiard.einfo import ExceptionInfo
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import SoftTimeLimitExceeded

from loopline import reprs
from loopline.concurrency import loop_resources
from loopline.concurrency.bridge import Interrupt, drive, run_in_greenlet

__all__ = ["Job", "Slots", "TaskPool"]

logger = logging.getLogger(__name__)

LAG_PROBE_INTERVAL_S = 0.5
STOP_TIMEOUT_S = 10.0
# The cyclic collector's thresholds while the pool runs (CPython's default: 700, 10, 10). A job's objects live for
# its request's round trip; at -c 1000 the default gen0 threshold promotes them to the old generations before they
# die, and each full collection walks every object of the process: measured at a fifth of the worker's CPU. A young
# collection at 200,000 objects takes ~40 ms of the loop, once every few thousand jobs (under asyncio_blocking_ms).
GC_THRESHOLDS = (200_000, 20, 20)


class _ProcessTuning:
    """The process-wide state the running pools share: the collector's tuning and the tracer's repr.

    The first pool to start sets both, the last to stop restores them: a pool stopping while another runs must
    leave that one tuned, and a pool starting while another runs must not take the tuned thresholds for the
    originals. Each pool counts once, however often it starts or stops.
    """

    def __init__(self) -> None:
        # Reentrant: a signal handler that stops the pool may run on the main thread inside acquire/release.
        self._lock = threading.RLock()
        self._pools: set[TaskPool] = set()
        # What the first pool to start finds (read again then), and the last to stop puts back.
        self._thresholds: tuple[int, int, int] = gc.get_threshold()
        self._tracer_repr: Callable[..., str] = celery.app.trace.saferepr

    def acquire(self, pool: TaskPool) -> None:
        with self._lock:
            if pool in self._pools:
                return
            if not self._pools:
                self._tune()
            self._pools.add(pool)

    def release(self, pool: TaskPool) -> None:
        with self._lock:
            if pool not in self._pools:
                return
            self._pools.discard(pool)
            if not self._pools:
                self._restore()

    def _tune(self) -> None:
        # What the worker built at start-up (Celery, the app, its modules) stays out of every later collection,
        # and the collector runs less often while jobs run.
        self._thresholds = gc.get_threshold()
        gc.collect()
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        self._tracer_repr = reprs.install_in_tracer()

    def _restore(self) -> None:
        # No gc.unfreeze(): it would also unfreeze what the application froze itself (the pre-fork idiom), and
        # what the pool froze are start-up objects that live as long as the worker anyway.
        gc.set_threshold(*self._thresholds)
        reprs.uninstall_from_tracer(self._tracer_repr)


_tuning = _ProcessTuning()


class Slots:
    """A resizable semaphore for the loop thread: at most ``limit`` task bodies run at once."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    @property
    def waiting(self) -> int:
        return len(self._waiters)


class Job:
    """One request handed to the pool; also the ApplyResult that Celery's Request keeps a weakref to."""

    def __init__(self, pool: TaskPool, target: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                 callback: Callable[..., Any] | None, accept_callback: Callable[..., Any] | None,
                 timeout_callback: Callable[..., Any] | None, soft_s: float | None, hard_s: float | None) -> None:
        self.pool, self.target, self.args, self.kwargs = pool, target, args, kwargs
        self.callback, self.accept_callback, self.timeout_callback = callback, accept_callback, timeout_callback
        self.soft_s, self.hard_s = soft_s, hard_s
        self.name = str(args[0]) if args else "?"
        self.task_id = str(args[1]) if len(args) > 1 else "?"
        self.task: asyncio.Task[None] | None = None
        self.interrupt = Interrupt()
        self.terminated = False
        self.timed_out = False
        self.started = False
        self.timer: asyncio.TimerHandle | None = None  # the nearer time limit's (see TaskPool._arm_timer)
        self.limits_from = 0.0  # loop time the limits count from
        self.generation = pool.generation
        self.deferred: list[asyncio.Future[Any]] = []  # what the tracer handed off (its result write)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.task_id}]"

    # -- the ApplyResult protocol (celery.worker.request.Request.terminate calls .terminate) --------------
    def terminate(self, signal: int | None = None) -> None:
        self.terminated = True
        self.pool.loop.call_soon_threadsafe(self.pool._terminate, self)

    def wait(self, timeout: float | None = None) -> None:  # pragma: no cover - part of the protocol
        return None


class TaskPool(BasePool):
    """Celery pool running tasks as coroutines on one asyncio event loop (uvloop when installed)."""

    body_can_be_buffer = True
    signal_safe = False
    task_join_will_block = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from loopline.settings import settings_for

        # The app this worker serves (BasePool keeps it): its loopline_* configuration, never a global.
        self.settings = settings = settings_for(self.app)
        self.slots = Slots(self.limit or 100)
        self.loop = _new_loop()
        self.executor = ThreadPoolExecutor(max_workers=settings.asyncio_sync_threads,
                                           thread_name_prefix="loopline-sync")
        self.jobs: set[Job] = set()
        self.loop_lag_ms = 0.0
        self._thread: threading.Thread | None = None
        self._probe: asyncio.Task[None] | None = None
        self._async_cache: dict[str, bool] = {}
        # Bumped by flush() on the consumer's thread: a job handed over before it must not start after it,
        # even if its slot frees up before the loop gets to _drop_waiting.
        self.generation = 0
        self._stopping = False
        self._cut_requested = False  # set on the consumer's thread; _drain may not have begun yet
        self._grace_cut: asyncio.Future[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------
    def on_start(self) -> None:
        from loopline.app.task import run_coroutines

        run_coroutines(self.app)  # an app without loopline's task class: its async def tasks are awaited too
        _tuning.acquire(self)
        try:
            self._thread = threading.Thread(target=self._run_loop, name="loopline-asyncio", daemon=True)
            self._thread.start()
            asyncio.run_coroutine_threadsafe(loop_resources.startup(), self.loop).result(STOP_TIMEOUT_S)
        except BaseException:
            _tuning.release(self)  # Celery need not call on_stop after a failed start
            raise
        logger.info("asyncio pool: %d slots, %d sync threads, grace %.0f s", self.slots.limit,
                    self.settings.asyncio_sync_threads, self.settings.asyncio_shutdown_grace_s)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._probe = self.loop.create_task(self._probe_lag())
        self.loop.run_forever()

    def on_stop(self) -> None:
        """Warm shutdown: let in-flight tasks finish for the grace period, then cancel the rest unacked.

        Celery's cold shutdown (``celery.apps.worker.on_cold_shutdown``: SIGQUIT, a second Ctrl-C) also
        ends here, after setting ``state.should_terminate``: then there is no grace period.
        """
        from celery.worker import state

        self._shutdown(0.0 if state.should_terminate else self.settings.asyncio_shutdown_grace_s)

    def on_terminate(self) -> None:
        """Cold shutdown: cancel everything now; nothing in flight is acked, so all of it is redelivered."""
        self._shutdown(0.0)

    def _shutdown(self, grace_s: float) -> None:
        thread = self._thread
        running = thread is not None and thread.is_alive()
        if running and self._stopping:
            # A cold shutdown while a warm one waits out its grace period (a signal handler, run inside the
            # wait below): cut the grace short; the first call finishes the stop, and restores the tuning.
            self._cut_requested = True
            self.loop.call_soon_threadsafe(self._cut_grace)
            return
        try:
            if thread is None or not running:
                return
            self._stopping = True
            self.flush()  # a job still waiting for a slot must not start while the others drain
            future = asyncio.run_coroutine_threadsafe(self._drain(grace_s), self.loop)
            try:
                future.result(grace_s + STOP_TIMEOUT_S)
            except Exception:
                logger.exception("asyncio pool: shutdown did not complete cleanly")
            self.loop.call_soon_threadsafe(self.loop.stop)
            thread.join(STOP_TIMEOUT_S)
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._thread = None
        finally:
            # However the loop ended (stopped here, died, or never started), this pool's share of the tuning ends.
            _tuning.release(self)

    def _cut_grace(self) -> None:
        if self._grace_cut is not None and not self._grace_cut.done():
            self._grace_cut.set_result(None)

    async def _drain(self, grace_s: float) -> None:
        if self._probe is not None:
            self._probe.cancel()
        self._grace_cut = self.loop.create_future()
        if self._cut_requested:  # asked for before this coroutine began: no grace at all
            grace_s = 0.0
        pending = [job.task for job in self.jobs if job.task is not None and job.started]
        if pending and grace_s > 0:
            logger.info("asyncio pool: waiting up to %.0f s for %d running tasks", grace_s, len(pending))
            finished = asyncio.ensure_future(asyncio.wait(pending))
            either: list[asyncio.Future[Any]] = [finished, self._grace_cut]
            await asyncio.wait(either, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED)
            finished.cancel()
        leftover = [job for job in self.jobs if job.task is not None and not job.task.done()]
        if leftover:
            logger.warning("asyncio pool: cancelling %d unfinished tasks; they stay unacked and are redelivered",
                           len(leftover))
            for job in leftover:
                job.terminated = True
                assert job.task is not None
                job.task.cancel()
            await asyncio.wait([job.task for job in leftover if job.task is not None], timeout=STOP_TIMEOUT_S)
        await loop_resources.shutdown()

    # -- running tasks ------------------------------------------------------------------------------------
    def on_apply(self, target: Callable[..., Any], args: tuple[Any, ...] | None = None,
                 kwargs: dict[str, Any] | None = None, callback: Callable[..., Any] | None = None,
                 accept_callback: Callable[..., Any] | None = None, timeout_callback: Callable[..., Any] | None = None,
                 soft_timeout: float | None = None, timeout: float | None = None, **_: Any) -> Job:
        job = Job(self, target, tuple(args or ()), dict(kwargs or {}), callback, accept_callback, timeout_callback,
                  soft_timeout, timeout)
        self.loop.call_soon_threadsafe(self._spawn, job)
        return job

    def _spawn(self, job: Job) -> None:
        self.jobs.add(job)
        job.task = self.loop.create_task(self._run(job))
        job.task.add_done_callback(lambda _: self.jobs.discard(job))

    def flush(self) -> None:
        """Drop the jobs still waiting for a slot (``celery.concurrency.base.BasePool.flush``).

        Celery calls it from ``Consumer.on_close`` when the broker connection is lost and at a warm
        shutdown, after forgetting the reserved requests: their messages go back to the queue when the
        channel closes, so a job that has not started must not start here as well (it would run twice).
        """
        self.generation += 1
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self._drop_waiting)

    def _terminate(self, job: Job) -> None:
        """``revoke(terminate=True)``, on the loop: cancel the job, and settle its message if nobody else will.

        ``celery.worker.request.Request.terminate`` announces the revoke (REVOKED, ``task-revoked``, ack)
        itself only for a task that has started; for one still waiting for a slot it leaves that to
        ``on_accepted``, which a cancelled job never reaches. ``Request.revoked()`` does it here instead:
        the id is in the worker's revoked set by now, and it acts once per request.
        """
        if job.task is not None and not job.task.done():
            job.task.cancel()
        request = getattr(job.accept_callback, "__self__", None)
        if request is not None and not getattr(request, "_already_revoked", False) and callable(
                getattr(request, "revoked", None)):
            request.revoked()

    def _drop_waiting(self) -> None:
        waiting = [job for job in self.jobs if not job.started and job.task is not None and not job.task.done()]
        for job in waiting:
            job.terminated = True
            assert job.task is not None
            job.task.cancel()
        if waiting:
            logger.info("asyncio pool: %d jobs that had not started go back to the queue", len(waiting))

    def _is_async(self, name: str) -> bool:
        cached = self._async_cache.get(name)
        if cached is None:
            from loopline.app.task import is_coroutine_task

            task = self.app.tasks.get(name)
            cached = task is not None and is_coroutine_task(task)
            self._async_cache[name] = cached
        return cached

    async def _run(self, job: Job) -> None:
        try:
            await self.slots.acquire()
        except asyncio.CancelledError:
            return
        try:
            if job.terminated or job.generation != self.generation or _revoked_before_start(job):
                return
            job.started = True
            if job.accept_callback is not None:
                job.accept_callback(os.getpid(), time.monotonic())
            if job.terminated:  # revoke(terminate=True) arrived before the task started
                return
            if self._is_async(job.name):
                self._arm_timer(job)
                blocking_ms = self.settings.asyncio_blocking_ms
                result = await run_in_greenlet(
                    self._trace, job, label=job.label,
                    wrap=lambda awaitable: drive(awaitable, job.interrupt, job.label, blocking_ms),
                    deferred=job.deferred,
                )
            else:
                # A sync task: run it whole (tracer included) on a thread, as the threads pool would.
                await self.loop.run_in_executor(self.executor, apply_target, job.target, job.args, job.kwargs,
                                                job.callback)
                return
        except asyncio.CancelledError:
            if job.timed_out and job.timeout_callback is not None:
                _call(job, job.timeout_callback, False, job.hard_s)
            return
        except Exception:
            # As prefork's pool does with an error out of its target (billiard's worker sends it back, the
            # pool calls Request.on_failure): the task fails once and its message is acked, not left unacked.
            logger.exception("asyncio pool: %s crashed outside the task body; it fails", job.label)
            request = getattr(job.accept_callback, "__self__", None)
            if request is not None:
                _call(job, request.on_failure, ExceptionInfo())
            return
        finally:
            if job.timer is not None:
                job.timer.cancel()
            self.slots.release()
        if job.deferred and not await _settle(job):
            return
        if job.callback is not None:
            _call(job, job.callback, result)

    def _trace(self, job: Job) -> Any:
        return job.target(*job.args, **job.kwargs)

    def _arm_timer(self, job: Job) -> None:
        """One loop timer per job, for the nearer of its limits; the soft limit, once raised, arms the hard one.

        Two timers per job, armed and cancelled, were 2 % of the loop's CPU at -c 1000.
        """
        job.limits_from = self.loop.time()
        if job.soft_s and (not job.hard_s or job.soft_s <= job.hard_s):
            job.timer = self.loop.call_at(job.limits_from + job.soft_s, self._soft_limit, job)
        elif job.hard_s:
            job.timer = self.loop.call_at(job.limits_from + job.hard_s, self._hard_limit, job)

    def _soft_limit(self, job: Job) -> None:
        if job.task is None or job.task.done():
            return
        if job.hard_s:
            job.timer = self.loop.call_at(job.limits_from + job.hard_s, self._hard_limit, job)
        if job.timeout_callback is not None:
            job.timeout_callback(True, job.soft_s)
        job.interrupt.pending = SoftTimeLimitExceeded(f"soft time limit ({job.soft_s}s) exceeded")
        job.task.cancel()

    def _hard_limit(self, job: Job) -> None:
        if job.task is None or job.task.done():
            return
        job.timed_out = True
        job.interrupt.pending = None
        job.task.cancel()

    async def _probe_lag(self) -> None:
        while True:
            started = self.loop.time()
            await asyncio.sleep(LAG_PROBE_INTERVAL_S)
            self.loop_lag_ms = max(0.0, (self.loop.time() - started - LAG_PROBE_INTERVAL_S) * 1000)

    # -- control ------------------------------------------------------------------------------------------
    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        """Jobs are cancelled through Job.terminate (Request.terminate calls both); no process to signal."""

    def grow(self, n: int = 1) -> None:
        self._resize(self.limit + n)

    def shrink(self, n: int = 1) -> None:
        self._resize(self.limit - n)

    def _resize(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.loop.call_soon_threadsafe(self.slots.resize, self.limit)

    @property
    def num_processes(self) -> int:
        # The requested limit: the consumer reads it right after grow()/shrink() to resize its prefetch.
        return self.limit

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update({
            "implementation": "loopline.concurrency.asyncio:TaskPool",
            "max-concurrency": self.slots.limit,
            "in-flight": self.slots.in_use,
            "waiting": self.slots.waiting,
            "sync-threads": self.settings.asyncio_sync_threads,
            "loop-lag-ms": round(self.loop_lag_ms, 2),
            "event-loop": type(self.loop).__module__,
        })
        return info


async def _settle(job: Job) -> bool:
    """Wait for the writes ``job``'s tracer deferred (its result); False if one failed.

    The task has finished: a cancellation now (revoke, shutdown) does not stop the write halfway, and
    the task is acked once it is stored, as it would have been had the write been made in the tracer.
    """
    written = asyncio.gather(*job.deferred, return_exceptions=True)
    while True:
        try:
            outcomes = await asyncio.shield(written)
            break
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
    failed = next((outcome for outcome in outcomes if isinstance(outcome, BaseException)), None)
    if failed is None:
        return True
    # Celery's tracer would have reported this as an internal error; here the message stays unacked, so
    # the job runs again after the visibility timeout instead of its result being lost.
    logger.error("asyncio pool: %s finished but its result was not stored (%s: %s); its message is not acked "
                 "and is redelivered after the visibility timeout", job.label, type(failed).__name__, failed)
    request = getattr(job.accept_callback, "__self__", None)
    if request is not None:
        from celery.worker.state import task_ready

        task_ready(request)  # no longer active in this worker (inspect active, worker state)
    return False


def _call(job: Job, callback: Callable[..., Any], *args: Any) -> None:
    """Run one of Celery's callbacks (``Request.on_success``/``on_timeout``: states, events, the ack) for ``job``.

    One that raises is logged here with the task's name; left to the asyncio Task, it would surface only as
    "Task exception was never retrieved" when the Task is garbage-collected.
    """
    try:
        callback(*args)
    except Exception:
        logger.exception("asyncio pool: %s finished, but Celery's %s failed", job.label,
                         getattr(callback, "__name__", "callback"))


def _revoked_before_start(job: Job) -> bool:
    # celery.worker.request.Request.revoked() checks the worker's revoked set and, if the id is there,
    # marks the task REVOKED and acks it. The consumer only checks when it hands the request over; a
    # request that waited here for a free slot is checked again, so a revoked task never starts.
    request = getattr(job.accept_callback, "__self__", None)
    revoked = getattr(request, "revoked", None)
    return bool(revoked()) if callable(revoked) else False


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
