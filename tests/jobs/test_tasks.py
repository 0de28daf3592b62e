"""The three tasks end to end: .delay() -> Redis -> a real worker of each pool -> result."""

from __future__ import annotations

import base64
import hashlib
import signal
from collections.abc import Callable

import pytest
import redis
import requests
from celery.exceptions import NotRegistered

from loopline.bench.procs import Child
from loopline.errors import BodyTooLarge, FetchFailed, GuardRefused, InvalidJob, JobTooLarge, WebhookRejected
from loopline.jobs.tasks import _Attempt, _fetch_spec, _webhook_spec
from loopline.jobs.webhook_policy import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from tasks import deliver_webhook, fetch_url, io_sleep

POOLS = ["prefork", "threads", "gevent", "solo"]
RESULT_TIMEOUT_S = 30


@pytest.mark.timeout(120)
@pytest.mark.parametrize("pool", POOLS)
def test_every_task_runs_on_pool_and_worker_stops_cleanly(
    pool: str, worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    child = worker(pool, 1 if pool == "solo" else 4)
    fetched = fetch_url.apply_async((f"{target_url}/job?bytes=1000",), queue=queue)
    hooked = deliver_webhook.apply_async((f"{target_url}/hook/{pool}-basic", {"pool": pool}), queue=queue)
    slept = io_sleep.apply_async((20,), queue=queue)

    page = fetched.get(timeout=RESULT_TIMEOUT_S)
    assert page["status"] == 200
    assert page["bytes"] == 1000
    assert page["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    assert page["content_type"] == "application/octet-stream"
    assert page["final_url"] == page["url"] == f"{target_url}/job?bytes=1000"
    assert page["finished_at"] >= page["started_at"]
    assert hooked.get(timeout=RESULT_TIMEOUT_S)["status"] == 200
    assert slept.get(timeout=RESULT_TIMEOUT_S)["slept_ms"] == 20

    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0
    log = child.log_text()
    assert "Traceback" not in log, log[-3000:]


def test_fetch_follows_redirects_and_reports_final_url(
    worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    worker("threads", 2)
    result = fetch_url.apply_async((f"{target_url}/redirect?to=/job%3Fbytes%3D7",), queue=queue).get(timeout=30)
    assert result["final_url"] == f"{target_url}/job?bytes=7"
    assert result["bytes"] == 7


@pytest.mark.parametrize("pool", ["threads", "asyncio"])  # the sync and the async HTTP bodies
def test_redirect_to_a_guarded_address_fails_and_says_why(
    pool: str, worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    worker(pool, 2)
    # Loopback but not the allowlisted 127.0.0.1, and nothing listens on port 9: were the per-hop check to
    # regress, the worker would get "connection refused" from this machine, never reach another one.
    res = fetch_url.apply_async((f"{target_url}/redirect?to=http://127.0.0.2:9/latest/",), queue=queue)
    with pytest.raises(GuardRefused, match=r"refused http://127\.0\.0\.2:9/latest/: .*loopback"):
        res.get(timeout=30)
    assert res.state == "FAILURE"


def test_body_over_max_bytes_fails_and_worker_keeps_serving(
    worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    worker("threads", 2)
    big = fetch_url.apply_async((f"{target_url}/job?bytes=5000",), {"max_bytes": 1000}, queue=queue)
    with pytest.raises(BodyTooLarge, match="max_bytes=1000"):
        big.get(timeout=30)
    assert fetch_url.apply_async((f"{target_url}/job",), queue=queue).get(timeout=30)["status"] == 200


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("ftp://127.0.0.1/x",), {}, "scheme"),
        (("not a url",), {}, "not a url"),
        (("http://10.0.0.1/",), {}, "10.0.0.1"),
        (("http://127.0.0.1/",), {"method": "BREW"}, "method"),
        (("http://127.0.0.1/",), {"timeout_s": -1}, "timeout_s"),
        (("http://127.0.0.1/",), {"headers": {"a": 1}}, "headers"),
        (("http://127.0.0.1/",), {"max_bytes": 0.5}, "max_bytes"),
        (("http://127.0.0.1/",), {"max_bytes": 0}, "max_bytes"),
        (("http://127.0.0.1/",), {"timeout_s": float("nan")}, "not JSON-serialisable"),
    ],
)
def test_bad_fetch_input_fails_at_delay(
    args: tuple[object, ...], kwargs: dict[str, object], message: str, queue: str, redis_client: redis.Redis
) -> None:
    with pytest.raises(InvalidJob, match=message):
        fetch_url.apply_async(args, kwargs, queue=queue)
    assert redis_client.llen(queue) == 0  # nothing was sent (a worker would fetch it)


def test_non_json_argument_fails_at_delay() -> None:
    with pytest.raises(InvalidJob, match="JSON"):
        deliver_webhook.delay("http://127.0.0.1/", {"when": object()})


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_webhook_payload_with_nan_or_infinity_fails_at_delay(value: float, queue: str,
                                                              redis_client: redis.Redis) -> None:
    with pytest.raises(InvalidJob, match="JSON"):
        deliver_webhook.apply_async(("http://127.0.0.1/", value), queue=queue)
    with pytest.raises(InvalidJob, match="JSON"):
        deliver_webhook.apply_async(("http://127.0.0.1/", {"a": [value]}), queue=queue)
    assert redis_client.llen(queue) == 0


def test_a_webhook_payload_nested_too_deeply_fails_at_delay(queue: str, redis_client: redis.Redis) -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(InvalidJob, match="nested too deeply"):
        deliver_webhook.apply_async(("http://127.0.0.1/", deep), queue=queue)
    assert redis_client.llen(queue) == 0


def test_a_whole_number_of_bytes_as_a_float_is_accepted() -> None:
    assert _fetch_spec(fetch_url, "http://127.0.0.1/", max_bytes=1000.0).max_bytes == 1000


def test_oversized_arguments_fail_at_delay() -> None:
    with pytest.raises(JobTooLarge, match="LOOPLINE_MAX_ARG_BYTES"):
        deliver_webhook.delay("http://127.0.0.1/", {"blob": "x" * (2 * 1024 * 1024)})


def test_bad_sleep_and_missing_argument_fail_at_delay() -> None:
    with pytest.raises(InvalidJob, match="ms must be"):
        io_sleep.delay(-5)
    with pytest.raises(TypeError):
        fetch_url.delay()


def test_unknown_task_fails_with_not_registered_and_worker_keeps_serving(
    worker: Callable[..., Child], queue: str
) -> None:
    from config.celery_app import app

    worker("threads", 2)
    res = app.send_task("tasks.no_such_task", args=(1,), queue=queue)
    with pytest.raises(NotRegistered, match="no_such_task"):
        res.get(timeout=30)
    assert io_sleep.apply_async((1,), queue=queue).get(timeout=30)["slept_ms"] == 1


def test_invalid_message_that_bypassed_delay_fails_in_worker(worker: Callable[..., Child], queue: str) -> None:
    from config.celery_app import app

    worker("threads", 2)
    res = app.send_task("tasks.fetch_url", args=("gopher://127.0.0.1/",), queue=queue)
    with pytest.raises(InvalidJob, match="scheme"):
        res.get(timeout=30)


def _attempts(target_url: str, key: str) -> list[dict[str, object]]:
    with requests.get(f"{target_url}/hook/{key}", timeout=5) as response:
        return response.json()


def test_webhook_signature_verifies_on_the_receiver(
    worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    worker("threads", 2)
    key = "signed"
    deliver_webhook.apply_async((f"{target_url}/hook/{key}", {"b": 2, "a": 1}), {"secret": "s3cret"},
                                queue=queue).get(timeout=30)
    (attempt,) = _attempts(target_url, key)
    headers = attempt["headers"]
    assert isinstance(headers, dict)
    body = base64.b64decode(str(attempt["body_b64"]))
    assert body == b'{"a":1,"b":2}'
    assert verify("s3cret", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])
    assert not verify("wrong", headers[TIMESTAMP_HEADER], body, headers[SIGNATURE_HEADER])


def test_webhook_500_then_200_is_retried(worker: Callable[..., Child], queue: str, target_url: str) -> None:
    worker("gevent", 10)
    result = deliver_webhook.apply_async((f"{target_url}/hook/flaky?script=500,503,200", {}), queue=queue)
    assert result.get(timeout=30)["attempts"] == 3
    assert len(_attempts(target_url, "flaky")) == 3


def test_webhook_400_is_not_retried(worker: Callable[..., Child], queue: str, target_url: str) -> None:
    worker("threads", 2)
    result = deliver_webhook.apply_async((f"{target_url}/hook/bad?script=400,200", {}), queue=queue)
    with pytest.raises(WebhookRejected, match="400"):
        result.get(timeout=30)
    assert len(_attempts(target_url, "bad")) == 1


def test_webhook_redirect_is_not_followed_nor_retried(
    worker: Callable[..., Child], queue: str, target_url: str
) -> None:
    worker("asyncio", 2)
    result = deliver_webhook.apply_async((f"{target_url}/hook/moved?script=301,200", {}), queue=queue)
    with pytest.raises(WebhookRejected, match="answered 301, a redirect"):
        result.get(timeout=30)
    assert len(_attempts(target_url, "moved")) == 1


def test_webhook_to_an_address_the_guard_refuses_at_run_time_is_not_retried() -> None:
    attempt = _Attempt(_webhook_spec(deliver_webhook, "http://hooks.example/x", {"a": 1}))
    refused = GuardRefused("refused http://hooks.example/x: 10.0.0.5 is a private address")
    with pytest.raises(WebhookRejected, match="10.0.0.5 is a private address; not retried"):
        attempt.settle(deliver_webhook, refused)  # raises before it would look at the task's retries


def test_webhook_gives_up_after_max_retries(worker: Callable[..., Child], queue: str, target_url: str) -> None:
    worker("threads", 2)
    result = deliver_webhook.apply_async((f"{target_url}/hook/down?script=502", {}), queue=queue)
    with pytest.raises(FetchFailed, match="answered 502"):
        result.get(timeout=30)
    assert len(_attempts(target_url, "down")) == 1 + 3  # LOOPLINE_WEBHOOK_MAX_RETRIES=3 in conftest


def test_webhook_429_waits_for_retry_after(worker: Callable[..., Child], queue: str, target_url: str) -> None:
    worker("threads", 2)
    result = deliver_webhook.apply_async((f"{target_url}/hook/slowdown?script=429,200&retry_after=2", {}),
                                         queue=queue)
    assert result.get(timeout=30)["attempts"] == 2
    first, second = _attempts(target_url, "slowdown")
    # A lower bound on the wait the server asked for (backoff alone would retry after ~0.05 s).
    assert float(str(second["time"])) - float(str(first["time"])) >= 1.9
