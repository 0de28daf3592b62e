"""The Celery app's defaults, and the per-pool sizing that keeps high concurrency from exhausting connections."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable

import pytest
from celery import Celery
from waiting import wait_until

from config.celery_app import app, settings
from loopline.app.install import apply_profile
from loopline.bench.procs import Child
from loopline.worker.sizing import profile_for
from tasks import fetch_url

LOG_ERRORS = ("MaxConnectionsError", "Too many connections", "ERROR", "Traceback", "Restoring")


def test_defaults_are_safe_for_io_jobs() -> None:
    conf = app.conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json"
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    # The default limits are the tasks' own (loopline.app.task.LooplineTask.bind), not the pool's for every job.
    assert conf.task_time_limit is None and conf.task_soft_time_limit is None
    assert (fetch_url.time_limit, fetch_url.soft_time_limit) == (settings.task_time_limit_s,
                                                                 settings.task_soft_time_limit_s)
    assert conf.broker_transport_options["visibility_timeout"] > fetch_url.time_limit
    assert fetch_url.soft_time_limit < fetch_url.time_limit
    assert conf.result_expires > 0
    assert conf.worker_send_task_events is True


@pytest.mark.parametrize(("pool", "concurrency"), [("gevent", 500), ("threads", 500), ("custom", 1000)])
def test_concurrent_pools_get_a_connection_per_slot(pool: str, concurrency: int) -> None:
    profile = profile_for(pool, concurrency)
    assert profile.max_connections > concurrency
    assert profile.prefetch_multiplier >= 1


def test_prefork_keeps_one_message_per_slot() -> None:
    profile = profile_for("prefork", 8)
    assert profile.prefetch_multiplier == 1
    assert profile.concurrency == 8


def test_apply_profile_sizes_broker_and_backend_pools() -> None:
    class Conf:
        broker_transport_options = {"visibility_timeout": 3600}
        broker_pool_limit = 10
        worker_prefetch_multiplier = 4
        redis_max_connections = None

    conf = Conf()
    apply_profile(conf, profile_for("gevent", 500))
    assert conf.broker_transport_options == {"visibility_timeout": 3600, "max_connections": 516, "fetch_when_free": 0.0}
    assert conf.redis_max_connections == 516
    assert conf.worker_prefetch_multiplier == 1
    apply_profile(conf, profile_for("asyncio", 1000))
    assert conf.worker_prefetch_multiplier == 2
    assert conf.broker_transport_options["fetch_when_free"] == 0.25


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pool", ["gevent", "threads"])
def test_pool_at_500_slots_runs_without_connection_errors(
    pool: str, worker: Callable[..., Child], queue: str, target_url: str, target_stats: Callable[[], dict[str, int]]
) -> None:
    child = worker(pool, 500)
    results = []
    with app.producer_or_acquire() as producer:
        for _ in range(1500):
            results.append(fetch_url.apply_async((f"{target_url}/job?ms=200",), queue=queue, producer=producer))
    statuses = [r.get(timeout=120)["status"] for r in results]
    assert statuses == [200] * 1500
    # More jobs in flight at once than a stock 10-connection pool could have acked.
    assert target_stats()["peak_in_flight"] > 20
    assert child.stop(grace_s=30, signum=signal.SIGTERM) == 0
    log = child.log_text()
    assert "redis max_connections=516" in log
    found = [needle for needle in LOG_ERRORS if needle in log]
    assert not found, f"{found} in worker log:\n{log[-4000:]}"


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("pool", "concurrency", "window"), [("prefork", 2, 2), ("gevent", 3, 3), ("asyncio", 3, 6)])
def test_the_running_worker_has_its_pools_prefetch_window(
    pool: str, concurrency: int, window: int, worker: Callable[..., Child]
) -> None:
    child = worker(pool, concurrency)
    match = re.search(r"(\S+@\S+) ready\.", child.log_text())
    assert match is not None, child.log_text()[-2000:]
    node = match.group(1)
    # A busy machine may miss one broadcast's reply window: ask until the worker answers.
    stats = wait_until(lambda: (app.control.inspect(destination=[node], timeout=5).stats() or {}).get(node), 60,
                       f"{node} to answer inspect stats", child=child)
    assert stats["prefetch_count"] == window


@pytest.mark.timeout(90)
def test_a_gevent_worker_sleeps_cooperatively_between_result_retries(worker: Callable[..., Child], queue: str) -> None:
    # Blocking sleeps there froze every greenlet for a second per retry while Redis restarted.
    import os

    from async_tasks import retry_sleep_is_cooperative

    tests_dir = os.path.dirname(os.path.dirname(__file__))
    worker("gevent", 2, env={"CELERY_WORKER_INCLUDE": "async_tasks",
                             "PYTHONPATH": os.pathsep.join((tests_dir, os.path.dirname(tests_dir)))})
    assert retry_sleep_is_cooperative.apply_async(queue=queue).get(timeout=60) is True


def _user_app(**conf: object) -> Celery:
    user = Celery("user-app", set_as_current=False)
    user.conf.update(broker_url="redis://127.0.0.1:1/0", **conf)
    return user


def test_configuring_the_app_after_install_keeps_loopline_installed() -> None:
    import types

    import loopline
    from loopline.settings import settings_for

    user = _user_app()
    loopline.install(user, max_deliveries=3)
    later = types.SimpleNamespace(task_default_queue="user", loopline_event_flush_ms=250)
    user.config_from_object(later)  # Celery rebuilds its configuration from scratch here
    assert user.conf.broker_transport == "loopline.transport.redis:Transport"
    assert user.conf.worker_consumer == "loopline.worker.consumer:Consumer"
    assert user.conf.task_acks_late is True and user.conf.accept_content == ["json"]
    assert user.conf.task_default_queue == "user"
    assert user.conf.result_backend == "loopline.backends.redis:RedisBackend+redis://127.0.0.1:1/0"
    settings = settings_for(user)
    assert (settings.event_flush_ms, settings.max_deliveries) == (250.0, 3)


def test_installing_twice_keeps_the_first_overrides_and_does_not_stack_the_backend_class() -> None:
    import loopline

    user = _user_app()
    loopline.install(user, max_deliveries=3)
    settings = loopline.install(user)
    assert settings.max_deliveries == 3
    assert user.conf.result_backend == "loopline.backends.redis:RedisBackend+redis://127.0.0.1:1/0"


def test_an_installed_app_that_is_dropped_is_collected() -> None:
    import gc
    import weakref

    import loopline
    from loopline.app.install import is_installed

    user = _user_app()
    loopline.install(user)
    assert is_installed(user) and not is_installed(_user_app()) and not is_installed("not an app")
    dropped = weakref.ref(user)
    del user
    gc.collect()
    assert dropped() is None  # no signal handler or record of loopline's holds it


def test_what_the_app_chose_itself_wins_over_loopline_defaults() -> None:
    import loopline

    user = _user_app(task_acks_late=False, result_backend="rpc://")
    loopline.install(user)
    assert user.conf.task_acks_late is False and user.conf.result_backend == "rpc://"


def test_a_bad_install_override_is_named_as_given() -> None:
    import loopline
    from loopline.settings import ConfigError

    with pytest.raises(ConfigError, match=r"^max_deliveries='many' is not a valid int$"):
        loopline.install(_user_app(), max_deliveries="many")
    with pytest.raises(ConfigError, match=r"^loopline_max_deliveries must be positive, got 0$"):
        loopline.install(_user_app(loopline_max_deliveries=0))


def test_a_subclass_with_one_limit_inherits_no_default_for_the_other() -> None:
    import loopline
    from loopline.app.task import LooplineTask

    user = _user_app()
    loopline.install(user)

    class Base(LooplineTask):
        name = "user.base"

    class OnlyHard(Base):
        name = "user.only_hard"
        time_limit = 60

    user.register_task(Base())
    user.register_task(OnlyHard())
    base, only_hard = user.tasks["user.base"], user.tasks["user.only_hard"]
    assert (base.time_limit, base.soft_time_limit) == (300, 270)
    assert (only_hard.time_limit, only_hard.soft_time_limit) == (60, None)
