"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright) over real bench runs.

Screenshots go to ``test-artifacts/`` (git-ignored) for a person to look at.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Browser, Page, expect, sync_playwright

from loopline.bench.procs import Child, start_bench, start_dashboard

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHARTS = ("throughput", "latency", "cpu", "memory", "timeline")
BENCH_TIMEOUT_S = 90.0
UI_TIMEOUT_MS = 30_000


def bench(out: Path, log: Path, *args: str) -> Child:
    return start_bench([*args, "--out", str(out)], log_path=log, env={"COLUMNS": None})


def finished(child: Child, timeout_s: float = BENCH_TIMEOUT_S) -> None:
    try:
        child.popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        child.kill_tree()  # with the workers, target and Redis it started in sessions of their own
        log = child.log_text()[-3000:]
        raise AssertionError(f"the bench did not finish within {timeout_s:.0f} s:\n{log}") from None
    code = child.stop(grace_s=5)
    assert code == 0, child.log_text()[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real runs with different pools and tasks, made at the same time to save a few seconds."""
    out = tmp_path_factory.mktemp("results")
    logs = tmp_path_factory.mktemp("bench-logs")
    first = bench(out, logs / "first.log", "--pools", "threads,asyncio", "--jobs", "30", "--latency-ms", "20",
                  "--concurrency", "5")
    second = bench(out, logs / "second.log", "--pools", "gevent,asyncio", "--task", "io_sleep", "--jobs", "30",
                   "--latency-ms", "20", "--concurrency", "30")
    try:
        finished(first)
        finished(second)
    finally:  # a failed or timed-out first run must not leave the second running
        first.stop(grace_s=5)
        second.stop(grace_s=5)
    assert len(list(out.glob("*.json"))) == 2
    return out


@pytest.fixture(scope="module")
def dashboard(results: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    child, url = start_dashboard(results, log_path=tmp_path_factory.mktemp("dash") / "dashboard.log")
    yield url
    child.stop(grace_s=5)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == []


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def run_ids(dashboard: str) -> list[str]:
    return [r["run_id"] for r in requests.get(f"{dashboard}/api/runs", timeout=10).json()["runs"]]


def assert_charts_drawn(page: Page, pane: str, pools: list[str]) -> None:
    for chart in CHARTS:
        box = page.locator(f"{pane} [data-chart={chart}]")
        expect(box).to_have_attribute("data-points", re.compile(r"^[1-9]\d*$"), timeout=UI_TIMEOUT_MS)
        # What plotly actually drew: bar and marker points, or line paths with a shape.
        drawn = box.evaluate("el => el.querySelectorAll('g.point path, path.js-line[d*=L]').length")
        assert drawn >= len(pools), f"{chart}: {drawn} points drawn"
        for pool in pools:
            assert pool in box.inner_text() or chart == "timeline"


def test_page_shows_the_newest_run_with_every_chart_and_the_api_numbers(page: Page, dashboard: str) -> None:
    newest = run_ids(dashboard)[0]
    doc = requests.get(f"{dashboard}/api/runs/{newest}", timeout=10).json()
    page.goto(dashboard)
    expect(page.locator("#pane-a")).to_have_attribute("data-run-id", newest, timeout=UI_TIMEOUT_MS)
    pools = [row["pool"] for row in doc["summary"]]
    assert_charts_drawn(page, "#pane-a", pools)
    expect(page.locator("#pane-a .verdict")).to_contain_text(f"{doc['winner']['pool']} won with")
    for row in doc["summary"]:
        cells = page.locator(f"#pane-a table.summary tr[data-pool={row['pool']}]")
        expect(cells.locator("[data-col='jobs/s']")).to_have_text(f"{row['throughput_per_s']:,.1f}")
        expect(cells.locator("[data-col=ok]")).to_have_text(str(row["jobs_ok"]))
        expect(cells.locator("[data-col='p95 ms']")).to_have_text(f"{row['latency_ms']['p95']:,.0f}")
    expect(page.locator("#cluster")).to_contain_text("worker(s) online", timeout=UI_TIMEOUT_MS)
    expect(page.locator("#cluster a")).to_have_attribute("href", "http://127.0.0.1:5555/")
    shot(page, "dashboard.png")


def test_run_list_switches_runs_and_puts_two_side_by_side(page: Page, dashboard: str) -> None:
    newest, older = run_ids(dashboard)[:2]
    older_doc = requests.get(f"{dashboard}/api/runs/{older}", timeout=10).json()
    page.goto(dashboard)
    expect(page.locator("#pane-a")).to_have_attribute("data-run-id", newest, timeout=UI_TIMEOUT_MS)
    page.locator(f"#runs li[data-run-id='{older}']").click()
    expect(page.locator("#pane-a")).to_have_attribute("data-run-id", older, timeout=UI_TIMEOUT_MS)
    expect(page.locator(f"#runs li[data-run-id='{older}']")).to_have_class(re.compile("selected"))
    assert_charts_drawn(page, "#pane-a", [row["pool"] for row in older_doc["summary"]])
    assert page.url.endswith(f"?run={older}")
    page.locator(f"#runs li[data-run-id='{newest}'] button.compare").click()
    expect(page.locator("#pane-b")).to_have_attribute("data-run-id", newest, timeout=UI_TIMEOUT_MS)
    expect(page.locator("#panes")).to_have_class(re.compile("two"))
    newest_doc = requests.get(f"{dashboard}/api/runs/{newest}", timeout=10).json()
    assert_charts_drawn(page, "#pane-b", [row["pool"] for row in newest_doc["summary"]])
    assert_charts_drawn(page, "#pane-a", [row["pool"] for row in older_doc["summary"]])
    shot(page, "dashboard-compare.png")


def test_live_mode_follows_a_running_bench(page: Page, dashboard: str, results: Path, tmp_path: Path) -> None:
    page.goto(dashboard)
    expect(page.locator("#stream")).to_have_text("live updates on", timeout=UI_TIMEOUT_MS)
    child = bench(results, tmp_path / "live.log", "--pools", "threads", "--jobs", "120", "--latency-ms", "100",
                  "--concurrency", "4")
    try:
        count = page.locator("#pane-a .live-pool[data-pool=threads] .live-count")
        expect(count).to_have_text(re.compile(r"^([1-9]\d?|1[01]\d)/120 jobs"), timeout=UI_TIMEOUT_MS)
        first = int(count.inner_text().split("/")[0])
        expect(page.locator("#pane-a .live-title")).to_contain_text("● live: running threads")
        shot(page, "dashboard-live.png")
        page.wait_for_function(
            "n => { const el = document.querySelector('#pane-a .live-pool .live-count');"
            " return el && parseInt(el.textContent) > n; }", arg=first, timeout=UI_TIMEOUT_MS)
        finished(child)
    finally:
        child.stop(grace_s=5)
    run_id = json.loads(max(results.glob("*.json")).read_text())["run_id"]
    expect(page.locator("#pane-a")).to_have_attribute("data-run-id", run_id)
    expect(page.locator("#pane-a .verdict")).to_contain_text("threads won with", timeout=UI_TIMEOUT_MS)
    expect(page.locator("#pane-a .live-title")).to_have_count(0)
    assert_charts_drawn(page, "#pane-a", ["threads"])


def test_each_pool_shows_beside_its_stock_baseline_and_a_failure_says_why(
        browser: Browser, tmp_path: Path) -> None:
    from loopline.bench.jobs import JobTimes, PoolResult, Workload
    from loopline.bench.record import RunFile, machine_info

    def result(pool: str, per_slot_s: float, jobs: int = 20) -> PoolResult:
        out = PoolResult(pool=pool, concurrency=5, total=20, cpu_s=0.1, peak_rss_mb=80.0)
        for i in range(jobs):
            start = 100.0 + (i // 5) * per_slot_s
            out.add(JobTimes(99.0, start, start + 0.02))
        return out

    run = RunFile(tmp_path, Workload("fetch_url", 20, 20.0, "http://127.0.0.1:9"), pools=["gevent", "asyncio"],
                  repeats=1, command="loopline bench --baseline stock", machine=machine_info("7.2"),
                  run_id="20990101-000000-base", baseline="stock")
    run.add(result("gevent", 0.02))
    run.add_baseline(result("gevent", 0.06))  # 2.5× slower: no rounding at .xx5
    run.add(result("asyncio", 0.02))
    run.add_baseline(result("asyncio", 0.05, jobs=7), "asyncio: 13 of 20 jobs never finished (the worker exited)")
    run.finish("complete")
    child, url = start_dashboard(tmp_path, log_path=tmp_path / "dashboard.log")
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{url}/?run={run.run_id}")
        table = page.locator("#pane-a table.summary")
        expect(table.locator("tr[data-pool=gevent] [data-col='vs stock']")).to_have_text(
            f"{run.doc['summary'][0]['vs_stock']['throughput']:.2f}×", timeout=UI_TIMEOUT_MS)
        stock = table.locator("tr.stock[data-stock-pool=gevent]")
        expect(stock.locator("[data-col=pool]")).to_have_text("└ stock")
        expect(stock.locator("[data-col='jobs/s']")).to_have_text(
            f"{run.doc['baseline']['summary'][0]['throughput_per_s']:,.1f}")
        expect(table.locator("tr[data-pool=asyncio] [data-col='vs stock']")).to_have_text("–")
        expect(table.locator("tr.stock.failed[data-stock-pool=asyncio] [data-col=pool]")).to_have_text(
            "└ stock FAILED")
        expect(table.locator("tr.stock-error[data-stock-pool=asyncio]")).to_contain_text(
            "asyncio on stock Celery failed 1 of 1: asyncio: 13 of 20 jobs never finished")
        assert_charts_drawn(page, "#pane-a", ["gevent", "asyncio"])
        expect(page.locator("#pane-a [data-chart=throughput]")).to_contain_text("stock")
        shot(page, "dashboard-baseline.png")
    finally:
        context.close()
        child.stop(grace_s=5)
    assert errors == []
