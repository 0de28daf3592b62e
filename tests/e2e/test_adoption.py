"""loopline in a user's own Celery project: the built wheel in a fresh virtualenv, the user's app, not ours.

The project has its own ``tasks.py``, ``config.py`` and ``workers.py`` (names loopline's reference pipeline
also uses) and a ``proj/`` package with Celery's default Task class. Its workers are started three ways: stock
``celery -P custom`` with the asyncio pool alone, ``loopline worker -A``, and an app with
``loopline.install(app)`` on gevent. No ``LOOPLINE_*`` variable is set for any of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded, TaskRevokedError, TimeLimitExceeded
from waiting import wait_for_log

from loopline.bench.procs import Child, spawn

ROOT = Path(__file__).resolve().parents[2]
RESULT_TIMEOUT_S = 60

CONFIG_PY = """
import os

broker_url = os.environ["USER_BROKER_URL"]
result_backend = os.environ["USER_BROKER_URL"]
task_default_queue = os.environ["USER_QUEUE"]
"""
TASKS_PY = '''
"""The user's own tasks.py: not a Celery module at all, only a name loopline must not take."""

GREETING = "hello from the user's tasks.py"
'''
WORKERS_PY = '''"""The user's own workers.py."""\n'''
PROJ_CELERY_PY = """
from celery import Celery

app = Celery("proj", include=["proj.jobs"])
app.config_from_object("config")
"""
PROJ_JOBS_PY = """
import asyncio
import time

from celery import current_task

import tasks
from proj.celery import app


@app.task
def add(x, y):
    return x + y


@app.task
def greet():
    return tasks.GREETING


@app.task(bind=True)
async def whoami(self, awaits):
    seen = []
    for _ in range(awaits):
        await asyncio.sleep(0.01)
        seen.append([self.request.id, current_task.request.id])
    return seen


@app.task(bind=True)
async def gather(self, n, wait_s):
    # Concurrency without a clock: returns once n of these are in flight at once, on the worker's one loop.
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(app.conf.broker_url)
    key = "adoption:barrier:" + self.request.root_id
    try:
        await client.incr(key)
        for _ in range(int(wait_s * 100)):
            if int(await client.get(key) or 0) >= n:
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        await client.aclose()


@app.task(soft_time_limit=0.5)
async def soft_limited():
    try:
        await asyncio.sleep(30)
    except Exception as exc:
        return type(exc).__name__


@app.task(time_limit=1)
async def hard_limited():
    await asyncio.sleep(30)


@app.task
async def forever():
    await asyncio.sleep(600)


@app.task(bind=True, max_retries=2, default_retry_delay=0)
async def flaky(self):
    if self.request.retries < 2:
        raise self.retry()
    return self.request.retries
"""
PROJ_INSTALLED_PY = """
import asyncio

import loopline
from celery import Celery

app = Celery("proj_installed")
app.config_from_object("config")
loopline.install(app, max_deliveries=3)


@app.task(bind=True)
async def whoami(self):
    await asyncio.sleep(0.01)
    return self.request.id


@app.task(time_limit=1)
def sleeps(s):
    import time

    time.sleep(s)
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel built from this checkout; dependencies come from this environment."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, timeout=300)
    (wheel,) = out.glob("loopline-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {"loopline"}, tops
    env_dir = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Celery, kombu, gevent... from this environment: a .pth adds its site-packages to the path, but is no site
    # directory, so the editable loopline installed there is not loaded (the wheel's own is, first).
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300)
    return env_dir


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("userproject")
    (root / "config.py").write_text(CONFIG_PY)
    (root / "tasks.py").write_text(TASKS_PY)
    (root / "workers.py").write_text(WORKERS_PY)
    (root / "proj").mkdir()
    (root / "proj" / "__init__.py").write_text("from proj.celery import app\n\n__all__ = ['app']\n")
    (root / "proj" / "celery.py").write_text(PROJ_CELERY_PY)
    (root / "proj" / "jobs.py").write_text(textwrap.dedent(PROJ_JOBS_PY))
    (root / "proj" / "installed.py").write_text(PROJ_INSTALLED_PY)
    return root


def _user_env(venv: Path, broker_url: str, queue: str, **extra: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {name: None for name in os.environ if name.startswith(("LOOPLINE_", "CELERY_"))}
    env.update(PYTHONPATH=None, VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}:{os.environ['PATH']}",
               USER_BROKER_URL=broker_url, USER_QUEUE=queue, **extra)
    return env


@pytest.fixture
def user_worker(venv: Path, project: Path, redis_url: str, queue: str,
                tmp_path: Path) -> Iterator[Callable[..., Child]]:
    started: list[Child] = []

    def start(argv: list[str], **extra: str) -> Child:
        # Celery's own console script belongs to this environment, not the new one: run it as a module.
        bin_dir = venv / "bin"
        command = [str(bin_dir / "python"), "-m", "celery"] if argv[0] == "celery" else [str(bin_dir / argv[0])]
        child = spawn(f"user worker {argv[0]}", [*command, *argv[1:]],
                      tmp_path / f"worker-{len(started)}.log", _user_env(venv, redis_url, queue, **extra),
                      cwd=project)
        started.append(child)
        wait_for_log(child, " ready.")
        return child

    yield start
    for child in started:
        child.stop(grace_s=20)


@pytest.fixture
def user_app(redis_url: str, queue: str) -> Iterator[Celery]:
    """The producer side of the user's app, as their own code would send (task names only)."""
    app = Celery("user-producer", broker=redis_url, backend=redis_url)
    app.conf.task_default_queue = queue
    yield app
    app.close()


def _run(venv: Path, project: Path, redis_url: str, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in _user_env(venv, redis_url, "q").items() if v is not None}
    env = {**{k: v for k, v in os.environ.items() if k not in _user_env(venv, redis_url, "q")}, **env}
    return subprocess.run([str(venv / "bin" / argv[0]), *argv[1:]], cwd=project, env=env, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.timeout(600)
def test_the_wheel_installs_only_loopline_and_its_cli_works_in_a_project_with_its_own_config(
    venv: Path, project: Path, redis_url: str
) -> None:
    result = _run(venv, project, redis_url, "loopline", "--help")
    assert result.returncode == 0, result.stderr
    assert "worker" in result.stdout
    located = _run(venv, project, redis_url, "python", "-c",
                   "import loopline, tasks, config; print(loopline.__file__, tasks.__file__, config.__file__)")
    assert located.returncode == 0, located.stderr
    loopline_file, tasks_file, config_file = located.stdout.split()
    assert loopline_file.startswith(str(venv)), loopline_file
    assert tasks_file == str(project / "tasks.py") and config_file == str(project / "config.py")


@pytest.mark.timeout(600)
def test_stock_celery_runs_the_users_app_on_the_asyncio_pool(user_worker: Callable[..., Child],
                                                             user_app: Celery) -> None:
    child = user_worker(["celery", "-A", "proj", "worker", "-P", "custom", "-c", "20", "--loglevel", "INFO"],
                        CELERY_CUSTOM_WORKER_POOL="loopline.concurrency.asyncio:TaskPool")
    send = user_app.send_task
    assert send("proj.jobs.add", (2, 3)).get(timeout=RESULT_TIMEOUT_S) == 5
    assert send("proj.jobs.greet").get(timeout=RESULT_TIMEOUT_S) == "hello from the user's tasks.py"
    mine = [send("proj.jobs.whoami", (3,)) for _ in range(10)]
    for result in mine:
        assert result.get(timeout=RESULT_TIMEOUT_S) == [[result.id, result.id]] * 3
    root = uuid.uuid4().hex
    together = [send("proj.jobs.gather", (10, 30), root_id=root) for _ in range(10)]
    assert [r.get(timeout=RESULT_TIMEOUT_S) for r in together] == [True] * 10
    assert send("proj.jobs.soft_limited").get(timeout=RESULT_TIMEOUT_S) == SoftTimeLimitExceeded.__name__
    with pytest.raises(TimeLimitExceeded):
        send("proj.jobs.hard_limited").get(timeout=RESULT_TIMEOUT_S)
    assert send("proj.jobs.flaky").get(timeout=RESULT_TIMEOUT_S) == 2
    stuck = send("proj.jobs.forever")
    wait_for_log(child, f"proj.jobs.forever[{stuck.id}] received")
    user_app.control.revoke(stuck.id, terminate=True)
    with pytest.raises(TaskRevokedError):
        stuck.get(timeout=RESULT_TIMEOUT_S)
    assert stuck.state == "REVOKED"
    stats = user_app.control.inspect(timeout=5).stats() or {}
    pools = [node["pool"] for node in stats.values()]
    assert any(pool.get("implementation") == "loopline.concurrency.asyncio:TaskPool" for pool in pools), stats
    assert child.stop(grace_s=30) == 0
    assert "Traceback" not in child.log_text().split("ready.", 1)[1].replace("TimeLimitExceeded", "")


@pytest.mark.timeout(600)
def test_loopline_worker_takes_the_users_app_with_dash_a(user_worker: Callable[..., Child], user_app: Celery) -> None:
    user_worker(["loopline", "worker", "-A", "proj", "--pool", "asyncio", "-c", "10"])
    assert user_app.send_task("proj.jobs.add", (20, 22)).get(timeout=RESULT_TIMEOUT_S) == 42
    result = user_app.send_task("proj.jobs.whoami", (2,))
    assert result.get(timeout=RESULT_TIMEOUT_S) == [[result.id, result.id]] * 2


@pytest.mark.timeout(600)
def test_an_installed_app_runs_async_tasks_and_time_limits_on_gevent(user_worker: Callable[..., Child],
                                                                     user_app: Celery) -> None:
    child = user_worker(["celery", "-A", "proj.installed", "worker", "-P", "gevent", "-c", "10",
                         "--loglevel", "INFO"])
    assert "loopline: pool=gevent" in child.log_text()
    result = user_app.send_task("proj.installed.whoami")
    assert result.get(timeout=RESULT_TIMEOUT_S) == result.id
    with pytest.raises(TimeLimitExceeded):
        user_app.send_task("proj.installed.sleeps", (5,)).get(timeout=RESULT_TIMEOUT_S)
