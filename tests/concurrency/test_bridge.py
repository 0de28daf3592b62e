"""loopline.concurrency.bridge on its own: drive, the greenlet bridge, and resolve from threads and forked processes."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import multiprocessing
import threading
from typing import Any

import greenlet
import pytest
from celery.utils.threads import LocalStack

from loopline.concurrency.bridge import Interrupt, LoopGreenlet, await_only, drive, on_loop, resolve, run_in_greenlet


class Stop(Exception):
    """Stands in for SoftTimeLimitExceeded."""


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- drive ------------------------------------------------------------------------------------------------

def test_interrupt_is_raised_at_the_await_and_can_be_caught() -> None:
    seen: list[str] = []

    async def body() -> str:
        try:
            await asyncio.sleep(10)
        except Stop:
            await asyncio.sleep(0.01)  # the task is not cancelled any more: it can still await
            return "cleaned up"
        return "slept"

    async def main() -> None:
        interrupt = Interrupt()
        task = asyncio.ensure_future(drive(body(), interrupt, "t", 1000))
        await asyncio.sleep(0.05)
        interrupt.pending = Stop()
        task.cancel()
        seen.append(await task)
        assert not task.cancelled()
        assert task.cancelling() == 0
        assert interrupt.pending is None

    _run(main())
    assert seen == ["cleaned up"]


def test_uncaught_interrupt_propagates_as_itself() -> None:
    async def main() -> None:
        interrupt = Interrupt()
        task = asyncio.ensure_future(drive(asyncio.sleep(10), interrupt, "t", 1000))
        await asyncio.sleep(0.01)
        interrupt.pending = Stop("limit")
        task.cancel()
        with pytest.raises(Stop, match="limit"):
            await task

    _run(main())


def test_plain_cancellation_reaches_the_coroutine_and_propagates() -> None:
    seen: list[str] = []

    async def body() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        task = asyncio.ensure_future(drive(body(), Interrupt(), "t", 1000))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()

    _run(main())
    assert seen == ["cancelled"]


def test_drive_returns_values_and_raises_errors_of_the_coroutine() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    async def main() -> None:
        assert await drive(asyncio.sleep(0.01, result=7), Interrupt(), "t", 1000) == 7
        with pytest.raises(ValueError, match="boom"):
            await drive(fails(), Interrupt(), "t", 1000)

    _run(main())


def test_a_blocking_step_is_logged_with_the_label(caplog: pytest.LogCaptureFixture) -> None:
    import time

    async def blocks() -> None:
        await asyncio.sleep(0)
        time.sleep(0.4)
        await asyncio.sleep(0)

    async def main() -> None:
        # A threshold far from both: a loaded machine may stretch a step, not by a fifth of a second.
        await drive(blocks(), Interrupt(), "slow[1]", 200)
        await drive(asyncio.sleep(0.4), Interrupt(), "fast[2]", 200)  # waiting is not blocking

    with caplog.at_level(logging.WARNING, logger="loopline.concurrency.bridge"):
        _run(main())
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("slow[1] blocked the event loop for ")


# -- the greenlet bridge ----------------------------------------------------------------------------------

def test_await_only_outside_a_loop_greenlet_raises() -> None:
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="outside a task of the asyncio pool"):
        await_only(coro)
    coro.close()
    assert not on_loop()
    coro = asyncio.sleep(0)
    other = greenlet.greenlet(lambda: await_only(coro))  # a greenlet, but not one of the pool's
    with pytest.raises(RuntimeError):
        other.switch()
    coro.close()


def test_run_in_greenlet_round_trips_values_and_exceptions() -> None:
    def adds(a: int, *, b: int) -> int:
        assert on_loop()
        return await_only(asyncio.sleep(0.01, result=a)) + b

    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("inner")

    def catches() -> str:
        try:
            await_only(fails())
        except KeyError:
            return "caught inside"
        return "not raised"

    def raises() -> None:
        await_only(asyncio.sleep(0))
        raise ValueError("outer")

    async def main() -> None:
        assert await run_in_greenlet(adds, 2, b=3) == 5
        assert await run_in_greenlet(catches) == "caught inside"
        with pytest.raises(ValueError, match="outer"):
            await run_in_greenlet(raises)
        assert await run_in_greenlet(lambda: 42) == 42  # never awaits anything

    _run(main())


def test_coroutines_run_in_their_tasks_greenlet_and_see_its_context() -> None:
    """Celery's request stack is a LocalStack keyed by greenlet: each coroutine must see its own entry."""
    stack: LocalStack = LocalStack()

    async def body(n: int) -> tuple[int | None, int | None]:
        before = stack.top
        await asyncio.sleep(0.001 * (n % 7))
        assert isinstance(greenlet.getcurrent(), LoopGreenlet)
        return before, stack.top

    def traced(n: int) -> tuple[int | None, int | None]:
        stack.push(n)
        try:
            return await_only(body(n))
        finally:
            stack.pop()

    async def main() -> list[tuple[int | None, int | None]]:
        return await asyncio.gather(*(run_in_greenlet(traced, n) for n in range(50)))

    assert _run(main()) == [(n, n) for n in range(50)]


