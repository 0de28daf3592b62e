"""The atomic fetch script (loopline/transport/fetch.py) against a real Redis: what it takes, in which order, and
how it records each message as unacked in the format kombu restores from."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from loopline.transport.fetch import MAX_BATCH, POP_SCRIPT, supports_atomic_fetch

NOW = 1_700_000_000.5


@pytest.fixture
def client(redis_client: redis.Redis) -> redis.Redis:
    return redis_client


@pytest.fixture
def keys() -> dict[str, str]:
    prefix = f"fetch-test.{uuid.uuid4().hex[:8]}"
    return {"high": f"{prefix}.high", "low": f"{prefix}.low", "unacked": f"{prefix}.unacked",
            "index": f"{prefix}.unacked_index"}


def entry(queue: str, tag: str) -> bytes:
    return json.dumps({"body": "e30=", "headers": {}, "properties": {
        "delivery_tag": tag, "delivery_info": {"exchange": "", "routing_key": queue}}}).encode()


def pop(client: redis.Redis, keys: dict[str, str], wanted: int, limit: int = 0) -> list[tuple[str, bytes, int]]:
    """(key, entry, 1 if recorded else 0) per entry taken; checks that a recorded entry comes with its tag."""
    reply = client.eval(POP_SCRIPT, 4, keys["high"], keys["low"], keys["unacked"], keys["index"], NOW, limit, wanted)
    if not reply:
        return []
    taken = []
    for at in range(0, len(reply), 3):
        key, raw, recorded = reply[at:at + 3]
        if isinstance(recorded, bytes):
            assert recorded.decode() == json.loads(raw)["properties"]["delivery_tag"]
        else:
            assert recorded == 0
        taken.append((key.decode(), raw, int(isinstance(recorded, bytes))))
    return taken


def test_takes_up_to_the_credit_oldest_first_and_records_each_as_unacked(
    client: redis.Redis, keys: dict[str, str]
) -> None:
    for n in range(5):
        client.lpush(keys["high"], entry("high", f"t{n}"))  # LPUSH as kombu's _put: the oldest is rightmost

    taken = pop(client, keys, wanted=3)

    assert [json.loads(raw)["properties"]["delivery_tag"] for _, raw, _ in taken] == ["t0", "t1", "t2"]
    assert all(recorded == 1 for _, _, recorded in taken)
    assert client.llen(keys["high"]) == 2
    # kombu.transport.redis.QoS.restore_by_tag reads [payload, exchange, routing_key] and the index score.
    stored = json.loads(client.hget(keys["unacked"], "t1") or b"null")
    assert stored == [json.loads(entry("high", "t1")), "", "high"]
    assert client.zscore(keys["index"], "t1") == NOW
    assert client.hlen(keys["unacked"]) == 3


def test_drains_higher_priority_keys_first_and_moves_on_to_the_next(
    client: redis.Redis, keys: dict[str, str]
) -> None:
    client.lpush(keys["high"], entry("high", "h0"))
    client.lpush(keys["low"], entry("low", "l0"), entry("low", "l1"))

    taken = pop(client, keys, wanted=MAX_BATCH)

    assert [(key, json.loads(raw)["properties"]["delivery_tag"]) for key, raw, _ in taken] == [
        (keys["high"], "h0"), (keys["low"], "l0"), (keys["low"], "l1")]
    assert pop(client, keys, wanted=MAX_BATCH) == []


def test_bad_entries_are_handed_back_unrecorded_without_stopping_the_batch(
    client: redis.Redis, keys: dict[str, str]
) -> None:
    oversized = entry("high", "big") + b" " * 500
    for raw in (entry("high", "ok0"), b"not json", json.dumps({"properties": {}}).encode(), oversized,
                entry("high", "ok1")):
        client.lpush(keys["high"], raw)

    taken = pop(client, keys, wanted=10, limit=400)

    assert [recorded for _, _, recorded in taken] == [1, 0, 0, 0, 1]
    assert taken[1][1] == b"not json"
    assert sorted(key.decode() for key in client.hkeys(keys["unacked"])) == ["ok0", "ok1"]
    assert client.llen(keys["high"]) == 0


def test_an_entry_only_lua_can_parse_comes_back_with_the_tag_it_was_recorded_under(
    client: redis.Redis, keys: dict[str, str]
) -> None:
    # cjson reads 01 as 1; Python's json refuses it. The client unrecords such an entry by the returned tag.
    raw = b'{"body": "e30=", "headers": {"retries": 01}, "properties": {"delivery_tag": "odd", ' \
          b'"delivery_info": {"exchange": "", "routing_key": "high"}}}'
    client.lpush(keys["high"], raw)
    reply = client.eval(POP_SCRIPT, 4, keys["high"], keys["low"], keys["unacked"], keys["index"], NOW, 0, 5)
    assert reply == [keys["high"].encode(), raw, b"odd"]
    with pytest.raises(ValueError):
        json.loads(raw)


def test_an_empty_queue_returns_nothing(client: redis.Redis, keys: dict[str, str]) -> None:
    assert pop(client, keys, wanted=5) == []
    assert client.hlen(keys["unacked"]) == 0


@pytest.mark.parametrize(("version", "atomic"), [("7.2.4", True), ("6.2.0", True), ("6.0.16", False),
                                                 ("5.0.7", False), ("garbage", False)])
def test_atomic_fetch_needs_blmove(version: str, atomic: bool) -> None:
    assert supports_atomic_fetch(version) is atomic
