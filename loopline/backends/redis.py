"""Celery's Redis result backend, storing a task's state in one round trip instead of two.

``celery.backends.base.BaseKeyValueStoreBackend._store_result`` (Celery 5.7) first reads the stored state
with a GET, so that a late duplicate never overwrites a SUCCESS, and then writes with
``celery.backends.redis.RedisBackend._set``: a MULTI/SETEX/PUBLISH/EXEC pipeline. Per finished job that
is two round trips and a transaction; on a busy asyncio worker they were a fifth of its CPU.

Here the same check and write run as one Lua script, atomically: the SUCCESS guard holds even against
a duplicate finishing at the same moment, which the stock read-then-write does not promise. The meta
stored, its key, expiry (``result_expires``, ``failure_expires`` for failures), the message published for
``AsyncResult.get`` waiters, the size limit and the retry policy (``result_backend_always_retry``) are
Celery's own. A result serializer other than JSON, or ``result_compression``, keeps Celery's stock path,
since the script reads the stored state as plain JSON.

On the asyncio pool, where hundreds of tasks finish on one event-loop thread, a task's write does not
hold the loop for a round trip: it joins the writes of the other tasks that finished in the same loop
iteration, and they go out as one pipeline once the iteration's callbacks have run. The pool waits for
the write before it acks the task's message (``loopline.concurrency.bridge.defer``), so the order "result stored,
then acked" holds as before. A failed pipeline falls back to the one-by-one path with Celery's retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from celery.result import task_join_will_block
from kombu.utils.encoding import bytes_to_str
from redis.exceptions import NoScriptError

from loopline.concurrency.bridge import await_only, defer, on_loop

__all__ = ["STORE_SCRIPT", "SUBSCRIBE_CHUNK", "RedisBackend"]

logger = logging.getLogger(__name__)

# KEYS[1]: the task's meta key. ARGV: the encoded meta, its expiry in seconds (0: none).
# Returns 0 when a stored SUCCESS was kept, 1 when the meta was written and published.
STORE_SCRIPT = """
local stored = redis.call('GET', KEYS[1])
if stored then
  local ok, meta = pcall(cjson.decode, stored)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