def test_run_in_greenlet_with_drive_throws_the_interrupt_into_the_awaited_coroutine() -> None:
    interrupt = Interrupt()

    async def body() -> str:
        try:
            await asyncio.sleep(10)
        except Stop:
            return "handled"
        return "slept"

    def traced() -> str:
        return "traced " + await_only(body())

    async def main() -> None:
        task = asyncio.ensure_future(
            run_in_greenlet(traced, wrap=lambda aw: drive(aw, interrupt, "t", 1000)))
        await asyncio.sleep(0.02)
        interrupt.pending = Stop()
        task.cancel()
        assert await task == "traced handled"

    _run(main())


def test_cancellation_unwinds_the_greenlet() -> None:
    unwound: list[str] = []

    def traced() -> None:
        try:
            await_only(asyncio.sleep(10))
        finally:
            unwound.append("finally")

    async def main() -> None:
        task = asyncio.ensure_future(run_in_greenlet(traced))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    _run(main())
    assert unwound == ["finally"]


def test_resolve_on_the_loop_awaits_in_place() -> None:
    loop_threads: list[int] = []

    async def where() -> int:
        loop_threads.append(threading.get_ident())
        return 1

    async def main() -> int:
        return await run_in_greenlet(lambda: resolve(where()))

    assert _run(main()) == 1
    assert loop_threads == [threading.get_ident()]  # not sent to the background loop's thread


# -- resolve from plain threads and processes -------------------------------------------------------------

async def _answer(value: int) -> int:
    await asyncio.sleep(0.01)
    return value


async def _fails() -> None:
    await asyncio.sleep(0)
    raise LookupError("from the bridge loop")


def test_resolve_from_plain_threads() -> None:
    results: dict[int, int] = {}

    def work(n: int) -> None:
        results[n] = resolve(_answer(n))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {n: n for n in range(8)}
    assert resolve(_answer(9)) == 9
    with pytest.raises(LookupError, match="bridge loop"):
        resolve(_fails())


def _child(conn: Any) -> None:
    try:
        conn.send(("ok", resolve(_answer(5))))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def test_resolve_in_a_forked_child_starts_its_own_loop() -> None:
    assert resolve(_answer(1)) == 1  # the parent's background loop thread exists before the fork
    ctx = multiprocessing.get_context("fork")
    parent_end, child_end = ctx.Pipe()
    process = ctx.Process(target=_child, args=(child_end,))
    process.start()
    try:
        assert parent_end.poll(20), "the forked child never answered (its resolve() hung)"
        assert parent_end.recv() == ("ok", 5)
        process.join(10)
        assert process.exitcode == 0
    finally:
        if process.is_alive():
            process.kill()
            process.join(5)


def test_the_greenlet_starts_with_a_copy_of_the_awaiting_tasks_context() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")

    async def read() -> str:
        await asyncio.sleep(0)
        return var.get()

    def traced() -> str:
        var.set("changed in the greenlet")  # stays in the greenlet's copy
        return await_only(read())

    async def main() -> tuple[str, str]:
        var.set("from the task")
        seen = await run_in_greenlet(lambda: await_only(read()))
        changed = await run_in_greenlet(traced)
        assert var.get() == "from the task"
        return seen, changed

    assert _run(main()) == ("from the task", "changed in the greenlet")
