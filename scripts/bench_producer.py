"""How fast one process enqueues: ``send_many``, ``asend_many`` and ``.delay()`` in a loop, on ``io_sleep`` jobs.

    LOOPLINE_BROKER_URL=redis://127.0.0.1:PORT/0 .venv/bin/python scripts/bench_producer.py [--jobs 20000]
        [--delay-jobs 5000] [--repeat 3]

``send_many`` sends the first job through ``apply_async`` and splices the others' Redis entries and
``task-sent`` events from it (``loopline.app.envelope``, ``loopline.app.sent_events``); ``asend_many`` is the
same on a worker thread. ``batch_apply`` is ``apply_async`` per job inside one ``Producer.batch``: what
``send_many`` did before it subscribed in bulk, sent ``task.multi`` events and bound the queue once. Each run
sends to a queue of its own, which is deleted afterwards with the results' subscriptions; no worker runs, so
the numbers are the producer's alone. Prints jobs/s per way of sending, median and range of repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

__all__ = ["main"]


def _timed(send: Callable[[str], int], queue: str) -> float:
    started = time.perf_counter()
    count = send(queue)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--delay-jobs", type=int, default=5_000, help="jobs for the .delay() loop (0: skip it)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=("send_many", "asend_many", "batch_apply", "delay"),
                        help="measure only this one")
    args = parser.parse_args()

    from loopline.app.default import app
    from loopline.app.producer import BATCH_MAX_COMMANDS, asend_many, release_result_subscriptions, send_many

    task = app.tasks["tasks.io_sleep"]
    calls = [((100,), {}) for _ in range(args.jobs)]

    def bulk(queue: str) -> int:
        return len(send_many(task, calls, queue=queue))

    def bulk_async(queue: str) -> int:
        return len(asyncio.run(asend_many(task, calls, queue=queue)))

    def batched_apply_async(queue: str) -> int:
        # send_many as it was before the bulk subscription, the task.multi events and the bound queue.
        with app.producer_or_acquire() as producer, producer.batch(BATCH_MAX_COMMANDS):
            return len([task.apply_async(args, kwargs, producer=producer, queue=queue) for args, kwargs in calls])

    def delay_loop(queue: str) -> int:
        for _ in range(args.delay_jobs):
            task.apply_async((100,), queue=queue)
        return args.delay_jobs

    ways: dict[str, Callable[[str], int]] = {"send_many": bulk, "asend_many": bulk_async,
                                             "batch_apply": batched_apply_async}
    if args.delay_jobs:
        ways["delay"] = delay_loop
    if args.only:
        ways = {args.only: ways[args.only]}
    rates: dict[str, list[float]] = {name: [] for name in ways}
    try:
        for _ in range(args.repeat):
            for name, send in ways.items():
                queue = f"bench.producer.{uuid.uuid4().hex[:8]}"
                try:
                    rates[name].append(_timed(send, queue))
                finally:
                    _drop(app, queue)
    finally:
        release_result_subscriptions(app)
    print(f"{'way':<12} {'jobs':>7} {'jobs/s (median)':>16} {'range':>17}   all repeats")
    for name, values in rates.items():
        jobs = args.delay_jobs if name == "delay" else args.jobs
        print(f"{name:<12} {jobs:>7} {statistics.median(values):>16,.0f} "
              f"{f'{min(values):,.0f}-{max(values):,.0f}':>17}   " + ", ".join(f"{v:,.0f}" for v in values))


def _drop(app: Any, queue: str) -> None:
    """The queue's messages go; the results' subscriptions too, so the next repeat starts clean."""
    with app.connection_for_write() as conn:
        conn.default_channel.client.delete(queue)
    consumer = getattr(app.backend, "result_consumer", None)
    subscribed = getattr(consumer, "subscribed_to", None)
    if isinstance(subscribed, set) and subscribed:
        consumer._pubsub.unsubscribe()
        subscribed.clear()


if __name__ == "__main__":
    main()
