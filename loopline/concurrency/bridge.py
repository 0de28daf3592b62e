"""Bridges between Celery's synchronous task tracer and coroutines.

Two directions:

- On the asyncio pool, Celery's tracer (``celery.app.trace.build_tracer``: signals, states, retries,
  result storage) runs inside a greenlet on the event-loop thread. When the task body produces a
  coroutine, :func:`await_only` steps it in that same greenlet and switches out only to pass what the
  coroutine yields (a future) to the loop's asyncio Task, which switches back once it is done. Every
  task keeps Celery's full behaviour while hundreds run interleaved on one thread, and ``self.request``
  and ``current_task`` stay right for each one, inside the coroutine too: Celery's request and task
  stacks (``celery.utils.threads.LocalStack``) are keyed by ``greenlet.getcurrent``.
- On every other pool, :func:`resolve` runs a coroutine to completion on a per-process event loop in a
  background thread; under gevent the waiting greenlet yields to the hub instead of blocking it. Each
  step of the coroutine runs with the calling task and its request pushed on that thread's stacks, so
  ``self.request`` and ``current_task`` are right there too (see :func:`_in_request`).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable, Generator
from concurrent.futures import Future
from typing import Any, TypeVar

import greenlet
from celery._state import get_current_task, pop_current_task, push_current_task

__all__ = ["Interrupt", "LoopGreenlet", "await_only", "defer", "drive", "on_loop", "resolve", "run_in_greenlet"]

logger = logging.getLogger(__name__)
T = TypeVar("T")


class LoopGreenlet(greenlet.greenlet):
    """A greenlet that runs one task's tracer, and the coroutines it awaits, on the event-loop thread."""

    task_label = "?"
    wrap: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None
    # Work the task handed off without waiting for it (see defer); None: nobody settles it, so wait.
    deferred: list[asyncio.Future[Any]] | None = None


def defer(future: asyncio.Future[Any]) -> bool:
    """Leave ``future`` for the asyncio pool to settle after the task's tracer returns, before its ack.

    Returns False outside a task run by the pool, where the caller must wait for ``future`` itself. The
    result backend uses it to write a task's result in a batch with the results of other tasks.
    """
    current = greenlet.getcurrent()
    if not isinstance(current, LoopGreenlet) or current.deferred is None:
        return False
    current.deferred.append(future)
    return True


def on_loop() -> bool:
    """True inside a task run by the asyncio pool, where :func:`await_only` may be used."""
    return isinstance(greenlet.getcurrent(), LoopGreenlet)


def await_only(awaitable: Awaitable[T]) -> T:
    """Wait for ``awaitable`` from synchronous code running in a :class:`LoopGreenlet`."""
    current = greenlet.getcurrent()
    if not isinstance(current, LoopGreenlet):
        raise RuntimeError("await_only() called outside a task of the asyncio pool")
    # The coroutine's steps run here, in the task's own greenlet: stepped from the loop's main greenlet
    # instead, its ``self.request`` and ``current_task`` would read an empty request stack.
    steps = _steps(current.wrap(awaitable) if current.wrap is not None else awaitable)
    send_value: Any = None
    throw: BaseException | None = None
    while True:
        try:
            yielded = steps.throw(throw) if throw is not None else steps.send(send_value)
        except StopIteration as stop:
            return stop.value
        try:
            send_value, throw = current.parent.switch(yielded), None
        except BaseException as exc:  # noqa: BLE001 - thrown in by the loop's Task: forwarded into the coroutine
            throw = exc


async def run_in_greenlet(
    fn: Callable[..., T],
    *args: Any,
    label: str = "?",
    wrap: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    deferred: list[asyncio.Future[Any]] | None = None,
    **kwargs: Any,
) -> T:
    """Run sync ``fn`` in a new LoopGreenlet; what it awaits through await_only runs as part of this coroutine.

    ``wrap`` decorates each awaitable before it is stepped (the pool passes :func:`drive`). ``deferred``
    collects what ``fn`` hands off through :func:`defer`; the caller then waits for it.
    """
    glet = LoopGreenlet(fn)
    glet.task_label, glet.wrap, glet.deferred = label, wrap, deferred
    # A new greenlet starts with an empty contextvars context; give it a copy of this Task's, as asyncio would.
    glet.gr_context = contextvars.copy_context()
    return await _trampoline(glet, args, kwargs)


