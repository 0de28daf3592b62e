"""Rules: parsing and validating N/s|N/m|N/h, the store in Redis, the settings' defaults, and the per-process
cache that spares a deployment without rules any Redis round trip per request."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery

from loopline.politeness import Rule, RuleError, RuleStore, host_of, host_slot, parse_rate
from loopline.politeness import engine as engine_module
from loopline.politeness.engine import PolitenessUnavailable, engine_for, redis_url_of
from loopline.politeness.keys import PREFIX, waiting_key
from loopline.settings import ConfigError, Settings


@pytest.fixture
def store(redis_client: redis.Redis) -> Iterator[RuleStore]:
    yield RuleStore(redis_client)
    keys = list(redis_client.scan_iter(match=PREFIX + "*"))
    if keys:
        redis_client.delete(*keys)


@pytest.mark.parametrize(("text", "parsed"), [("5/s", (5.0, "s")), ("300/m", (300.0, "m")), ("0.5/s", (0.5, "s")),
                                              (" 2 / h ", (2.0, "h"))])
def test_rates_parse(text: str, parsed: tuple[float, str]) -> None:
    assert parse_rate(text) == parsed


@pytest.mark.parametrize(("text", "reason"), [("5", "must look like N/s, N/m or N/h"), ("5/d", "N/s, N/m or N/h"),
                                              ("-1/s", "must look like"), ("0/s", "above 0"), ("five/s", "must look"),
                                              ("", "must look like")])
def test_bad_rates_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(RuleError, match=reason):
        parse_rate(text)


@pytest.mark.parametrize(("kwargs", "reason"), [
    ({}, "needs a rate"), ({"concurrency": -1}, "concurrency must be"), ({"rate": "5/s", "burst": -2}, "burst must"),
    ({"concurrency": 3, "burst": 2}, "burst only applies to a rate"), ({"rate": "5/x"}, "N/s, N/m or N/h"),
])
def test_bad_rules_are_refused_with_the_reason(kwargs: dict[str, object], reason: str) -> None:
    with pytest.raises(RuleError, match=reason):
        Rule(**kwargs)  # type: ignore[arg-type]


def test_the_key_is_the_host_name_lowercased_without_port() -> None:
    assert host_of("https://API.Example.COM:8443/x?y=1") == "api.example.com"
    assert host_of("Example.com") == "example.com"
    assert host_of("http://[::1]:80/") == "::1"
    with pytest.raises(RuleError, match="not a host name"):
        host_of("exa mple.com")


def test_rules_round_trip_through_redis(store: RuleStore) -> None:
    store.set("Example.com", Rule(rate="5/s", concurrency=4))
    store.set("https://api.partner.io/v1", Rule(rate="300/m", burst=10))
    assert store.all() == {"example.com": Rule(rate="5/s", concurrency=4),
                           "api.partner.io": Rule(rate="300/m", burst=10)}
    assert store.clear("example.com") is True
    assert store.clear("example.com") is False
    assert set(store.all()) == {"api.partner.io"}


def test_default_rules_come_from_settings_and_bad_ones_fail_naming_the_variable() -> None:
    settings = Settings.from_env({"LOOPLINE_DEFAULT_HOST_RATE": "10/s", "LOOPLINE_DEFAULT_HOST_CONCURRENCY": "8",
                                  "LOOPLINE_FETCH_MAX_RETRIES": "2"})
    assert (settings.default_host_rate, settings.default_host_concurrency, settings.fetch_max_retries) == (
        "10/s", 8, 2)
    with pytest.raises(ConfigError, match="LOOPLINE_DEFAULT_HOST_RATE: rate '10/d' must look like"):
        Settings.from_env({"LOOPLINE_DEFAULT_HOST_RATE": "10/d"})
    with pytest.raises(ConfigError, match="LOOPLINE_DEFAULT_HOST_CONCURRENCY must be >= 0"):
        Settings.from_env({"LOOPLINE_DEFAULT_HOST_CONCURRENCY": "-1"})
    with pytest.raises(ConfigError, match="LOOPLINE_FETCH_MAX_RETRIES must be >= 0"):
        Settings.from_env({"LOOPLINE_FETCH_MAX_RETRIES": "-1"})


class _App:
    class conf:  # noqa: N801 - stands for a Celery app's conf
        broker_url = "amqp://guest@localhost//"


def test_a_broker_that_is_not_redis_is_refused_clearly() -> None:
    with pytest.raises(PolitenessUnavailable, match="live in the broker's Redis, but the broker is amqp://"):
        redis_url_of(_App())


def _commands(client: redis.Redis) -> int:
    return int(client.info("stats")["total_commands_processed"])


@pytest.fixture
def app(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Celery]:
    monkeypatch.setattr(engine_module, "REFRESH_S", 3600.0)  # counted here: round trips per request, not per second
    app = Celery("politeness-test", broker=redis_url, set_as_current=False)
    yield app
    engine_for(app).close()
    app.close()


def test_without_rules_a_request_costs_no_redis_round_trip(app: Celery, redis_client: redis.Redis,
                                                           store: RuleStore) -> None:
    url = f"http://h{uuid.uuid4().hex[:6]}.test/x"
    with host_slot(url, app=app):  # the first one reads the rules
        pass
    before = _commands(redis_client)
    for _ in range(200):
        with host_slot(url, app=app):
            pass
    assert _commands(redis_client) - before == 1  # INFO itself


def test_a_rule_is_seen_at_the_next_refresh_and_then_costs_one_call_per_request(
        app: Celery, redis_client: redis.Redis, store: RuleStore) -> None:
    host = f"h{uuid.uuid4().hex[:6]}.test"
    with host_slot(f"http://{host}/x", app=app):
        pass
    store.set(host, Rule(rate="1000/s", burst=1000))
    engine_for(app).snapshot.fetched_at -= 3600.0  # as if the refresh interval had passed
    with host_slot(f"http://{host}/x", app=app):
        pass
    before = _script_calls(redis_client)
    for _ in range(50):
        with host_slot(f"http://{host}/x", app=app):
            pass
    assert _script_calls(redis_client) - before == 50  # a rate without a concurrency cap: nothing to give back


def _script_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


def test_with_a_broker_that_is_not_redis_requests_go_free_unless_a_default_rule_asks_for_limits() -> None:
    plain = Celery("politeness-amqp", broker="amqp://guest@127.0.0.1:9//", set_as_current=False)
    with host_slot("http://example.com/", app=plain):  # nothing to connect to, and nothing tried
        pass
    limited = Celery("politeness-amqp-limited", broker="amqp://guest@127.0.0.1:9//", set_as_current=False)
    limited.conf.loopline_default_host_rate = "5/s"
    with pytest.raises(PolitenessUnavailable, match="but the broker is amqp://"), host_slot("http://example.com/",
                                                                                           app=limited):
        pass
    plain.close()
    limited.close()


def test_the_async_slot_holds_a_concurrency_lease_until_it_is_left(
        app: Celery, store: RuleStore, redis_client: redis.Redis) -> None:
    host = f"h{uuid.uuid4().hex[:6]}.test"
    store.set(host, Rule(concurrency=1))

    async def scenario() -> None:
        first_in, second_in, release_first = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def first() -> None:
            async with host_slot(f"http://{host}/a", app=app):
                first_in.set()
                await release_first.wait()

        async def second() -> None:
            await first_in.wait()
            async with host_slot(f"http://{host}/b", app=app):
                second_in.set()

        tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
        for _ in range(1000):  # until the second slot has been told to wait (a state, not a time)
            if redis_client.zcard(waiting_key(host)) == 1:
                break
            await asyncio.sleep(0.01)
        assert redis_client.zcard(waiting_key(host)) == 1 and not second_in.is_set()
        release_first.set()
        await asyncio.gather(*tasks)
        assert second_in.is_set()
        await engine_for(app).aclose()

    asyncio.run(scenario())


def test_hundreds_of_coroutines_share_the_clients_connections_and_wait_for_one(
        app: Celery, store: RuleStore) -> None:
    host = f"h{uuid.uuid4().hex[:6]}.test"
    store.set(host, Rule(rate="1000000/s", burst=1000))
    entered = 0

    async def one() -> None:
        nonlocal entered
        async with host_slot(f"http://{host}/x", app=app):
            entered += 1

    async def scenario() -> None:
        await one()  # the rules are read: from here on every slot goes straight to its script call
        await asyncio.gather(*(one() for _ in range(600)))
        await engine_for(app).aclose()

    asyncio.run(scenario())
    assert entered == 601
