"""The dashboard's ASGI app: the page, its JSON API, CSV export and the live event stream.

A thin adapter: run data comes from ``dashboard.store``, cluster state from ``dashboard.cluster``, per-host
limits from ``dashboard.hosts``.
Live mode is a server-sent event stream (``/api/events``) that watches the results folder: ``loopline
bench`` rewrites its run file while it runs (``bench.record``), and every change is pushed to the page.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from anyio import to_thread
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from loopline.dashboard.auth import BasicAuth
from loopline.dashboard.cluster import ClusterView
from loopline.dashboard.hosts import HostsView
from loopline.dashboard.store import RunNotFound, RunStore, Signature, jobs_csv, summary_csv

__all__ = ["LIVE_POLL_S", "create_app", "plotly_js"]

LIVE_POLL_S = 0.5
KEEPALIVE_S = 15.0
STATIC = Path(__file__).parent / "static"


def plotly_js() -> Path:
    """plotly.js as the ``plotly`` Python package ships it: the page works where no CDN can be reached."""
    try:
        path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    except ModuleNotFoundError:
        raise RuntimeError("the dashboard draws with plotly.js from the plotly package: pip install plotly") from None
    if not path.is_file():
        raise RuntimeError(f"plotly is installed without its plotly.min.js ({path}); reinstall plotly")
    return path


def _not_found(exc: RunNotFound) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=404)


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def create_app(results: Path, *, flower_url: str | None = "http://127.0.0.1:5555/",
               auth: tuple[str, str] | None = None, live_poll_s: float = LIVE_POLL_S) -> Starlette:
    store = RunStore(results)
    cluster = ClusterView(flower_url)
    hosts = HostsView()
    plotly = plotly_js()

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    async def vendor_plotly(request: Request) -> Response:
        return FileResponse(plotly, media_type="text/javascript", headers={"Cache-Control": "max-age=86400"})

    async def runs(request: Request) -> Response:
        return JSONResponse({"results_dir": str(results), "runs": await to_thread.run_sync(store.list_runs)})

    async def run(request: Request) -> Response:
        try:
            return JSONResponse(await to_thread.run_sync(store.view, request.path_params["run_id"]))
        except RunNotFound as exc:
            return _not_found(exc)

    async def csv_export(request: Request) -> Response:
        run_id, kind = request.path_params["run_id"], request.path_params["kind"]
        render = {"summary": summary_csv, "jobs": jobs_csv}.get(kind)
        if render is None:
            return JSONResponse({"error": f"no export {kind!r}: use summary.csv or jobs.csv"}, status_code=404)
        try:
            doc = await to_thread.run_sync(store.load, run_id)
        except RunNotFound as exc:
            return _not_found(exc)
        return Response(render(doc), media_type="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{run_id}-{kind}.csv"'})

    async def cluster_state(request: Request) -> Response:
        return JSONResponse(await to_thread.run_sync(cluster.state))

    async def hosts_state(request: Request) -> Response:
        return JSONResponse(await to_thread.run_sync(hosts.state))

    async def events(request: Request) -> Response:
        return StreamingResponse(_watch(request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _watch(request: Request) -> AsyncIterator[str]:
        """``runs`` when any run file changes, then ``run`` for each changed one (on connect: the running ones)."""
        seen: dict[str, Signature] | None = None
        idle_s = 0.0
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            now = await to_thread.run_sync(store.snapshot)
            if seen is None or now != seen:
                listing = await to_thread.run_sync(store.list_runs)
                yield _event("runs", listing)
                changed = ([r["run_id"] for r in listing if r["status"] == "running"] if seen is None
                           else [run_id for run_id, mtime in now.items() if seen.get(run_id) != mtime])
                for run_id in sorted(changed):
                    try:
                        yield _event("run", await to_thread.run_sync(store.view, run_id))
                    except RunNotFound:
                        continue
                seen, idle_s = now, 0.0
            elif idle_s >= KEEPALIVE_S:
                yield ": keep-alive\n\n"
                idle_s = 0.0
            await asyncio.sleep(live_poll_s)
            idle_s += live_poll_s

    app = Starlette(routes=[
        Route("/", index),
        Route("/vendor/plotly.min.js", vendor_plotly),
        Route("/api/runs", runs),
        Route("/api/runs/{run_id}", run),
        Route("/api/runs/{run_id}/{kind}.csv", csv_export),
        Route("/api/cluster", cluster_state),
        Route("/api/hosts", hosts_state),
        Route("/api/events", events),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ])
    if auth is not None:
        app.add_middleware(BasicAuth, user=auth[0], password=auth[1])
    return app
