"""Task base classes: coroutine-aware tasks for every pool, and loopline's validated I/O tasks."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable
from typing import Any

from celery import Celery, Task
from celery._state import pop_current_task, push_current_task
from celery.app.task import Context
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from loopline.app.install import backend_url
from loopline.concurrency.bridge import on_loop, resolve
from loopline.errors import CONNECTION_FAILURES, InvalidJob, JobTooLarge, RedisUnavailable
from loopline.settings import settings_for

__all__ = ["IOTask", "LooplineTask", "is_coroutine_task", "run_coroutines"]


def is_coroutine_task(task: Task) -> bool:
    """True when the asyncio pool should await this task's body on its loop.

    Looks behind Celery's autoretry wrapper (``celery.app.autoretry.add_autoretry_behaviour`` keeps the
    task's own body as ``_orig_run``), and behind the sync view :class:`LooplineTask` gives it.
    """
    if getattr(task, "async_body", None) is not None:
        return True
    body = getattr(task, "_orig_run", None) or task.run
    return inspect.iscoroutinefunction(getattr(body, "coroutine_function", body))


class _AwaitingBody:
    """A sync view of a coroutine body: calling it runs the coroutine to completion (see LooplineTask)."""

    def __init__(self, coroutine_function: Callable[..., Any]) -> None:
        self.coroutine_function = coroutine_function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return resolve(self.coroutine_function(*args, **kwargs))


def run_coroutines(app: Any) -> None:
    """Make every ``async def`` task of ``app`` that is not a LooplineTask run its coroutine to completion.

    For an app with Celery's default Task class (the asyncio pool serves any app) or a task with a base class
    of its own. Celery's tracer calls ``task.run`` when the class has no ``__call__`` of its own
    (``celery.app.trace.build_tracer``), and the consumer builds the tracers when it starts
    (``Consumer.update_strategies``), after the pool: the pool calls this from ``on_start``. Behind
    ``autoretry_for`` the coroutine function is ``_orig_run``, which Celery's wrapper looks up on each call.
    """
    for task in list(app.tasks.values()):
        if isinstance(task, LooplineTask):
            continue
        orig = task.__dict__.get("_orig_run")
        if orig is not None and inspect.iscoroutinefunction(orig):
            task._orig_run = _AwaitingBody(orig)
        elif inspect.iscoroutinefunction(task.run):
            task.run = _AwaitingBody(task.run)


class LooplineTask(Task):
    """The app's default task class: an ``async def`` task runs to completion under any pool.

    Stock Celery returns the un-run coroutine of an ``async def`` task (celery #3884, #6552). Here the
    asyncio pool awaits it on its loop, and the other pools run it on a bridge loop
    (:func:`loopline.concurrency.bridge.resolve`). A task with an ``async_body`` runs that body instead of ``run``
    on the asyncio pool, so one task name has a sync body for sync pools and an async one for asyncio.
    """

    abstract = True
    async_body: Callable[..., Any] | None = None
    # True on a class whose time limits are loopline's defaults (set by bind), not its own.
    _default_limits = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # celery.app.task.Task.__call__, plus the choice of body and the awaiting of its result. The tracer
        # calls this (celery.app.trace.build_tracer: ``fun = task if task_has_custom(task, '__call__')``).
        orig = self.__dict__.get("_orig_run")
        if orig is not None and inspect.iscoroutinefunction(orig):
            # autoretry_for wraps run in a sync function that catches what ``_orig_run`` raises; an async body
            # would raise only when awaited, outside that wrapper. Give the wrapper a body that awaits.
            self._orig_run = _AwaitingBody(orig)
        push_current_task(self)
        self.request_stack.push(_request_copy(self.request, args, kwargs))
        try:
            body = self.async_body if self.async_body is not None and on_loop() else self.run
            result = body(*args, **kwargs)
            return resolve(result) if inspect.isawaitable(result) else result
        finally:
            self.pop_request()
            pop_current_task()

    @classmethod
    def bind(cls, app: Celery) -> Any:
        """Celery's ``Task.bind``, with loopline's default time limits for a task that sets neither limit.

        A task that sets one limit gets no default for the other: a default soft limit above its own hard one
        would make Celery's ``apply_async`` refuse every call, a default hard limit below its own soft one
        would stop it before its soft limit. (Celery's ``task_time_limit`` and ``task_soft_time_limit`` would
        each be filled in on their own by ``Task.bind``'s ``from_config``, and the worker gives them to its
        pool as the limits of a job without its own, ``celery.worker.components.Pool.create`` and
        ``billiard.pool.Pool.apply_async``; so the app does not set them.)
        """
        if _own_limit(cls, "time_limit") is None and _own_limit(cls, "soft_time_limit") is None:
            settings = settings_for(app)
            cls.time_limit, cls.soft_time_limit = settings.task_time_limit_s, settings.task_soft_time_limit_s
            cls._default_limits = True
        else:
            # One limit of its own: the other must not be a default inherited from a base bind gave them to.
            for name in ("time_limit", "soft_time_limit"):
                if _own_limit(cls, name) is None:
                    setattr(cls, name, None)
        return super().bind(app)

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        """Celery's ``apply_async``; when Redis cannot be reached, one :class:`RedisUnavailable` that says so.

        Celery first subscribes to the task's result channel (``RedisBackend.on_task_call``, retried as
        ``result_backend_max_retries`` says), then publishes (retried per ``task_publish_retry_policy``).
        Stock Celery ends the first with a bare RuntimeError ("The Celery application must be
        restarted") and the second with kombu's OperationalError; either way nothing was published.
        """
        try:
            return super().apply_async(args, kwargs, *rest, **options)
        except RuntimeError as exc:
            if not _connection_failure(exc):
                raise
            raise self._unavailable(backend_url(self.app), exc.__cause__ or exc) from exc
        except OperationalError as exc:
            # kombu raises OperationalError for Redis refusing a command too (OOM, READONLY): only a broken
            # connection is "cannot reach"; anything else keeps kombu's own error and words.
            if isinstance(exc, RedisUnavailable) or not _connection_failure(exc):
                raise
            raise self._unavailable(self.app.conf.broker_url, exc) from exc

    def _unavailable(self, url: str | None, cause: BaseException) -> RedisUnavailable:
        return RedisUnavailable(f"{self.name}: cannot reach {maybe_sanitize_url(url or '?')} "
                                f"({type(cause).__name__}: {str(cause).strip()}); the job was not sent")

    async def delay_async(self, *args: Any, **kwargs: Any) -> Any:
        """``delay`` for asyncio code: validates and sends on a worker thread, never blocking the loop."""
        return await asyncio.to_thread(self.apply_async, args, kwargs)

    async def apply_async_async(self, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        """``apply_async`` for asyncio code (queue, countdown and other options as usual)."""
        return await asyncio.to_thread(self.apply_async, args, kwargs, **options)


def _request_copy(request: Context, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Context:
    """What ``Task.push_request(args=args, kwargs=kwargs)`` pushes: a copy of ``request`` with these arguments.

    ``Context(**{**request.__dict__, ...})`` runs ``Context.__init__`` again, and with it
    ``Context._get_custom_headers`` (a set of every Context attribute, built per call) when the request has no
    custom headers; the copy has the same keys, so the answer is the one ``request`` already holds. A copy,
    as Celery's: what the body sets on ``self.request`` stays out of the tracer's request.
    """
    copy = Context.__new__(Context)
    copy.__dict__.update(request.__dict__)
    copy.args, copy.kwargs = args, kwargs
    if "timelimit" in copy.__dict__:  # Context.update derives the two limits from it whenever it is given
        timelimit = copy.timelimit
        limits = timelimit[:2] if isinstance(timelimit, list | tuple) and len(timelimit) >= 2 else (None, None)
        copy.time_limit, copy.soft_time_limit = limits
    return copy


def _own_limit(cls: type[Task], name: str) -> float | None:
    """The time limit ``name`` a task class or a base of its own sets, leaving out defaults that bind gave."""
    for klass in cls.__mro__:
        if name in vars(klass) and not vars(klass).get("_default_limits"):
            return vars(klass)[name]
    return None


def _connection_failure(exc: BaseException) -> bool:
    """True if ``exc`` was caused by a connection that failed (not by Redis refusing a command)."""
    return isinstance(exc.__cause__ or exc.__context__, CONNECTION_FAILURES)


class IOTask(LooplineTask):
    """A task whose arguments are validated and size-checked before the message is sent.

    ``validate`` (set per task through ``@app.task(validate=...)``) receives the call's arguments and
    raises :class:`InvalidJob`; the same core runs again in the worker, so a message that bypassed
    the producer (``send_task``, another client) is checked too.
    """

    abstract = True
    validate: Callable[..., object] | None = None

    def apply_async(self, args: Any = None, kwargs: Any = None, *rest: Any, **options: Any) -> Any:
        self.check_job(tuple(args or ()), dict(kwargs or {}))
        return super().apply_async(args, kwargs, *rest, **options)

    def check_job(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Raise InvalidJob (or JobTooLarge) for a job that would fail anyway; TypeError for a bad signature."""
        try:
            # allow_nan=False: NaN and Infinity would go out as tokens that are not JSON.
            size = len(json.dumps([args, kwargs], allow_nan=False))
        except RecursionError:
            raise InvalidJob(f"{self.name}: arguments are nested too deeply to send as JSON") from None
        except (TypeError, ValueError) as exc:
            raise InvalidJob(f"{self.name}: arguments are not JSON-serialisable: {exc}") from None
        settings = settings_for(self.app)
        if size > settings.max_arg_bytes:
            raise JobTooLarge(
                f"{self.name}: arguments are {size} bytes, over LOOPLINE_MAX_ARG_BYTES={settings.max_arg_bytes}"
            )
        if self.validate is not None:
            self.validate(self, *args, **kwargs)
