"""tasks.http_sync: how a refusal by the URL guard reaches the tasks (the HTTP itself runs in test_definitions).

Names answer from the scripted DNS of tests/rebind_stub.py; nothing resolves a real name or connects anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from rebind_stub import StubDns

from loopline.errors import FetchFailed, GuardRefused
from loopline.jobs import http_sync
from loopline.jobs.tasks import _fetch_spec
from tasks import fetch_url

URL = "http://hooks.test/x"


@pytest.fixture
def dns() -> Iterator[StubDns]:
    stub = StubDns({"hooks.test": [["10.0.0.5"]]})
    uninstall = stub.install()
    yield stub
    uninstall()
    http_sync.close_sessions()


def test_an_address_the_guard_refuses_is_a_guard_refusal(dns: StubDns) -> None:
    with pytest.raises(GuardRefused, match="10.0.0.5 is a private address"):
        http_sync.fetch(_fetch_spec(fetch_url, URL))
    assert dns.lookups == [("hooks.test", "guard")]


def test_a_literal_address_is_refused_before_any_lookup(dns: StubDns) -> None:
    # as a redirect hop would be: the spec itself refuses a guarded literal when the job is built
    with pytest.raises(GuardRefused, match="10.0.0.5"):
        http_sync.fetch(dataclasses.replace(_fetch_spec(fetch_url, URL), url="http://10.0.0.5/"))
    assert dns.lookups == []


def test_a_host_that_does_not_resolve_is_a_plain_fetch_failure_worth_retrying(dns: StubDns) -> None:
    with pytest.raises(FetchFailed, match="host nowhere.test does not resolve") as raised:
        http_sync.fetch(_fetch_spec(fetch_url, "http://nowhere.test/x"))
    assert not isinstance(raised.value, GuardRefused)


def test_jobs_in_new_threads_reuse_one_session(monkeypatch: pytest.MonkeyPatch, target_url: str) -> None:
    # The gevent pool runs every task in a new greenlet: a session per thread (greenlet) was a new session,
    # connection pool and TCP connection per job.
    import threading

    import requests

    from config.celery_app import app
    from loopline.jobs.specs import FetchRequest
    from loopline.settings import settings_for

    created: list[object] = []

    class Counted(requests.Session):
        def __init__(self) -> None:
            super().__init__()
            created.append(self)

    monkeypatch.setattr(http_sync.requests, "Session", Counted)
    monkeypatch.setenv("LOOPLINE_URL_ALLOWLIST", "127.0.0.1")
    spec = FetchRequest.build(settings_for(app), f"{target_url}/job", "GET", None, 5, None)
    statuses: list[int] = []
    for _ in range(4):
        thread = threading.Thread(target=lambda: statuses.append(http_sync.fetch(spec).status))
        thread.start()
        thread.join(30)
    assert statuses == [200] * 4 and len(created) <= 1
