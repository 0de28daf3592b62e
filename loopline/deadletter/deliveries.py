"""Run counts per job: kombu's Redis transport flags a redelivery but does not count them, so loopline does.

A job's first delivery costs nothing. When kombu puts an unacknowledged message back in its queue
(``kombu.transport.redis.Channel._do_restore_message``: a worker died or stopped, or a prefork child was
lost under ``task_reject_on_worker_lost``) it marks it ``redelivered``. Each time such a redelivered job
*starts* (``task_prerun``, in the process that runs it, before the body) a counter in Redis goes up, keyed
by task id and retry number (a ``self.retry()`` is a new message with the same id, not a redelivery).
Counting starts rather than receipts keeps jobs that merely sat prefetched in a dying worker from being
taken for poison.
"""

from __future__ import annotations

from typing import Any

import redis

__all__ = ["COUNT_TTL_S", "count_key", "forget", "is_redelivery", "record_start", "runs_so_far"]

# Long enough for a redelivered job to wait its turn behind a long queue; short enough not to pile up.
COUNT_TTL_S = 7 * 24 * 3600


def count_key(task_id: str, retries: int) -> str:
    return f"loopline:deliveries:{task_id}:{retries}"


def is_redelivery(*sources: Any) -> bool:
    """True if the transport flagged the message (its headers or delivery_info) as delivered before."""
    return any(isinstance(source, dict) and bool(source.get("redelivered")) for source in sources)


def record_start(client: redis.Redis, task_id: str, retries: int) -> int:
    """Count one more start of a redelivered job; returns the starts counted so far."""
    key = count_key(task_id, retries)
    with client.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, COUNT_TTL_S)
        count, _ = pipe.execute()
    return int(count)


def runs_so_far(client: redis.Redis, task_id: str, retries: int) -> int:
    """How often a redelivered job has started without being acknowledged: its first delivery plus the counted."""
    return 1 + int(client.get(count_key(task_id, retries)) or 0)


def forget(client: redis.Redis, task_id: str, retries: int) -> None:
    """Reset the count, so a replayed job gets its full number of runs again."""
    client.delete(count_key(task_id, retries), count_key(task_id, 0))
