"""loopline.app.task: what a producer sees when Redis cannot be reached, and async enqueueing of one job."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap

import async_tasks
import pytest
from kombu.exceptions import OperationalError

from config.celery_app import settings
from loopline.errors import InvalidJob, RedisUnavailable
from tasks import io_sleep

# A producer process whose Redis is a closed loopback port; fewer retries than the app's 20 keep it short.
PRODUCER = textwrap.dedent("""
    import json, sys
    from config.celery_app import app
    app.conf.result_backend_max_retries = 2
    from tasks import io_sleep
    from loopline.errors import RedisUnavailable
    try:
        io_sleep.delay(1)
    except RedisUnavailable as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc),
                          "operational": isinstance(exc, __import__("kombu").exceptions.OperationalError)}))
        sys.exit(0)
    sys.exit("no error")
""")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_delay_without_redis_raises_one_error_that_names_the_url_and_says_nothing_was_sent() -> None:
    port = _closed_port()
    env = {**os.environ, "LOOPLINE_BROKER_URL": f"redis://:secret@127.0.0.1:{port}/0"}
    env.pop("LOOPLINE_RESULT_BACKEND", None)
    done = subprocess.run([sys.executable, "-c", PRODUCER], env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] == "RedisUnavailable"
    assert report["operational"] is True  # code that catches kombu's OperationalError keeps working
    message = report["message"]
    assert message.startswith("tasks.io_sleep: cannot reach redis://:**@127.0.0.1:")
    assert f":{port}/0" in message and "the job was not sent" in message
    assert "secret" not in message
    assert "must be restarted" not in message


def test_redis_unavailable_is_a_kombu_operational_error() -> None:
    assert issubclass(RedisUnavailable, OperationalError)


@pytest.mark.parametrize("bad", [-1, "soon"])
def test_delay_async_validates_before_sending(bad: object) -> None:
    with pytest.raises(InvalidJob, match=r"ms must be a number in \[0, 3600000\]"):
        asyncio.run(io_sleep.delay_async(bad))


def test_a_task_that_sets_one_time_limit_gets_no_default_for_the_other(queue: str) -> None:
    defaults = (settings.task_time_limit_s, settings.task_soft_time_limit_s)
    assert (io_sleep.time_limit, io_sleep.soft_time_limit) == defaults  # sets neither: both defaults
    assert (async_tasks.soft_cleanup.time_limit, async_tasks.soft_cleanup.soft_time_limit) == (3, 1)
    assert (async_tasks.hard_limit_only.time_limit, async_tasks.hard_limit_only.soft_time_limit) == (1, None)
    assert (async_tasks.soft_limit_only.time_limit, async_tasks.soft_limit_only.soft_time_limit) == (None, 400)
    # Sent to a queue no worker reads: what matters is that Celery's limit check in apply_async passes.
    assert async_tasks.hard_limit_only.apply_async(queue=queue).id
    assert async_tasks.soft_limit_only.apply_async((1,), queue=queue).id


@pytest.mark.parametrize("fields", [
    {"id": "t1", "retries": 2, "delivery_info": {"routing_key": "q"}},
    {"id": "t2", "custom": "a header of the sender's", "timelimit": [30, 20]},
    {"id": "t3", "timelimit": None, "headers": {"x": 1}},
])
def test_the_request_a_task_call_pushes_is_the_one_celery_pushes(fields: dict[str, object]) -> None:
    """LooplineTask.__call__ copies the tracer's request as Task.push_request would, without Context.__init__."""
    from celery.app.task import Context

    from loopline.app.task import _request_copy

    parent = Context(fields, args=[1], called_directly=False, kwargs={"a": 1})
    args, kwargs = (2,), {"b": 2}
    copy = _request_copy(parent, args, kwargs)
    assert copy.__dict__ == Context(**{**parent.__dict__, "args": args, "kwargs": kwargs}).__dict__
    copy.retries = 99  # the body's changes stay in its copy, as with Celery's
    assert parent.retries != 99
