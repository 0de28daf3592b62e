"""loopline.jobs.http_async: how a URL-guard refusal reaches the tasks (the HTTP itself runs in test_asyncio_pool)."""

from __future__ import annotations

import asyncio

import pytest

from loopline.errors import FetchFailed, GuardRefused
from loopline.jobs import http_async
from loopline.jobs.tasks import _fetch_spec
from loopline.jobs.urlguard import HostUnresolvable, UrlRefused

URL = "http://hooks.example/x"


def _raising(exc: Exception):  # type: ignore[no-untyped-def]
    async def resolve(*_: object, **__: object) -> None:
        raise exc
    return resolve


def test_an_address_the_guard_refuses_is_a_guard_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_async, "aresolve_and_check", _raising(UrlRefused(URL, "10.0.0.5 is a private address")))
    with pytest.raises(GuardRefused, match="10.0.0.5 is a private address"):
        asyncio.run(http_async._guard(URL, _fetch_spec(URL)))


def test_a_literal_address_is_refused_before_any_lookup() -> None:
    with pytest.raises(GuardRefused, match="10.0.0.5"):
        asyncio.run(http_async._guard("http://10.0.0.5/", _fetch_spec(URL)))


def test_a_host_that_does_not_resolve_is_a_plain_fetch_failure_worth_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_async, "aresolve_and_check", _raising(HostUnresolvable(URL, "host does not resolve")))
    with pytest.raises(FetchFailed, match="does not resolve") as raised:
        asyncio.run(http_async._guard(URL, _fetch_spec(URL)))
    assert not isinstance(raised.value, GuardRefused)