@types.coroutine
def _trampoline(glet: LoopGreenlet, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Generator[Any, Any, Any]:
    """Pass what ``glet`` yields to the asyncio Task awaiting this, and what the Task sends back to ``glet``."""
    yielded = glet.switch(*args, **kwargs)
    while not glet.dead:
        try:
            value = yield yielded
        except BaseException:  # noqa: BLE001 - CancelledError and time limits go back into the task too
            yielded = glet.throw(*sys.exc_info())
        else:
            yielded = glet.switch(value)
    return yielded


def _steps(awaitable: Awaitable[T]) -> Generator[Any, Any, T]:
    # A @types.coroutine generator (drive's result) is awaitable through a code flag, without __await__.
    if isinstance(awaitable, types.GeneratorType):
        return awaitable
    return awaitable.__await__()


class Interrupt:
    """A one-shot exception to raise inside a coroutine at its current ``await`` instead of CancelledError."""

    def __init__(self) -> None:
        self.pending: BaseException | None = None


@types.coroutine
def drive(awaitable: Awaitable[T], interrupt: Interrupt, label: str, blocking_ms: float) -> Generator[Any, Any, T]:
    """Await ``coro`` step by step, like asyncio.Task does, adding two things.

    - When the surrounding task is cancelled while ``interrupt.pending`` holds an exception, that
      exception (e.g. SoftTimeLimitExceeded) is thrown into ``coro`` instead, so the task can catch it
      and clean up; the cancellation is withdrawn (``Task.uncancel``).
    - Each synchronous step is timed: one that holds the loop longer than ``blocking_ms`` is logged
      with the task's name, since it stalled every other task in the process.
    """
    coro = _steps(awaitable)
    send_value: Any = None
    throw: BaseException | None = None
    while True:
        started = time.perf_counter()
        try:
            yielded = coro.throw(throw) if throw is not None else coro.send(send_value)
        except StopIteration as stop:
            return stop.value
        finally:
            held_ms = (time.perf_counter() - started) * 1000
            if held_ms > blocking_ms:
                logger.warning("%s blocked the event loop for %.0f ms", label, held_ms)
        try:
            send_value, throw = (yield yielded), None
        except asyncio.CancelledError as exc:
            if interrupt.pending is None:
                throw = exc
            else:
                throw, interrupt.pending = interrupt.pending, None
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
        except BaseException as exc:  # noqa: BLE001 - forwarded into the coroutine, as asyncio.Task does
            throw = exc


class _BackgroundLoop:
    """One event loop per process in a daemon thread, for coroutines of tasks on non-asyncio pools."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = 0

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            # A prefork child inherits the parent's object but not its thread: start a fresh loop.
            if self._loop is None or self._pid != os.getpid():
                self._loop, self._pid = asyncio.new_event_loop(), os.getpid()
                thread = _real_thread_class()(target=self._loop.run_forever, name="loopline-bridge", daemon=True)
                thread.start()
            return self._loop


def _real_thread_class() -> type[threading.Thread]:
    # Under gevent, threading.Thread is patched into a greenlet; the bridge needs a real OS thread.
    if "gevent.monkey" in sys.modules:
        from gevent import monkey

        if monkey.is_module_patched("threading"):
            return monkey.get_original("threading", "Thread")
    return threading.Thread


_background = _BackgroundLoop()


def resolve(awaitable: Awaitable[T]) -> T:
    """Run ``awaitable`` to completion from synchronous task code, on any pool."""
    if on_loop():
        return await_only(awaitable)
    task = get_current_task()
    if task is not None:
        awaitable = _in_request(awaitable, task, task.request_stack.top)
    future: Future[T] = asyncio.run_coroutine_threadsafe(_as_coroutine(awaitable), _background.loop())
    if "gevent" in sys.modules and _gevent_patched():
        return _wait_gevent(future)
    return future.result()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


@types.coroutine
def _in_request(awaitable: Awaitable[T], task: Any, request: Any) -> Generator[Any, Any, T]:
    """Step ``awaitable`` with ``task`` as Celery's current task and ``request`` as its request.

    Celery's current-task stack (``celery._state._task_stack``) and each task's ``request_stack`` are
    ``celery.utils.threads.LocalStack`` objects keyed by ``greenlet.getcurrent``, so on the bridge loop's
    thread they are empty. Both are pushed for each step and popped before the loop runs any other
    coroutine's step: many coroutines interleaved on the one loop each see their own, after every await.
    """
    steps = _steps(awaitable)
    send_value: Any = None
    throw: BaseException | None = None
    while True:
        push_current_task(task)
        if request is not None:
            task.request_stack.push(request)
        try:
            yielded = steps.throw(throw) if throw is not None else steps.send(send_value)
        except StopIteration as stop:
            return stop.value
        finally:
            if request is not None:
                task.request_stack.pop()
            pop_current_task()
        try:
            send_value, throw = (yield yielded), None
        except BaseException as exc:  # noqa: BLE001 - forwarded into the coroutine, as asyncio.Task does
            throw = exc


def _gevent_patched() -> bool:
    from gevent import monkey

    return bool(monkey.is_module_patched("socket"))


def _wait_gevent(future: Future[T]) -> T:
    """Wait for a future completed by another OS thread without blocking the gevent hub."""
    import gevent.event
    from gevent import get_hub

    done = gevent.event.AsyncResult()
    hub_loop = get_hub().loop
    future.add_done_callback(lambda f: hub_loop.run_callback_threadsafe(done.set, None))
    done.get()
    return future.result()
