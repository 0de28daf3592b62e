"""The dead-letter store, the retries-exhausted hook, and ``loopline dlq list|show|replay|purge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from kombu.utils.imports import symbol_by_name

from loopline.bench.procs import Child
from loopline.deadletter import size
from loopline.deadletter.deliveries import count_key
from loopline.deadletter.messages import envelope_problem
from loopline.deadletter.store import RAW_LIMIT_BYTES, DeadLetter, DeadLetterStore, Reason, truncate_raw
from loopline.errors import FetchFailed, WebhookRejected
from tasks import deliver_webhook

CLI_TIMEOUT_S = 60
DLQ_DB = 7  # the CLI tests' own database of the session Redis, emptied before and after


@pytest.fixture
def store(redis_url: str) -> Iterator[DeadLetterStore]:
    url = redis_url.rsplit("/", 1)[0] + f"/{DLQ_DB}"
    with redis.Redis.from_url(url, socket_timeout=10) as client:
        client.flushdb()
        yield DeadLetterStore(client)
        client.flushdb()


def _entry(**changes: object) -> DeadLetter:
    fields: dict[str, object] = {"reason": Reason.POISON, "error": "boom", "task": "tasks.io_sleep",
                                 "task_id": str(uuid.uuid4()), "args": [5], "kwargs": {}, "queue": "q"}
    return DeadLetter(**{**fields, **changes})  # type: ignore[arg-type]


# -- the store --------------------------------------------------------------------------------------------

def test_entries_are_kept_in_order_and_removed(store: DeadLetterStore) -> None:
    first, second = _entry(dead_at=1.0), _entry(dead_at=2.0)
    store.add(second)
    store.add(first)
    assert [e.id for e in store.entries()] == [first.id, second.id]
    assert store.get(first.id) == first
    assert size(store.client) == store.size() == 2
    assert store.remove(first.id) and not store.remove(first.id)
    assert store.purge() == 1
    assert store.size() == 0 and store.get(second.id) is None


def test_an_entry_without_task_id_gets_its_own_id_and_is_not_replayable() -> None:
    entry = DeadLetter(reason=Reason.UNDECODABLE, error="not JSON", raw="garbage")
    assert entry.id.startswith("msg-") and not entry.replayable
    assert DeadLetter.from_json(entry.to_json()) == entry
    assert DeadLetter.from_json(json.dumps({**json.loads(entry.to_json()), "added_later": 1})) == entry


def test_raw_messages_are_truncated() -> None:
    assert truncate_raw(b"short") == "short"
    cut = truncate_raw(b"x" * (RAW_LIMIT_BYTES + 10))
    assert cut is not None and cut.startswith("x" * RAW_LIMIT_BYTES) and f"{RAW_LIMIT_BYTES + 10} bytes" in cut


@pytest.mark.parametrize(("payload", "words"), [
    ([], "not an object"),
    ({"body": ""}, "'properties'"),
    ({"properties": {"delivery_tag": 5, "delivery_info": {}}}, "delivery_tag"),
    ({"properties": {"delivery_tag": "t"}}, "delivery_info"),
    ({"body": "!!", "properties": {"delivery_tag": "t", "body_encoding": "base64",
                                   "delivery_info": {"exchange": "", "routing_key": "q"}}}, "cannot be decoded"),
])
def test_envelope_problems_are_named(payload: object, words: str) -> None:
    import base64

    def decode(body: str, encoding: str | None) -> bytes:
        return base64.b64decode(body, validate=True)

    problem = envelope_problem(payload, decode)
    assert problem is not None and words in problem


# -- retries exhausted ------------------------------------------------------------------------------------

def test_a_job_whose_retries_ran_out_is_dead_lettered_with_its_traceback(
    worker: Callable[..., Child], queue: str, target_url: str, redis_url: str
) -> None:
    worker("threads", 2)
    down = deliver_webhook.apply_async((f"{target_url}/hook/dlq-down?script=502", {"n": 1}), queue=queue)
    rejected = deliver_webhook.apply_async((f"{target_url}/hook/dlq-bad?script=400", {"n": 2}), queue=queue)
    with pytest.raises(FetchFailed, match="answered 502"):
        down.get(timeout=30)
    with pytest.raises(WebhookRejected, match="rejected with 400"):
        rejected.get(timeout=30)
    with redis.Redis.from_url(redis_url, socket_timeout=10) as client:
        dead = DeadLetterStore(client)
        entry = dead.get(down.id)
        assert dead.get(rejected.id) is None  # a plain failure is not a dead letter
        dead.remove(down.id)
    assert entry is not None
    assert entry.reason == Reason.RETRIES_EXHAUSTED
    assert (entry.task, entry.queue) == ("tasks.deliver_webhook", queue)
    assert entry.args == [f"{target_url}/hook/dlq-down?script=502", {"n": 1}]
    assert entry.deliveries == 4 and entry.retries == 3  # LOOPLINE_WEBHOOK_MAX_RETRIES=3 in conftest
    assert "502" in entry.error and entry.traceback and "Traceback" in entry.traceback


# -- loopline dlq -----------------------------------------------------------------------------------------

def dlq(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOOPLINE_BROKER_URL": url, "LOOPLINE_RESULT_BACKEND": ""}
    env.pop("COLUMNS", None)
    return subprocess.run([sys.executable, "-m", "loopline", "dlq", *args], capture_output=True, text=True,
                          env=env, timeout=CLI_TIMEOUT_S, check=False)


def _url(store: DeadLetterStore) -> str:
    kwargs = store.client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{DLQ_DB}"


def test_list_and_show(store: DeadLetterStore) -> None:
    poison = store.add(_entry(error="started 3 times without being acknowledged"))
    garbage = store.add(DeadLetter(reason=Reason.UNDECODABLE, error="the envelope is not JSON", raw="\x00abc"))
    listed = dlq("list", url=_url(store))
    assert listed.returncode == 0, listed.stderr
    assert "dead letters: 2" in listed.stdout and poison.id in listed.stdout and garbage.id in listed.stdout
    lines = dlq("list", "--json", url=_url(store)).stdout.splitlines()
    assert [json.loads(line)["id"] for line in lines] == [poison.id, garbage.id]
    shown = dlq("show", garbage.id, url=_url(store))
    assert json.loads(shown.stdout)["raw"] == "\x00abc"
    missing = dlq("show", "nope", url=_url(store))
    assert missing.returncode == 1 and "no such entry" in missing.stderr


def test_replay_sends_the_job_again_under_its_id(
    store: DeadLetterStore, worker: Callable[..., Child], queue: str
) -> None:
    url = _url(store)
    worker("threads", 2, env={"LOOPLINE_BROKER_URL": url})
    entry = store.add(_entry(queue=queue, args=[7], retries=0))
    store.client.set(count_key(str(entry.task_id), 0), 4)
    garbage = store.add(DeadLetter(reason=Reason.UNDECODABLE, error="not JSON", raw="x", queue=queue))
    refused = dlq("replay", garbage.id, url=url)
    assert refused.returncode == 1 and "cannot replay" in refused.stderr
    replayed = dlq("replay", str(entry.id), url=url)
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {entry.id}" in replayed.stdout
    assert store.get(entry.id) is None and store.client.get(count_key(str(entry.task_id), 0)) is None
    from celery import Celery

    client_app = Celery(broker=url, backend=url, set_as_current=False)
    try:
        assert client_app.AsyncResult(entry.task_id).get(timeout=30)["slept_ms"] == 7
    finally:
        client_app.close()
    assert dlq("replay", "--all", url=url).returncode == 0  # skips what cannot be replayed
    assert store.get(garbage.id) is not None


def test_purge(store: DeadLetterStore) -> None:
    url = _url(store)
    kept, gone = store.add(_entry()), store.add(_entry())
    assert dlq("purge", url=url).returncode == 2  # neither ids nor --all: a usage error
    purged = dlq("purge", gone.id, "missing-id", url=url)
    assert purged.returncode == 1 and "purged 1 entries" in purged.stdout and "missing-id" in purged.stderr
    assert store.get(gone.id) is None and store.get(kept.id) is not None
    assert "purged 1 entries" in dlq("purge", "--all", url=url).stdout
    assert store.size() == 0


# -- settings ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "variable"), [
    ({"LOOPLINE_MAX_DELIVERIES": "0"}, "LOOPLINE_MAX_DELIVERIES"),
    ({"LOOPLINE_RESTORE_INTERVAL_S": "-1"}, "LOOPLINE_RESTORE_INTERVAL_S"),
    ({"LOOPLINE_REDIS_SOCKET_TIMEOUT_S": "0"}, "LOOPLINE_REDIS_SOCKET_TIMEOUT_S"),
    ({"LOOPLINE_MAX_MESSAGE_BYTES": "many"}, "LOOPLINE_MAX_MESSAGE_BYTES"),
    ({"LOOPLINE_MAX_ARG_BYTES": "2000000", "LOOPLINE_MAX_MESSAGE_BYTES": "2000000"}, "LOOPLINE_MAX_MESSAGE_BYTES"),
])
def test_bad_dead_letter_settings_name_their_variable(env: dict[str, str], variable: str) -> None:
    from loopline.settings import ConfigError, Settings

    with pytest.raises(ConfigError, match=variable):
        Settings.from_env(env)


def test_dead_letter_settings_reach_the_app() -> None:
    from config.celery_app import app, settings

    options = app.conf.broker_transport_options
    assert app.conf.broker_transport == "loopline.transport.redis:Transport"
    from loopline.worker.consumer import DeadLetterConsumer

    assert issubclass(symbol_by_name(app.conf.worker_consumer), DeadLetterConsumer)
    assert options["unacked_restore_interval"] == settings.restore_interval_s
    assert options["unacked_restore_throttle"] == 1
    assert options["max_message_bytes"] == settings.max_message_bytes
    assert options["visibility_timeout"] > settings.task_time_limit_s
