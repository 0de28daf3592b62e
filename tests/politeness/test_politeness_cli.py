"""``loopline limits``: set, list and clear against the session's Redis; bad rules refused with the reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from loopline.politeness import Rule, RuleStore
from loopline.politeness.keys import PREFIX

CLI_TIMEOUT_S = 60


def limits(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "loopline", "limits", *args], capture_output=True, text=True,
                          env=env, timeout=CLI_TIMEOUT_S, start_new_session=True)


@pytest.fixture
def store(redis_client: redis.Redis) -> Iterator[RuleStore]:
    yield RuleStore(redis_client)
    keys = list(redis_client.scan_iter(match=PREFIX + "*"))
    if keys:
        redis_client.delete(*keys)


def test_set_list_and_clear(store: RuleStore) -> None:
    done = limits("set", "Example.com", "5/s", "--concurrency", "4")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "example.com: 5/s, 4 in flight" in done.stdout
    assert limits("set", "https://api.partner.io/v2", "300/m", "--burst", "20").returncode == 0
    assert store.all() == {"example.com": Rule(rate="5/s", concurrency=4),
                           "api.partner.io": Rule(rate="300/m", burst=20)}

    table = limits("list")
    assert table.returncode == 0, table.stdout + table.stderr
    assert "example.com" in table.stdout and "300/m +20 burst" in table.stdout
    rows = [json.loads(line) for line in limits("list", "--json").stdout.splitlines()]
    # Other tests' requests share the session's Redis: hosts they were limited or paused on are listed too.
    assert {row["host"]: row["rule"] for row in rows if row["rule"] is not None} == {
        "api.partner.io": {"rate": "300/m", "burst": 20, "concurrency": 0},
        "example.com": {"rate": "5/s", "burst": 0, "concurrency": 4}}
    assert all(row["in_flight"] == 0 and row["paused_until"] is None for row in rows if row["rule"] is not None)

    assert limits("clear", "example.com").returncode == 0
    missing = limits("clear", "example.com")
    assert (missing.returncode, missing.stderr.strip()) == (1, "example.com: no rule")
    assert set(store.all()) == {"api.partner.io"}


@pytest.mark.parametrize(("args", "reason"), [
    (("example.com", "5/x"), "rate '5/x' must look like N/s, N/m or N/h"),
    (("example.com", "0/m"), "N must be above 0"),
    (("example.com",), "a rule needs a rate"),
    (("example.com", "5/s", "--burst", "-1"), "burst must be a whole number"),
    (("example.com", "--concurrency", "-3"), "concurrency must be a whole number"),
    (("exa mple.com", "5/s"), "is not a host name or URL"),
])
def test_bad_rules_are_refused_with_the_reason(store: RuleStore, args: tuple[str, ...], reason: str) -> None:
    done = limits("set", *args)
    assert done.returncode == 2
    assert reason in " ".join((done.stdout + done.stderr).split())
    assert store.all() == {}
