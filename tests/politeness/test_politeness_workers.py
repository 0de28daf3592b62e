"""Per-host limits end to end: real asyncio and gevent workers at once, against a local server that listens on
several loopback addresses (each one a "host") and records when each request arrived, by its own clock."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from loopline.bench.procs import Child, start_target
from loopline.politeness import Rule, RuleStore
from loopline.politeness.keys import PREFIX, leases_key
from tasks import deliver_webhook, fetch_url

HOSTS = [f"127.0.8.{n}" for n in range(1, 6)]  # allowlisted in conftest (127.0.8.0/29)
RESULT_TIMEOUT_S = 90
SLOTS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The bench target on every address of HOSTS, one port; yields the port."""
    child, url = start_target(0.0, addresses=HOSTS, log_path=tmp_path_factory.mktemp("target") / "target.log")
    yield int(url.rsplit(":", 1)[1])
    child.stop(5)


@pytest.fixture
def url(server: int) -> Iterator[Callable[[str, str], str]]:
    requests.post(f"http://{HOSTS[0]}:{server}/reset", timeout=5).close()
    yield lambda host, path: f"http://{host}:{server}{path}"


@pytest.fixture
def rules(redis_client: redis.Redis) -> Iterator[RuleStore]:
    """The rule store; every politeness key (rules, pauses, host state) is removed after the test."""
    yield RuleStore(redis_client)
    keys = list(redis_client.scan_iter(match=PREFIX + "*"))
    if keys:
        redis_client.delete(*keys)


def arrivals(server_url: Callable[[str, str], str]) -> dict[str, list[float]]:
    with requests.get(server_url(HOSTS[0], "/arrivals"), timeout=5) as response:
        return {host: sorted(times) for host, times in response.json().items()}


def two_pools(worker: Callable[..., Child], queue: str, url: Callable[[str, str], str]) -> None:
    """An asyncio and a gevent worker, warmed up: sessions, connections and the limiter's clients made (on a
    host of its own) so that what a test measures is the limiter, not a worker's first requests."""
    worker("asyncio", SLOTS)
    worker("gevent", SLOTS)
    wait_all([fetch_url.apply_async((url(HOSTS[0], "/job?warm-up"),), queue=queue) for _ in range(4 * SLOTS)])


def wait_all(results: list[Any]) -> list[dict[str, Any]]:
    return [r.get(timeout=RESULT_TIMEOUT_S) for r in results]


def peak_per_second(times: list[float]) -> int:
    """The most arrivals in any window [t, t + 1 s)."""
    return max(sum(1 for s in times if t <= s < t + 1.0) for t in times)


@pytest.mark.timeout(180)
def test_a_limited_host_gets_its_rate_never_more_across_two_pools(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore) -> None:
    rate, burst, jobs = 10, 2, 60
    rules.set(HOSTS[1], Rule(rate=f"{rate}/s", burst=burst))
    two_pools(worker, queue, url)

    results = wait_all([fetch_url.apply_async((url(HOSTS[1], f"/job?n={n}"),), queue=queue) for n in range(jobs)])

    assert all(r["status"] == 200 for r in results)
    times = arrivals(url)[HOSTS[1]]
    assert len(times) == jobs
    assert peak_per_second(times) <= rate + burst, " ".join(f"{t - times[0]:.3f}" for t in times)
    achieved = (jobs - 1 - burst) / (times[-1] - times[0])
    assert achieved >= 0.85 * rate, f"{achieved:.2f}/s of {rate}/s"


@pytest.mark.timeout(180)
def test_an_unlimited_host_is_not_held_up_by_a_limited_backlog(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore) -> None:
    rules.set(HOSTS[1], Rule(rate="2/s"))
    two_pools(worker, queue, url)
    backlog = [fetch_url.apply_async((url(HOSTS[1], f"/job?n={n}"),), queue=queue) for n in range(100)]
    free = [fetch_url.apply_async((url(HOSTS[2], f"/job?n={n}"),), queue=queue) for n in range(40)]

    assert all(r["status"] == 200 for r in wait_all(free))
    seen = arrivals(url)
    # Had the 100 waiting jobs held the 40 slots, the free host's jobs would have run only once all but 40 of
    # the backlog were done; instead they ran while nearly all of it still waited.
    assert len(seen[HOSTS[2]]) == 40
    limited = seen.get(HOSTS[1], [])
    assert len(limited) < 20
    assert len([t for t in limited if t < max(seen[HOSTS[2]])]) < 20
    for result in backlog:
        result.revoke()


@pytest.mark.timeout(180)
def test_retry_after_holds_every_worker_off_the_host_until_the_pause_ends(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore) -> None:
    pause_s = 2
    # One request in flight at a time: the answer that pauses the host is the only one under way.
    rules.set(HOSTS[3], Rule(rate="50/s", concurrency=1))
    two_pools(worker, queue, url)

    results = wait_all([fetch_url.apply_async((url(HOSTS[3], f"/pause/k?retry_after={pause_s}&n={n}"),),
                                              queue=queue) for n in range(20)])

    assert all(r["status"] == 200 for r in results)  # the 429'd job was tried again after the pause
    times = arrivals(url)[HOSTS[3]]
    assert len(times) == 21  # 20 jobs, one of them twice
    first = times[0]  # the 429, by the server's clock
    assert times[1] >= first + pause_s, f"a request arrived {times[1] - first:.3f} s after the 429"


