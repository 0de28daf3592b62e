"""The dead-letter store: jobs and messages loopline gave up on, kept in Redis with the reason why."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import redis

__all__ = [
    "ENTRIES_KEY",
    "ORDER_KEY",
    "RAW_LIMIT_BYTES",
    "DeadLetter",
    "DeadLetterStore",
    "DeadLettered",
    "Reason",
    "size",
    "truncate_raw",
]

ENTRIES_KEY = "loopline:dlq:entries"  # hash: entry id -> JSON of a DeadLetter
ORDER_KEY = "loopline:dlq:order"  # sorted set: entry id -> time it was dead-lettered
# What is kept of a message that cannot be decoded: enough to see what it was, never an oversized body.
RAW_LIMIT_BYTES = 4096
SCAN_BATCH = 200


class DeadLettered(Exception):
    """A job's result when loopline gave up on it; the message starts with the reason (``poison: ...``)."""


class Reason:
    """Why a job was dead-lettered; the first word of every entry's story."""

    POISON = "poison"  # delivered more than LOOPLINE_MAX_DELIVERIES times; its worker died each time
    RETRIES_EXHAUSTED = "retries-exhausted"
    UNDECODABLE = "undecodable"  # the envelope or the body is not what its content type says
    DISALLOWED = "disallowed-content"  # a serializer the worker does not accept, such as pickle
    INVALID = "invalid"  # decodes, but is not a task message Celery can run
    UNKNOWN_TASK = "unknown-task"
    OVERSIZED = "oversized"  # over LOOPLINE_MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered job: what it was, why it was given up, and how often it was delivered."""

    reason: str
    error: str
    task: str | None = None
    task_id: str | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    queue: str | None = None
    deliveries: int = 1
    retries: int = 0
    traceback: str | None = None
    raw: str | None = None
    dead_at: float = field(default_factory=time.time)
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.task_id or f"msg-{uuid.uuid4().hex}")

    @property
    def replayable(self) -> bool:
        return self.task is not None and isinstance(self.args, list) and isinstance(self.kwargs, dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=repr)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeadLetter:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def truncate_raw(raw: bytes | str | None) -> str | None:
    """The first RAW_LIMIT_BYTES of a message, as text, with its full length noted when cut."""
    if raw is None:
        return None
    data = raw.encode("utf-8", "replace") if isinstance(raw, str) else raw
    text = data[:RAW_LIMIT_BYTES].decode("utf-8", "replace")
    return text if len(data) <= RAW_LIMIT_BYTES else f"{text}... ({len(data)} bytes in all)"


def size(client: redis.Redis) -> int:
    """How many entries the dead-letter store holds (for the dashboard and Flower-side monitoring)."""
    return int(client.zcard(ORDER_KEY))


class DeadLetterStore:
    """Entries in two Redis keys: a hash of id -> JSON, and a sorted set that orders them by time."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def add(self, entry: DeadLetter) -> DeadLetter:
        """Store ``entry`` (replacing an older entry with the same id) and return it."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(ENTRIES_KEY, entry.id, entry.to_json())
            pipe.zadd(ORDER_KEY, {entry.id: entry.dead_at})
            pipe.execute()
        return entry

    def get(self, entry_id: str) -> DeadLetter | None:
        text = self.client.hget(ENTRIES_KEY, entry_id)
        return None if text is None else DeadLetter.from_json(text)

    def ids(self, limit: int | None = None) -> list[str]:
        """Entry ids, oldest first."""
        end = -1 if limit is None else limit - 1
        return [item.decode() if isinstance(item, bytes) else str(item) for item in
                self.client.zrange(ORDER_KEY, 0, end)]

    def entries(self, limit: int | None = None) -> Iterator[DeadLetter]:
        """Entries, oldest first, read in batches."""
        wanted = self.ids(limit)
        for start in range(0, len(wanted), SCAN_BATCH):
            batch = wanted[start:start + SCAN_BATCH]
            for text in self.client.hmget(ENTRIES_KEY, batch):
                if text is not None:
                    yield DeadLetter.from_json(text)

    def remove(self, entry_id: str) -> bool:
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(ENTRIES_KEY, entry_id)
            pipe.zrem(ORDER_KEY, entry_id)
            removed, _ = pipe.execute()
        return bool(removed)

    def purge(self) -> int:
        """Remove every entry; returns how many there were."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zcard(ORDER_KEY)
            pipe.delete(ENTRIES_KEY, ORDER_KEY)
            count, _ = pipe.execute()
        return int(count)

    def size(self) -> int:
        return size(self.client)
