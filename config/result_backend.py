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
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import BackendStoreError
from celery.backends.redis import RedisBackend as CeleryRedisBackend
from kombu.utils.encoding import bytes_to_str

__all__ = ["STORE_SCRIPT", "RedisBackend"]

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


class RedisBackend(CeleryRedisBackend):
    """``redis://`` and ``rediss://`` result backend of the loopline app (config.celery_app)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._store_script: Any = None

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
        self.ensure(self._store, (self.get_key_for_task(task_id), value, expires))
        return result

    def _store(self, key: bytes | str, value: str | bytes, expires: Any) -> None:
        if self._store_script is None:
            # redis-py's Script: EVALSHA, loading the script again after a Redis restart or SCRIPT FLUSH.
            self._store_script = self.client.register_script(STORE_SCRIPT)
        seconds = int(expires.total_seconds() if hasattr(expires, "total_seconds") else (expires or 0))
        self._store_script(keys=[key], args=[value, seconds])