@pytest.mark.timeout(180)
def test_a_webhook_answered_429_pauses_the_host_and_keeps_its_own_retries(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore) -> None:
    two_pools(worker, queue, url)
    hook = deliver_webhook.apply_async((url(HOSTS[4], "/pause/hook?retry_after=2"), {"a": 1}), queue=queue)

    result = hook.get(timeout=RESULT_TIMEOUT_S)

    assert (result["status"], result["attempts"]) == (200, 2)
    times = arrivals(url)[HOSTS[4]]
    assert len(times) == 2 and times[1] >= times[0] + 2


@pytest.mark.timeout(180)
def test_a_lease_held_by_a_killed_worker_expires(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore,
        redis_client: redis.Redis, tmp_path: Path) -> None:
    rules.set(HOSTS[2], Rule(concurrency=1))
    holder = worker("gevent", 4)
    stuck = fetch_url.apply_async((url(HOSTS[2], "/job?ms=60000"),), {"timeout_s": 3}, queue=queue)
    deadline = time.monotonic() + 60
    while not arrivals(url).get(HOSTS[2]):
        assert time.monotonic() < deadline and holder.alive(), holder.log_text()[-3000:]
        time.sleep(0.05)
    holder.kill_tree()  # SIGKILL: the lease is never given back
    leases = redis_client.zrange(leases_key(HOSTS[2]), 0, -1, withscores=True)
    assert len(leases) == 1
    expires_s = leases[0][1] / 1000

    worker("asyncio", 4)
    after = fetch_url.apply_async((url(HOSTS[2], "/job?n=after"),), queue=queue)

    assert after.get(timeout=RESULT_TIMEOUT_S)["status"] == 200
    times = arrivals(url)[HOSTS[2]]
    assert times[-1] >= expires_s - 0.05  # it went once the lease had expired, not while it was held
    assert redis_client.zcount(leases_key(HOSTS[2]), "-inf", "+inf") <= 1  # the stuck job may have been restored
    stuck.forget()


@pytest.mark.timeout(180)
def test_a_rule_changed_while_workers_run_applies_within_a_second_or_so(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore) -> None:
    rules.set(HOSTS[1], Rule(rate="2/s"))
    two_pools(worker, queue, url)
    slow = [fetch_url.apply_async((url(HOSTS[1], f"/job?n=slow{n}"),), queue=queue) for n in range(3)]
    wait_all(slow)
    assert peak_per_second(arrivals(url)[HOSTS[1]]) <= 2

    rules.set(HOSTS[1], Rule(rate="100/s", burst=10))
    time.sleep(1.5)  # the workers' cached view of the rules is at most a second old
    fast = wait_all([fetch_url.apply_async((url(HOSTS[1], f"/job?n=fast{n}"),), queue=queue) for n in range(30)])
    assert all(r["status"] == 200 for r in fast)
    assert peak_per_second(arrivals(url)[HOSTS[1]][3:]) > 10  # far beyond the old 2/s

    rules.clear(HOSTS[1])
    time.sleep(1.5)
    free = wait_all([fetch_url.apply_async((url(HOSTS[1], f"/job?n=free{n}"),), queue=queue) for n in range(30)])
    assert all(r["status"] == 200 for r in free)
    assert peak_per_second(arrivals(url)[HOSTS[1]][33:]) > 10 + 100 / 100  # no limit at all now


#: a short visibility timeout, so that the jobs a killed worker held come back within the test
FAST_RESTORE_ENV = {"LOOPLINE_VISIBILITY_TIMEOUT_S": "20", "LOOPLINE_TASK_TIME_LIMIT_S": "10",
                    "LOOPLINE_TASK_SOFT_TIME_LIMIT_S": "8", "LOOPLINE_WEBHOOK_BACKOFF_MAX_S": "5",
                    "LOOPLINE_RESTORE_INTERVAL_S": "1"}


@pytest.mark.timeout(240)
def test_no_deferred_job_is_lost_when_a_worker_is_killed_among_them(
        worker: Callable[..., Child], queue: str, url: Callable[[str, str], str], rules: RuleStore) -> None:
    rules.set(HOSTS[1], Rule(rate="5/s"))
    doomed = worker("gevent", SLOTS, env=FAST_RESTORE_ENV)
    worker("asyncio", SLOTS, env=FAST_RESTORE_ENV)
    jobs = [fetch_url.apply_async((url(HOSTS[1], f"/job?n={n}"),), queue=queue) for n in range(30)]
    deadline = time.monotonic() + 60
    while len(arrivals(url).get(HOSTS[1], [])) < 5:  # both workers hold deferred jobs by now
        assert time.monotonic() < deadline
        time.sleep(0.05)
    doomed.kill_tree()

    results = wait_all(jobs)

    assert all(r["status"] == 200 for r in results)
    assert {r["url"] for r in results} == {url(HOSTS[1], f"/job?n={n}") for n in range(30)}
