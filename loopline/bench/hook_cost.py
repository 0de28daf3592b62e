"""What the per-host politeness hook costs per request: CPU of ``host_slot`` without a rule and with one.

Run it as ``python -m loopline.bench.hook_cost``: it starts a private Redis (the embedded one) in a temporary
folder, times N sync and N async slots for a host without a rule and for one with a rule that never binds,
and prints microseconds of this process's CPU per request (the Redis server's own time is not counted).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import redis
from celery import Celery

from loopline.embedded_redis import EmbeddedRedis
from loopline.politeness import Rule, RuleStore, host_slot
from loopline.politeness.engine import engine_for

__all__ = ["main"]

FREE, RULED = "free.test", "ruled.test"


def _sync_us(app: Celery, host: str, n: int) -> float:
    with host_slot(f"http://{host}/x", app=app):  # reads the rules, makes the client
        pass
    started = time.process_time()
    for _ in range(n):
        with host_slot(f"http://{host}/x", app=app):
            pass
    return (time.process_time() - started) / n * 1e6


async def _async_us(app: Celery, host: str, n: int) -> float:
    async with host_slot(f"http://{host}/x", app=app):
        pass
    started = time.process_time()
    for _ in range(n):
        async with host_slot(f"http://{host}/x", app=app):
            pass
    elapsed = time.process_time() - started
    await engine_for(app).aclose()
    return elapsed / n * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loopline.bench.hook_cost", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000, help="slots timed per case (default: %(default)s)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loopline-hook-cost-") as home:
        server = EmbeddedRedis(Path(home))
        url = server.up().url
        try:
            client = redis.Redis.from_url(url)
            RuleStore(client).set(RULED, Rule(rate="1000000/s", burst=1000))
            app = Celery("hook-cost", broker=url, set_as_current=False)
            print(f"{'case':<22} {'µs CPU per request':>20}")
            for label, host in (("no rule", FREE), ("rule (never binding)", RULED)):
                print(f"{label + ', sync':<22} {_sync_us(app, host, args.requests):>20.1f}")
                print(f"{label + ', async':<22} {asyncio.run(_async_us(app, host, args.requests)):>20.1f}")
            engine_for(app).close()
            client.close()
            app.close()
        finally:
            server.down()


if __name__ == "__main__":
    main()
