"""The ledger's own checks: how it classifies ids, what counts as in flight at a fault, refused sends."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis
from ledger import ACK_WINDOW_S, Ledger, producer_app

from loopline.embedded_redis import free_port


@pytest.fixture
def ledger(redis_url: str) -> Iterator[Ledger]:
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        book = Ledger(client, enqueued=[f"j{i}" for i in range(5)])
        yield book
        book.forget()


def _record(book: Ledger, what: str, job_id: str, times: int = 1, at: float | None = None) -> None:
    book.client.hincrby(f"ledger:{book.run}:{what}", job_id, times)
    if what == "done":
        book.client.hset(f"ledger:{book.run}:done_at", job_id, time.time() if at is None else at)


def test_every_id_is_done_once_duplicated_or_lost(ledger: Ledger) -> None:
    for job_id in ("j0", "j1", "j2"):
        _record(ledger, "started", job_id)
        _record(ledger, "done", job_id)
    _record(ledger, "started", "j2")
    _record(ledger, "done", "j2")  # ran twice
    _record(ledger, "started", "j3")  # started, never finished: lost
    counts = ledger.counts("unit", "none")
    assert (counts.done_once, counts.duplicated, counts.lost, counts.redelivered) == (2, 1, 2, 1)
    assert counts.duplicates_outside_fault == 1  # no fault was marked, so no duplicate is excused
    assert "done_once=2 duplicated=1 lost=2" in counts.line()


def test_in_flight_at_a_fault_means_running_or_just_finished(ledger: Ledger) -> None:
    _record(ledger, "started", "j0")
    _record(ledger, "done", "j0", at=time.time() - 10 * ACK_WINDOW_S)  # long done: not in flight
    _record(ledger, "started", "j1")
    _record(ledger, "done", "j1")  # just done: its ack may not have reached Redis
    _record(ledger, "started", "j2")  # running
    assert ledger.mark_fault() == {"j2"}
    assert ledger.at_fault == {"j1", "j2"}
    _record(ledger, "done", "j1")
    _record(ledger, "done", "j2")
    _record(ledger, "done", "j2")
    _record(ledger, "done", "j0")
    counts = ledger.counts("unit", "none")
    assert counts.duplicated == 3 and counts.duplicates_outside_fault == 1  # j0's duplicate is not excused


def test_a_lasting_fault_covers_jobs_done_while_it_lasted(ledger: Ledger) -> None:
    began = time.time() - 5 * ACK_WINDOW_S
    _record(ledger, "started", "j3")
    _record(ledger, "done", "j3", at=began + 1)
    ledger.mark_fault()
    assert "j3" not in (ledger.at_fault or set())
    ledger.mark_fault(since=began)
    assert "j3" in (ledger.at_fault or set())


def test_poison_jobs_are_neither_done_nor_lost(ledger: Ledger) -> None:
    ledger.poison.add("j4")
    counts = ledger.counts("unit", "none", dead_lettered=["j4"])
    assert counts.lost == 4 and counts.dead_lettered == 1


@pytest.mark.timeout(60)
def test_a_send_that_fails_is_counted_as_refused_not_lost(redis_url: str) -> None:
    dead = producer_app(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    try:
        with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
            book = Ledger(client)
            assert book.enqueue(dead, "nowhere", 1, 0.0) == []
            counts = book.counts("unit", "none")
    finally:
        dead.close()
    assert (counts.enqueued, counts.refused, counts.lost) == (0, 1, 0)
    assert all("Connection" in reason or "refused" in reason for reason in book.refused.values())
