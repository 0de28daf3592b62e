"""A local HTTP target on 127.0.0.1 (or several loopback addresses) with configurable latency, errors and bodies.

Run it as ``python -m bench.target --port 0 --latency-ms 100``; it prints one JSON line
``{"port": N}`` once it listens. Routes:

- ``GET|POST /job``: waits the configured latency (+ jitter), fails with 500 at the error rate,
  answers ``payload_bytes`` bytes. Query ``ms``, ``status`` and ``bytes`` override per request.
- ``GET /redirect?to=URL``: 302 to ``URL``.
- ``POST /hook/{key}``: a webhook receiver; ``?script=500,200`` answers the n-th attempt with the n-th
  status (the last one repeats), ``?retry_after=S`` adds that header to 429s. ``GET /hook/{key}`` lists
  the attempts (time, headers, body) so a test can verify signatures.
- ``GET /stats``: requests served and the peak number of requests in flight at once.
- ``GET|POST /pause/{key}?retry_after=S``: the first request answers 429 with ``Retry-After: S``, later ones 200.
- ``GET /arrivals``: per listening address, the arrival time (epoch s, this server's clock) of every ``/job``
  and ``/pause`` request since the last ``/reset``. ``--address A`` (repeated) listens on each address, one
  port, so that per-host limits have several hosts to tell apart (all of 127.0.0.0/8 is loopback).

``/job`` also takes ``retry_after=S``, sent with a 429 or 503 ``status``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["TargetConfig", "host_addresses", "make_app", "main"]


@dataclass
class TargetConfig:
    """How ``/job`` behaves by default."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    payload_bytes: int = 256
    seed: int = 1


@dataclass
class _State:
    config: TargetConfig
    rng: random.Random
    served: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    hooks: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    arrivals: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    paused_keys: set[str] = field(default_factory=set)


_STATE = web.AppKey("state", _State)


def _query_num(request: web.Request, name: str, default: float) -> float:
    value = request.query.get(name)
    return default if value is None else float(value)


def _arrived(request: web.Request) -> None:
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    request.app[_STATE].arrivals[sockname[0] if sockname else "?"].append(time.time())


async def job(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    cfg = state.config
    _arrived(request)
    state.in_flight += 1
    state.peak_in_flight = max(state.peak_in_flight, state.in_flight)
    try:
        delay_ms = _query_num(request, "ms", cfg.latency_ms)
        if "ms" not in request.query and cfg.jitter_ms:
            delay_ms = max(0.0, delay_ms + state.rng.uniform(-cfg.jitter_ms, cfg.jitter_ms))
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        status = int(_query_num(request, "status", 200))
        if "status" not in request.query and cfg.error_rate and state.rng.random() < cfg.error_rate:
            status = 500
        size = int(_query_num(request, "bytes", cfg.payload_bytes))
        headers = {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query and status in (
            429, 503) else None
        return web.Response(body=b"x" * size, status=status, headers=headers, content_type="application/octet-stream")
    finally:
        state.in_flight -= 1
        state.served += 1


async def pause(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    _arrived(request)
    key = request.match_info["key"]
    if key in state.paused_keys:
        return web.Response(body=b"ok", content_type="text/plain")
    state.paused_keys.add(key)
    return web.Response(body=b"slow down", status=429, headers={"Retry-After": request.query.get("retry_after", "1")},
                        content_type="text/plain")


async def arrivals(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].arrivals)


async def redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound(request.query["to"])


async def hook(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    key = request.match_info["key"]
    attempts = state.hooks[key]
    body = await request.read()
    attempts.append({
        "time": asyncio.get_running_loop().time(),
        "headers": dict(request.headers),
        "body_b64": base64.b64encode(body).decode(),
    })
    script = [int(s) for s in request.query.get("script", "200").split(",")]
    status = script[min(len(attempts), len(script)) - 1]
    headers = {}
    if status == 429 and "retry_after" in request.query:
        headers["Retry-After"] = request.query["retry_after"]
    return web.json_response({"attempt": len(attempts)}, status=status, headers=headers)


async def hook_log(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].hooks.get(request.match_info["key"], []))


async def stats(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    return web.json_response({"served": state.served, "in_flight": state.in_flight,
                              "peak_in_flight": state.peak_in_flight})


async def reset(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    state.served = state.peak_in_flight = 0
    state.hooks.clear()
    state.arrivals.clear()
    state.paused_keys.clear()
    return web.json_response({"ok": True})


def make_app(config: TargetConfig) -> web.Application:
    """The aiohttp application; tests may also mount it in-process."""
    app = web.Application()
    app[_STATE] = _State(config=config, rng=random.Random(config.seed))
    app.add_routes([
        web.route("*", "/job", job),
        web.get("/redirect", redirect),
        web.post("/hook/{key}", hook),
        web.get("/hook/{key}", hook_log),
        web.get("/stats", stats),
        web.route("*", "/pause/{key}", pause),
        web.get("/arrivals", arrivals),
        web.post("/reset", reset),
    ])
    return app


def host_addresses(hosts: int) -> list[str]:
    """127.0.0.1 ... 127.0.0.N: distinct host names for per-host limits, all on loopback."""
    if not 1 <= hosts <= 250:
        raise ValueError(f"hosts must be in [1, 250], got {hosts}")
    return [f"127.0.0.{n}" for n in range(1, hosts + 1)]


async def _serve(config: TargetConfig, port: int, addresses: list[str]) -> None:
    runner = web.AppRunner(make_app(config), access_log=None, handle_signals=True)
    await runner.setup()
    # A large backlog: a pool at -c 1000 opens a thousand connections at once.
    first, *others = addresses
    site = web.TCPSite(runner, first, port, backlog=4096)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    for address in others:  # the same port on each address: every host's URL differs only in the address
        await web.TCPSite(runner, address, bound, backlog=4096).start()
    print(json.dumps({"port": bound, "addresses": addresses}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.target", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--error-rate", type=float, default=0.0)
    parser.add_argument("--payload-bytes", type=int, default=256)
    parser.add_argument("--address", action="append", help="a loopback address to listen on, repeated for "
                        "several (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    config = TargetConfig(args.latency_ms, args.jitter_ms, args.error_rate, args.payload_bytes)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        loop_factory = asyncio.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(config, args.port, args.address or ["127.0.0.1"]))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
