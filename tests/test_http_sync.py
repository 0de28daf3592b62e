"""loopline.jobs.http_sync: how a URL-guard refusal reaches the tasks (the HTTP itself runs in test_definitions)."""

from __future__ import annotations

import pytest

from loopline.errors import FetchFailed, GuardRefused
from loopline.jobs import http_sync
from loopline.jobs.tasks import _fetch_spec
from loopline.jobs.urlguard import HostUnresolvable, UrlRefused

URL = "http://hooks.example/x"


def _raising(exc: Exception):  # type: ignore[no-untyped-def]
    def resolve(*_: object, **__: object) -> None:
        raise exc
    return resolve


def test_an_address_the_guard_refuses_is_a_guard_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_sync, "resolve_and_check", _raising(UrlRefused(URL, "10.0.0.5 is a private address")))
    with pytest.raises(GuardRefused, match="10.0.0.5 is a private address"):
        http_sync._guard(URL, _fetch_spec(URL))


def test_a_host_that_does_not_resolve_is_a_plain_fetch_failure_worth_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_sync, "resolve_and_check", _raising(HostUnresolvable(URL, "host does not resolve")))
    with pytest.raises(FetchFailed, match="does not resolve") as raised:
        http_sync._guard(URL, _fetch_spec(URL))
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
