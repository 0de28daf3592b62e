"""loopline.dashboard.cluster: workers online as Celery reports them, read through the session's real broker."""

from __future__ import annotations

from collections.abc import Callable

from loopline.bench.procs import Child
from loopline.dashboard.cluster import POOL_NAMES, ClusterView
from loopline.worker.launcher import ASYNCIO_POOL


def test_workers_online_show_their_pool_and_concurrency(worker: Callable[..., Child]) -> None:
    started = [worker("threads", 3), worker("asyncio", 7)]
    state = ClusterView("http://127.0.0.1:5555/", cache_s=0).state()
    assert state["error"] is None and state["broker"].startswith("redis://127.0.0.1:")
    assert state["flower_url"] == "http://127.0.0.1:5555/"
    mine = {w["pid"]: w for w in state["workers"] if w["pid"] in {child.pid for child in started}}
    assert {(w["pool"], w["concurrency"]) for w in mine.values()} == {("threads", 3), ("asyncio", 7)}


def test_cluster_state_counts_dead_letters() -> None:
    from config.celery_app import app
    from loopline.deadletter.store import DeadLetter, DeadLetterStore, Reason

    view = ClusterView(None, cache_s=0)
    before = view.state()["dead_letters"]
    store = DeadLetterStore(app.backend.client)
    entry = store.add(DeadLetter(reason=Reason.INVALID, error="a test entry", queue="dashboard-cluster-test"))
    try:
        assert view.state()["dead_letters"] == before + 1
    finally:
        store.remove(entry.id)
    assert view.state()["dead_letters"] == before


def test_answers_are_cached_between_looks() -> None:
    view = ClusterView(None, cache_s=60)
    assert view.state() is view.state()


def test_every_loopline_pool_has_a_name() -> None:
    assert POOL_NAMES[ASYNCIO_POOL] == "asyncio"
    assert {"prefork", "threads", "gevent", "solo", "asyncio"} <= set(POOL_NAMES.values())
