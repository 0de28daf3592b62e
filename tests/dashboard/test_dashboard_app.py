"""``loopline dashboard`` as a real server: the JSON API, CSV export, the live stream, auth, and no broker."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from loopline.bench.jobs import JobTimes, PoolResult, Workload
from loopline.bench.procs import Child, start_dashboard
from loopline.bench.record import RunFile, machine_info
from loopline.dashboard.store import RunStore
from loopline.embedded_redis import free_port

DONE, LIVE = "20250101-120000-done", "20250102-120000-live"


def result(pool: str, concurrency: int, jobs: int = 20) -> PoolResult:
    out = PoolResult(pool=pool, concurrency=concurrency, total=jobs, cpu_s=0.05, peak_rss_mb=70.0)
    for i in range(jobs):
        start = 50.0 + (i // concurrency) * 0.1
        out.add(JobTimes(49.0, start, start + 0.1))
    return out


def new_run(root: Path, run_id: str, pools: list[str]) -> RunFile:
    return RunFile(root, Workload("fetch_url", 20, 100.0, "http://127.0.0.1:9"), pools=pools, repeats=1,
                   command="loopline bench", machine=machine_info("7.2"), run_id=run_id)


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    done = new_run(root, DONE, ["threads", "asyncio"])
    done.add(result("threads", 5))
    done.add(result("asyncio", 10))
    done.finish("complete")
    live = new_run(root, LIVE, ["gevent"])
    live.write()
    return root


@pytest.fixture(scope="module")
def server(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    child, url = start_dashboard(results, log_path=tmp_path_factory.mktemp("dash") / "dashboard.log")
    yield url
    child.stop(grace_s=5)


def get(url: str, **kwargs: Any) -> requests.Response:
    return requests.get(url, timeout=10, **kwargs)


def test_api_lists_runs_and_returns_each_as_the_page_draws_it(server: str, results: Path) -> None:
    runs = get(f"{server}/api/runs").json()
    assert [r["run_id"] for r in runs["runs"]] == [LIVE, DONE]
    assert runs["runs"][1]["winner"]["pool"] == "asyncio" and runs["runs"][0]["status"] == "running"
    doc = get(f"{server}/api/runs/{DONE}").json()
    assert doc == json.loads(json.dumps(RunStore(results).view(DONE)))
    assert [r["pool"] for r in doc["summary"]] == ["threads", "asyncio"]


@pytest.mark.parametrize(("path", "message"), [
    ("/api/runs/20990101-000000-nope", "no run '20990101-000000-nope' in"),
    ("/api/runs/bad%20id", "'bad id' is not a run id"),
    ("/api/runs/20990101-000000-nope/jobs.csv", "no run '20990101-000000-nope' in"),
    (f"/api/runs/{DONE}/everything.csv", "no export 'everything': use summary.csv or jobs.csv"),
])
def test_bad_run_ids_are_404_with_a_message(server: str, path: str, message: str) -> None:
    response = get(f"{server}{path}")
    assert response.status_code == 404
    assert message in response.json()["error"]


def test_csv_exports(server: str) -> None:
    summary = get(f"{server}/api/runs/{DONE}/summary.csv")
    assert summary.headers["content-type"].startswith("text/csv")
    assert summary.text.splitlines()[0].startswith("pool,concurrency,processes,repeats,jobs_ok")
    assert [line.split(",")[0] for line in summary.text.splitlines()[1:]] == ["threads", "asyncio"]
    jobs = get(f"{server}/api/runs/{DONE}/jobs.csv").text.splitlines()
    assert jobs[0] == "pool,repeat,job,enqueued_s,started_s,finished_s,latency_ms,error,system" and len(jobs) == 41


def test_the_page_and_its_charting_library_come_from_this_server(server: str) -> None:
    page = get(f"{server}/").text
    assert '<script src="/vendor/plotly.min.js"></script>' in page and "https://" not in page
    plotly = get(f"{server}/vendor/plotly.min.js")
    assert plotly.status_code == 200 and "plotly.js" in plotly.text[:300] and len(plotly.content) > 1_000_000
    assert get(f"{server}/static/app.js").status_code == 200


def events(response: requests.Response) -> Iterator[tuple[str, Any]]:
    name = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: ") and name:
            yield name, json.loads(line[len("data: "):])
            name = None


def test_live_stream_pushes_the_running_run_as_it_changes(server: str, results: Path) -> None:
    with requests.get(f"{server}/api/events", stream=True, timeout=(5, 10)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        stream = events(response)
        assert next(stream)[0] == "runs"
        name, doc = next(stream)
        assert (name, doc["run_id"], doc["progress"]) == ("run", LIVE, None)  # on connect: the running run only
        live = new_run(results, LIVE, ["gevent"])
        partial = result("gevent", 2, jobs=6)
        partial.total = 20
        live.progress(partial, force=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            name, data = next(stream)
            if name == "run":
                assert data["run_id"] == LIVE and data["progress"]["done"] == 6 and data["progress"]["total"] == 20
                break
        else:
            raise AssertionError("no run event after the run file changed")


def test_basic_auth_guards_everything(results: Path, tmp_path: Path) -> None:
    child, url = start_dashboard(results, log_path=tmp_path / "dashboard.log",
                                 env={"LOOPLINE_DASHBOARD_AUTH": "ops:s3cret"})
    try:
        for path in ("/", "/api/runs", "/api/events", f"/api/runs/{DONE}/jobs.csv"):
            refused = get(f"{url}{path}")
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert get(f"{url}/api/runs", auth=("ops", "wrong")).status_code == 401
        allowed = get(f"{url}/api/runs", auth=("ops", "s3cret"), headers={"Origin": "http://evil.example"})
        assert allowed.json()["runs"][1]["run_id"] == DONE
        # No CORS: another origin's page cannot read the API with the operator's credentials.
        assert not any(h.lower().startswith("access-control-") for h in allowed.headers)
        listening = {c.laddr.ip for c in psutil.Process(child.pid).net_connections() if c.status == "LISTEN"}
        assert listening == {"127.0.0.1"}
    finally:
        child.stop(grace_s=5)


def test_a_malformed_auth_setting_stops_start_up_naming_the_variable(results: Path, tmp_path: Path) -> None:
    child: Child | None = None
    try:
        with pytest.raises(RuntimeError) as caught:
            child, _ = start_dashboard(results, log_path=tmp_path / "dashboard.log",
                                       env={"LOOPLINE_DASHBOARD_AUTH": "no-password"})
    finally:
        if child is not None:  # it started after all: stop it whatever the assertion said
            child.stop(grace_s=1)
    assert "LOOPLINE_DASHBOARD_AUTH must look like user:password" in str(caught.value)


@pytest.mark.parametrize("broker", ["none", "unreachable"])
def test_without_a_broker_runs_are_still_served_and_the_cluster_says_no_broker(results: Path, tmp_path: Path,
                                                                                broker: str) -> None:
    url_or_none = None if broker == "none" else f"redis://127.0.0.1:{free_port()}/0"
    child, url = start_dashboard(results, log_path=tmp_path / "dashboard.log",
                                 env={"LOOPLINE_BROKER_URL": url_or_none, "LOOPLINE_RESULT_BACKEND": None,
                                      "LOOPLINE_HOME": str(tmp_path / "home")})
    try:
        cluster = get(f"{url}/api/cluster").json()
        assert cluster["error"].startswith("no broker") and cluster["workers"] == []
        if broker == "unreachable":
            assert "is unreachable" in cluster["error"]
        assert len(get(f"{url}/api/runs").json()["runs"]) == 2
    finally:
        child.stop(grace_s=5)
