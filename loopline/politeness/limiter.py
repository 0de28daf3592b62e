"""The limiter: one Lua script per request (GCRA rate, concurrency lease, pause) and one to give a lease back.

GCRA (the generic cell rate algorithm) keeps one number per host, its theoretical arrival time ``tat``: a
request may start when ``now >= tat - tau`` (``tau`` = burst x interval), and then moves ``tat`` on by one
interval. O(1) per request, one key per host, and ``now`` is Redis' own clock (``TIME``), so the clocks of
the workers do not matter. In the same script: the host's concurrency leases (a ZSET of lease ids scored by
expiry; expired ones are purged first, so a worker killed while holding one leaks it only until it expires)
and the host's pause (a 429/503's ``Retry-After``).

A request that may not start yet is told when to come back, and takes a place in the host's virtual queue:
each newcomer is due one spacing (the rate's interval, or latency / concurrency) after the last one, so a
backlog comes back spread out instead of all at once. A job keeps its place when it comes back early.
Tests pass ``now_ms`` explicitly; production leaves it out and the script reads ``TIME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from loopline.politeness.keys import HOSTS_KEY, PAUSED_KEY, host_key, leases_key, waiting_key
from loopline.politeness.rules import Rule

__all__ = ["ACQUIRE_SCRIPT", "AsyncLimiter", "Decision", "Limiter", "RELEASE_SCRIPT"]

#: a waiting job not back this long after it was due is taken for gone
STALE_MS = 30_000
#: host state is dropped this long after its last request
STATE_TTL_MS = 3_600_000
#: latency assumed for a host until one is measured (spaces concurrency waiters)
DEFAULT_LATENCY_MS = 100
#: repeated 429s without Retry-After within this window double the host's pause
STRIKE_WINDOW_MS = 60_000
BACKOFF_BASE_MS = 1_000
BACKOFF_MAX_MS = 60_000

_NOW = """
local now = tonumber(ARGV[#ARGV])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
"""

# KEYS: host hash, leases, waiting, paused, hosts
# ARGV: host, interval_ms, tau_ms, concurrency, lease_id, lease_ttl_ms, job_id, now_ms ('' = Redis TIME)
# -> {1, in flight} | {0, wait_ms, reason}
ACQUIRE_SCRIPT = _NOW + f"""
local host, interval, tau, conc = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local job = ARGV[7]
redis.call('ZADD', KEYS[5], now, host)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - {STALE_MS})
local mine = false
if job ~= '' then mine = tonumber(redis.call('ZSCORE', KEYS[3], job)) end
local wait, reason = 0, ''
local paused = tonumber(redis.call('HGET', KEYS[4], host))
if paused then
  if paused > now then wait, reason = paused - now, 'paused' else redis.call('HDEL', KEYS[4], host) end
end
local inflight = 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  inflight = redis.call('ZCARD', KEYS[2])
end
local state = redis.call('HMGET', KEYS[1], 'tat', 'qtail', 'lat_ms')
local tat = tonumber(state[1]) or now
if tat < now then tat = now end
local qtail = tonumber(state[2]) or 0
local lat = tonumber(state[3]) or {DEFAULT_LATENCY_MS}
if reason == '' and interval > 0 and tat - tau > now then wait, reason = tat - tau - now, 'rate' end
if reason == '' and conc > 0 and inflight >= conc then wait, reason = lat / conc, 'concurrency' end
if reason == '' and not mine and qtail > now then reason = 'queue' end
if reason == '' then
  if interval > 0 then redis.call('HSET', KEYS[1], 'tat', string.format('%.3f', tat + interval)) end
  if conc > 0 then
    local ttl = tonumber(ARGV[6])
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[5])
    redis.call('PEXPIRE', KEYS[2], math.floor(ttl) + 60000)
  end
  if mine then redis.call('ZREM', KEYS[3], job) end
  local sec = math.floor(now / 1000)
  local cur = redis.call('HMGET', KEYS[1], 'sec', 'n_sec')
  if tonumber(cur[1]) == sec then
    redis.call('HINCRBY', KEYS[1], 'n_sec', 1)
  else
    local prev = 0
    if tonumber(cur[1]) == sec - 1 then prev = tonumber(cur[2]) or 0 end
    redis.call('HSET', KEYS[1], 'sec', sec, 'n_sec', 1, 'n_prev', prev)
  end
  redis.call('HINCRBY', KEYS[1], 'granted', 1)
  redis.call('PEXPIRE', KEYS[1], {STATE_TTL_MS})
  return {{1, inflight + 1}}
end
local spacing = interval
if conc > 0 then spacing = math.max(spacing, lat / conc) end
local due
if mine and mine + spacing > now + wait then  -- back early, or its slot went only a moment ago: keeps its place
  due = math.max(mine, now + wait)
else
  due = math.max(now + wait, qtail + spacing)
  redis.call('HSET', KEYS[1], 'qtail', string.format('%.3f', due))
  redis.call('PEXPIRE', KEYS[1], {STATE_TTL_MS})
end
if job ~= '' then
  redis.call('ZADD', KEYS[3], due, job)
  redis.call('PEXPIRE', KEYS[3], math.floor(due - now) + {STALE_MS * 2})
