"""The asyncio pool's process-wide tuning (the collector's thresholds and freeze, the tracer's repr): the first pool
to start sets it, the last to stop restores it, on every way a pool stops, and never unfreezes the application's."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import celery.app.trace
import pytest

from config.celery_app import app
from loopline import reprs
from loopline.concurrency import loop_resources
from loopline.concurrency.asyncio import GC_THRESHOLDS, TaskPool

Original = tuple[tuple[int, int, int], Callable[..., str]]


@pytest.fixture
def original() -> Iterator[Original]:
    """The process as no pool tuned it; each test ends with it so again, whatever it asserted."""
    thresholds, tracer_repr = gc.get_threshold(), celery.app.trace.saferepr
    assert thresholds != GC_THRESHOLDS and tracer_repr is not reprs.saferepr, "a pool of another test still runs"
    yield thresholds, tracer_repr
    gc.set_threshold(*thresholds)
    celery.app.trace.saferepr = tracer_repr


def _tuned() -> bool:
    return gc.get_threshold() == GC_THRESHOLDS and celery.app.trace.saferepr is reprs.saferepr


def _restored(original: Original) -> bool:
    thresholds, tracer_repr = original
    return gc.get_threshold() == thresholds and celery.app.trace.saferepr is tracer_repr


def _failing_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refuse() -> None:
        raise RuntimeError("a startup hook failed")

    monkeypatch.setattr(loop_resources, "startup", refuse)


def test_the_tuning_lasts_until_the_last_of_two_pools_stops(original: Original) -> None:
    first, second = TaskPool(limit=2, app=app), TaskPool(limit=2, app=app)
    first.on_start()
    try:
        second.on_start()
        try:
            assert _tuned()
            first.on_stop()
            assert _tuned(), "the second pool still runs"
            first.on_stop()  # a second stop of the same pool does not count twice
            assert _tuned()
        finally:
            second.on_stop()
    finally:
        first.on_stop()
    assert _restored(original)


def test_a_stop_leaves_what_the_application_froze_frozen(original: Original) -> None:
    gc.freeze()  # as an application does before it forks
    frozen = gc.get_freeze_count()
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    pool.on_stop()
    assert gc.get_freeze_count() >= frozen
    assert _restored(original)


def test_a_pool_whose_start_fails_leaves_nothing_tuned(original: Original, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_startup(monkeypatch)
    pool = TaskPool(limit=2, app=app)
    try:
        with pytest.raises(RuntimeError, match="a startup hook failed"):
            pool.on_start()
        assert _restored(original), "restored without waiting for an on_stop"
    finally:
        pool.on_stop()  # the loop's thread runs on; Celery's worker stops the pool after a failed start
    assert _restored(original)


def test_a_failed_start_leaves_a_running_pool_tuned(original: Original, monkeypatch: pytest.MonkeyPatch) -> None:
    running, failing = TaskPool(limit=2, app=app), TaskPool(limit=2, app=app)
    running.on_start()
    try:
        _failing_startup(monkeypatch)
        try:
            with pytest.raises(RuntimeError, match="a startup hook failed"):
                failing.on_start()
            assert _tuned()
        finally:
            failing.on_stop()
        assert _tuned()
    finally:
        running.on_stop()
    assert _restored(original)


def test_a_pool_whose_loop_died_restores_the_tuning_when_it_stops(original: Original) -> None:
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    thread = pool._thread
    assert thread is not None
    pool.loop.call_soon_threadsafe(pool.loop.stop)
    thread.join(10)
    assert not thread.is_alive() and _tuned()
    pool.on_stop()
    assert _restored(original)


def test_a_pool_stopped_without_a_start_changes_nothing(original: Original) -> None:
    running = TaskPool(limit=2, app=app)
    running.on_start()
    try:
        TaskPool(limit=2, app=app).on_stop()
        assert _tuned()
    finally:
        running.on_stop()
    assert _restored(original)
