"""The dashboard's hosts view (/api/hosts): rules and live figures from the broker's Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import requests

from loopline.bench.procs import start_dashboard
from loopline.politeness import Rule, RuleStore
from loopline.politeness.keys import PREFIX
from loopline.politeness.limiter import Limiter


@pytest.fixture
def store(redis_client: redis.Redis) -> Iterator[RuleStore]:
    yield RuleStore(redis_client)
    keys = list(redis_client.scan_iter(match=PREFIX + "*"))
    if keys:
        redis_client.delete(*keys)


def test_hosts_view_lists_rules_and_live_figures(tmp_path: Path, store: RuleStore, redis_client: redis.Redis) -> None:
    store.set("example.com", Rule(rate="5/s", concurrency=2))
    limiter = Limiter(redis_client)
    assert limiter.acquire("example.com", Rule(rate="5/s", concurrency=2), lease_id="l1", lease_ttl_ms=60_000).go
    limiter.release("busy.test", status=429, retry_after_ms=60_000)
    limiter.acquire("busy.test", None, job_id="j1")  # waits: paused

    dashboard, url = start_dashboard(tmp_path / "results", log_path=tmp_path / "dashboard.log")
    try:
        body = requests.get(f"{url}/api/hosts", timeout=30).json()
        page = requests.get(f"{url}/", timeout=30).text
    finally:
        dashboard.stop(5)

    assert body["error"] is None
    hosts = {h["host"]: h for h in body["hosts"]}
    assert hosts["example.com"]["rule"] == {"rate": "5/s", "burst": 0, "concurrency": 2}
    assert hosts["example.com"]["in_flight"] == 1 and hosts["example.com"]["started"] == 1
    assert hosts["busy.test"]["rule"] is None
    assert hosts["busy.test"]["paused_until"] is not None and hosts["busy.test"]["answers_429"] == 1
    assert hosts["busy.test"]["waiting"] == 1
    assert 'id="hosts-table"' in page
