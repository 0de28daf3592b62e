"""What each worker pool needs from the broker: prefetch and connection-pool sizes per pool and concurrency."""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["CONCURRENT_POOLS", "PoolProfile", "profile_for"]

# Pools that run many task bodies in one process; each body may hold a Redis connection at once
# (acks_late acks and result writes happen where the body ran).
CONCURRENT_POOLS = frozenset({"threads", "gevent", "eventlet", "asyncio", "custom"})
CONNECTION_HEADROOM = 16
MIN_CONNECTIONS = 32


@dataclass(frozen=True)
class PoolProfile:
    """Broker-side sizing for one worker process."""

    pool: str
    concurrency: int
    prefetch_multiplier: int
    fetch_when_free: float
    max_connections: int
    producer_pool_limit: int

    def describe(self) -> str:
        return (
            f"pool={self.pool} concurrency={self.concurrency} prefetch_multiplier={self.prefetch_multiplier} "
            f"redis max_connections={self.max_connections}"
        )


def _pool_name(pool_cls: object) -> str:
    if pool_cls is None:
        return "prefork"
    if isinstance(pool_cls, str):
        return pool_cls.lower()
    module = getattr(pool_cls, "__module__", "")
    if module.startswith("loopline.concurrency.asyncio"):
        return "asyncio"
    name = module.rsplit(".", 1)[-1] or "custom"
    return "threads" if name == "thread" else name


def profile_for(pool_cls: object, concurrency: int | None) -> PoolProfile:
    """Sizing for a worker started with ``-P pool_cls -c concurrency``.

    Stock kombu caps its Redis connection pool at 10; a gevent or threads worker at ``-c 100`` with
    acks_late then fails acks with ``MaxConnectionsError`` and drops its broker connection. Every
    concurrent slot gets a connection here, plus headroom for the consumer, heartbeats and events.
    """
    pool = _pool_name(pool_cls)
    slots = int(concurrency) if concurrency else (os.cpu_count() or 1)
    concurrent = pool in CONCURRENT_POOLS
    return PoolProfile(
        pool=pool,
        concurrency=slots,
        # One message per slot, except on the asyncio pool: a long I/O job must not sit reserved behind another,
        # and a job reserved but not started when the broker connection drops runs here and is redelivered too.
        # The asyncio pool keeps a second message per slot ready, so no slot waits for a fetch (at -c 50 and
        # 100 ms jobs that took it from about 75 % to about 90 % of the Little's-law limit).
        prefetch_multiplier=2 if pool == "asyncio" else 1,
        # With that second message per slot, the asyncio worker fetches once a quarter of its window is free,
        # in one round trip for the lot (loopline.transport.redis); the others fetch as soon as a slot is free.
        fetch_when_free=0.25 if pool == "asyncio" else 0.0,
        max_connections=max(MIN_CONNECTIONS, slots + CONNECTION_HEADROOM) if concurrent else MIN_CONNECTIONS,
        producer_pool_limit=max(10, min(slots, 64)),
    )