end
return {{0, math.max(1, math.ceil(due - now)), reason}}
"""

# KEYS: host hash, leases, paused
# ARGV: host, lease_id ('' = none), elapsed_ms ('' = unknown), status (0 = none), retry_after_ms ('' = none),
#       now_ms ('' = Redis TIME)
# -> the time the host is paused until (ms, Redis clock), 0 if not paused by this answer
RELEASE_SCRIPT = _NOW + f"""
local host, lease, status = ARGV[1], ARGV[2], tonumber(ARGV[4])
if lease ~= '' then redis.call('ZREM', KEYS[2], lease) end
local elapsed = tonumber(ARGV[3])
if elapsed then
  local lat = tonumber(redis.call('HGET', KEYS[1], 'lat_ms'))
  if lat then lat = 0.8 * lat + 0.2 * elapsed else lat = elapsed end
  redis.call('HSET', KEYS[1], 'lat_ms', string.format('%.3f', lat))
end
local pause_to = 0
if status == 429 or status == 503 then
  redis.call('HINCRBY', KEYS[1], 'n_' .. status, 1)
  local retry_after = tonumber(ARGV[5])
  if retry_after then
    pause_to = now + retry_after
  elseif status == 429 then
    local s = redis.call('HMGET', KEYS[1], 'strikes', 'strike_at')
    local strikes = tonumber(s[1]) or 0
    if (tonumber(s[2]) or 0) < now - {STRIKE_WINDOW_MS} then strikes = 0 end
    strikes = strikes + 1
    redis.call('HSET', KEYS[1], 'strikes', strikes, 'strike_at', string.format('%.3f', now))
    pause_to = now + math.min({BACKOFF_BASE_MS} * 2 ^ math.min(strikes - 1, 30), {BACKOFF_MAX_MS})
  end
  if pause_to > 0 then
    local current = tonumber(redis.call('HGET', KEYS[3], host)) or 0
    if pause_to > current then redis.call('HSET', KEYS[3], host, string.format('%.3f', pause_to)) end
  end
end
redis.call('PEXPIRE', KEYS[1], {STATE_TTL_MS})
return math.ceil(pause_to)
"""


@dataclass(frozen=True)
class Decision:
    """The limiter's answer: go (a lease is held when the rule caps concurrency), or wait ``wait_ms``."""

    go: bool
    wait_ms: int = 0
    reason: str = ""
    in_flight: int = 0


def _opt(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _acquire_call(host: str, rule: Rule | None, lease_id: str, lease_ttl_ms: float, job_id: str,
                  now_ms: float | None) -> tuple[list[str], list[Any]]:
    interval = rule.interval_ms if rule is not None else 0.0
    tau = interval * rule.burst if rule is not None else 0.0
    concurrency = rule.concurrency if rule is not None else 0
    keys = [host_key(host), leases_key(host), waiting_key(host), PAUSED_KEY, HOSTS_KEY]
    args = [host, repr(interval), repr(tau), concurrency, lease_id, repr(float(lease_ttl_ms)), job_id,
            _opt(now_ms)]
    return keys, args


def _release_call(host: str, lease_id: str, elapsed_ms: float | None, status: int, retry_after_ms: float | None,
                  now_ms: float | None) -> tuple[list[str], list[Any]]:
    keys = [host_key(host), leases_key(host), PAUSED_KEY]
    args = [host, lease_id, _opt(elapsed_ms), status, _opt(retry_after_ms), _opt(now_ms)]
    return keys, args


def _decision(reply: list[Any]) -> Decision:
    if int(reply[0]) == 1:
        return Decision(go=True, in_flight=int(reply[1]))
    reason = reply[2].decode() if isinstance(reply[2], bytes) else str(reply[2])
    return Decision(go=False, wait_ms=max(1, int(reply[1])), reason=reason)


class Limiter:
    """The two scripts on a sync redis-py client (one round trip each)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    def acquire(self, host: str, rule: Rule | None, *, lease_id: str = "", lease_ttl_ms: float = 60_000,
                job_id: str = "", now_ms: float | None = None) -> Decision:
        keys, args = _acquire_call(host, rule, lease_id, lease_ttl_ms, job_id, now_ms)
        return _decision(self._acquire(keys=keys, args=args))

    def release(self, host: str, *, lease_id: str = "", elapsed_ms: float | None = None, status: int = 0,
                retry_after_ms: float | None = None, now_ms: float | None = None) -> float:
        """Give the lease back and record the answer; returns the pause it caused (ms, Redis clock) or 0."""
        keys, args = _release_call(host, lease_id, elapsed_ms, status, retry_after_ms, now_ms)
        return float(self._release(keys=keys, args=args))


class AsyncLimiter:
    """The same scripts on a ``redis.asyncio`` client, for code on an event loop."""

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._acquire = client.register_script(ACQUIRE_SCRIPT)
        self._release = client.register_script(RELEASE_SCRIPT)

    async def acquire(self, host: str, rule: Rule | None, *, lease_id: str = "", lease_ttl_ms: float = 60_000,
                      job_id: str = "", now_ms: float | None = None) -> Decision:
        keys, args = _acquire_call(host, rule, lease_id, lease_ttl_ms, job_id, now_ms)
        return _decision(await self._acquire(keys=keys, args=args))

    async def release(self, host: str, *, lease_id: str = "", elapsed_ms: float | None = None, status: int = 0,
                      retry_after_ms: float | None = None, now_ms: float | None = None) -> float:
        keys, args = _release_call(host, lease_id, elapsed_ms, status, retry_after_ms, now_ms)
        return float(await self._release(keys=keys, args=args))
