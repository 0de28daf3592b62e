"""A small ASGI app that enqueues jobs without blocking its event loop.

Run it with ``uvicorn examples.asgi_app:app --port 8001`` next to a worker, then::

    curl -X POST localhost:8001/jobs -d '{"task": "fetch_url", "args": ["https://example.org/"]}'
    curl localhost:8001/jobs/<id>
    curl -X POST localhost:8001/jobs/bulk -d '{"task": "io_sleep", "calls": [[100], [200]]}'

``POST /jobs`` answers 202 with the job id, ``GET /jobs/{id}`` its state (and result or error once
finished), ``POST /jobs/bulk`` sends many jobs in one Redis round trip. Either body may name a
``"queue"`` (default: Celery's ``celery``). A bad job answers 400 with the reason; nothing is sent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from celery.result import AsyncResult
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import tasks
from config.celery_app import app as celery_app
from loopline.app.producer import asend_many
from loopline.errors import InvalidJob

__all__ = ["app"]

TASKS = {"fetch_url": tasks.fetch_url, "deliver_webhook": tasks.deliver_webhook, "io_sleep": tasks.io_sleep}


class BadRequest(ValueError):
    """The request body does not describe a job."""


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("body must be JSON") from None
    if not isinstance(body, dict) or body.get("task") not in TASKS:
        raise BadRequest(f"'task' must be one of {', '.join(TASKS)}")
    if "queue" in body and not (isinstance(body["queue"], str) and body["queue"]):
        raise BadRequest("'queue' must be a non-empty string")
    return body


def _options(body: dict[str, Any]) -> dict[str, Any]:
    return {"queue": body["queue"]} if "queue" in body else {}


def _error(exc: Exception) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


async def create_job(request: Request) -> JSONResponse:
    try:
        body = await _body(request)
        result = await TASKS[body["task"]].apply_async_async(body.get("args", []), body.get("kwargs", {}),
                                                             **_options(body))
    except (BadRequest, InvalidJob, TypeError) as exc:
        return _error(exc)
    return JSONResponse({"id": result.id}, status_code=202)


async def create_jobs(request: Request) -> JSONResponse:
    try:
        body = await _body(request)
        calls: list[tuple[list[Any], dict[str, Any]]] = [(args, {}) for args in body.get("calls", [])]
        results = await asend_many(TASKS[body["task"]], calls, **_options(body))
    except (BadRequest, InvalidJob, TypeError) as exc:
        return _error(exc)
    return JSONResponse({"ids": [r.id for r in results]}, status_code=202)


def _state(job_id: str) -> dict[str, Any]:
    result = AsyncResult(job_id, app=celery_app)
    state = result.state
    out: dict[str, Any] = {"id": job_id, "state": state}
    if state == "SUCCESS":
        out["result"] = result.result
    elif state in ("FAILURE", "RETRY", "REVOKED"):
        out["error"] = f"{type(result.result).__name__}: {result.result}"
    return out


async def job_state(request: Request) -> JSONResponse:
    # The backend read is a blocking Redis call: off the loop, like the sends.
    return JSONResponse(await asyncio.to_thread(_state, request.path_params["job_id"]))


app = Starlette(routes=[
    Route("/jobs", create_job, methods=["POST"]),
    Route("/jobs/bulk", create_jobs, methods=["POST"]),
    Route("/jobs/{job_id}", job_state, methods=["GET"]),
])
