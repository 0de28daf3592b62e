"""tasks.http_async: how a refusal by the URL guard reaches the tasks (the HTTP itself runs in test_asyncio_pool).

Names answer from the scripted DNS of tests/rebind_stub.py; nothing resolves a real name or connects anywhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Iterator
from typing import Any

import pytest
from rebind_stub import StubDns

from loopline.concurrency import loop_resources
from loopline.errors import FetchFailed, GuardRefused
from loopline.jobs import http_async
from loopline.jobs.tasks import _fetch_spec
from tasks import fetch_url

URL = "http://hooks.test/x"


@pytest.fixture
def dns() -> Iterator[StubDns]:
    stub = StubDns({"hooks.test": [["10.0.0.5"]]})
    uninstall = stub.install()
    yield stub
    uninstall()


def _run(coroutine: Awaitable[Any]) -> Any:
    async def main() -> Any:
        try:
            return await coroutine
        finally:
            await loop_resources.shutdown()

    return asyncio.run(main())


def test_an_address_the_guard_refuses_is_a_guard_refusal(dns: StubDns) -> None:
    with pytest.raises(GuardRefused, match="refused http://hooks.test/x: 10.0.0.5 is a private address"):
        _run(http_async.fetch(_fetch_spec(fetch_url, URL)))
    assert dns.lookups == [("hooks.test", "guard")]


def test_a_literal_address_is_refused_before_any_lookup(dns: StubDns) -> None:
    # as a redirect hop would be: the spec itself refuses a guarded literal when the job is built
    with pytest.raises(GuardRefused, match="10.0.0.5"):
        _run(http_async.fetch(dataclasses.replace(_fetch_spec(fetch_url, URL), url="http://10.0.0.5/")))
    assert dns.lookups == []


def test_a_host_that_does_not_resolve_is_a_plain_fetch_failure_worth_retrying(dns: StubDns) -> None:
    with pytest.raises(FetchFailed, match="nowhere.test") as raised:
        _run(http_async.fetch(_fetch_spec(fetch_url, "http://nowhere.test/x")))
    assert not isinstance(raised.value, GuardRefused)