local expires = tonumber(ARGV[2])
if expires > 0 then
  redis.call('SETEX', KEYS[1], expires, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
STORE_SHA = hashlib.sha1(STORE_SCRIPT.encode()).hexdigest()
# Result channels per SUBSCRIBE command of a bulk send.
SUBSCRIBE_CHUNK = 1000


class RedisBackend(CeleryRedisBackend):
    """``redis://`` and ``rediss://`` result backend that ``loopline.install`` names in the app's result_backend URL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # One backend per process, not per thread: Celery keeps a backend per thread unless it is thread_safe
        # (celery.app.base.Celery._backend), and under gevent a thread-local is a greenlet-local, so every task
        # built a backend, a Redis client and its connection pool (a fifth of a gevent worker's CPU at -c 1000,
        # celery #6819). Sharing is safe: the redis-py client takes a connection from its pool per command (sized
        # to the slots, redis_max_connections), Celery's ResultConsumer does its pubsub work under its own lock,
        # and the state kept here is set once (_store_script) or per event loop (_batches).
        self.thread_safe = True
        self._store_script: Any = None
        self._batches: dict[asyncio.AbstractEventLoop, _LoopBatch] = {}

    def on_tasks_call(self, task_ids: Sequence[str]) -> None:
        """What :meth:`on_task_call` does for each id, as one SUBSCRIBE per chunk: for bulk producers.

        Celery's ``RedisBackend.on_task_call`` subscribes to each task's result channel with a command of its
        own (``ResultConsumer._consume_from``). Here the keys are marked subscribed, under the consumer's own
        lock, and subscribed together; a later ``on_task_call`` for one of them then finds it subscribed and
        sends nothing. Same condition as Celery's: nothing when joining would block (inside a task).
        """
        if task_join_will_block() or not task_ids:
            return
        consumer = self.result_consumer
        keys = [consumer._get_key_for_task(task_id) for task_id in task_ids]
        with consumer._locked():
            if consumer._pubsub is None:
                # ResultConsumer.start, without its first subscription
                consumer._pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            new = [key for key in keys if key not in consumer.subscribed_to]
            consumer._pending_unsubscribe.difference_update(new)
            consumer.subscribed_to.update(new)
            with consumer.reconnect_on_error():
                for lo in range(0, len(new), SUBSCRIBE_CHUNK):
                    consumer._pubsub.subscribe(*new[lo:lo + SUBSCRIBE_CHUNK])

    def _store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                      **kwargs: Any) -> Any:
        if self.serializer != "json" or self.compression:
            return super()._store_result(task_id, result, state, traceback=traceback, request=request, **kwargs)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        seconds = int(expires.total_seconds() if hasattr(expires, "total_seconds") else (expires or 0))
        key = self.get_key_for_task(task_id)
        if on_loop():
            self._store_on_loop(key, value, seconds)
        else:
            self.ensure(self._store, (key, value, seconds))
        return result

    def _store(self, key: bytes | str, value: str | bytes, seconds: int) -> None:
        if self._store_script is None:
            # redis-py's Script: EVALSHA, loading the script again after a Redis restart or SCRIPT FLUSH.
            self._store_script = self.client.register_script(STORE_SCRIPT)
        self._store_script(keys=[key], args=[value, seconds])

    def _store_on_loop(self, key: bytes | str, value: str | bytes, seconds: int) -> None:
        loop = asyncio.get_running_loop()
        batch = self._batches.get(loop)
        if batch is None:
            batch = self._batches[loop] = _LoopBatch(self, loop)
        written = batch.add(key, value, seconds)
        if not defer(written):
            await_only(written)


class _LoopBatch:
    """The result writes of tasks that finished in one iteration of an event loop, sent as one pipeline."""

    def __init__(self, backend: RedisBackend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend, self.loop = backend, loop
        self.pending: list[tuple[bytes | str, str | bytes, int, asyncio.Future[None]]] = []

    def add(self, key: bytes | str, value: str | bytes, seconds: int) -> asyncio.Future[None]:
        written: asyncio.Future[None] = self.loop.create_future()
        if not self.pending:
            # call_soon runs after the callbacks already due in this iteration: the writes of every task
            # that finishes in this iteration go out together.
            self.loop.call_soon(self.flush)
        self.pending.append((key, value, seconds, written))
        return written

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        try:
            outcomes = self._send(batch)
        except Exception as exc:  # noqa: BLE001 - connection trouble: each write retries on its own below
            logger.warning("result backend: a batch of %d writes failed (%s); writing them one by one",
                           len(batch), exc)
            outcomes = [self._one_by_one(key, value, seconds) for key, value, seconds, _ in batch]
        for (_, _, _, written), outcome in zip(batch, outcomes, strict=True):
            if written.done():
                continue
            if isinstance(outcome, BaseException):
                written.set_exception(outcome)
            else:
                written.set_result(None)

    def _send(self, batch: list[tuple[bytes | str, str | bytes, int, asyncio.Future[None]]]) -> list[Any]:
        # EVALSHA directly: redis-py's Script in a pipeline adds a SCRIPT EXISTS round trip to every batch.
        todo = list(range(len(batch)))
        outcomes: list[Any] = [None] * len(batch)
        for _attempt in range(2):
            pipe = self.backend.client.pipeline(transaction=False)
            for i in todo:
                key, value, seconds, _ = batch[i]
                pipe.evalsha(STORE_SHA, 1, key, value, seconds)
            results = pipe.execute(raise_on_error=False)
            for i, result in zip(todo, results, strict=True):
                outcomes[i] = result
            todo = [i for i, result in zip(todo, results, strict=True) if isinstance(result, NoScriptError)]
            if not todo:
                break
            self.backend.client.script_load(STORE_SCRIPT)  # Redis restarted or its scripts were flushed
        return outcomes

    def _one_by_one(self, key: bytes | str, value: str | bytes, seconds: int) -> BaseException | None:
        try:
            self.backend.ensure(self.backend._store, (key, value, seconds))
        except Exception as exc:  # noqa: BLE001 - handed to the task that is waiting for this write
            return exc
        return None
