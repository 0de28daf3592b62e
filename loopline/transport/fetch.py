"""Fetching a message from Redis so that no crash can lose it: pop and record as unacked in one atomic step.

kombu's Redis transport takes a message with ``BRPOP``, which removes it from the queue, and records it
in the ``unacked`` hash only once the worker has read the reply and built the message
(``kombu.transport.redis.QoS.append``). A worker killed in between (SIGKILL, OOM, power) loses the message
for good: it is neither queued nor unacked, so no visibility timeout ever brings it back. Under load
a consumer nearly always has one such reply in flight.

Here the pop is a Lua script that moves the message into ``unacked``/``unacked_index`` in the same step,
in the format kombu's ``QoS.restore_by_tag`` reads; one call takes as many messages as the consumer has
prefetch credit for (at most MAX_BATCH), so a busy worker pays one round trip per batch, not per message.
Waiting for work uses ``BLMOVE key key RIGHT RIGHT``, which blocks until the list has an element and
leaves the list as it was (Redis 6.2 and later); the pop runs again when it returns.
"""

from __future__ import annotations

__all__ = ["MAX_BATCH", "MIN_REDIS_VERSION", "POP_SCRIPT", "supports_atomic_fetch"]

MIN_REDIS_VERSION = (6, 2)  # BLMOVE
MAX_BATCH = 64  # entries per fetch: a worker with room for more takes them in one round trip

# KEYS: the queue keys in priority order, then kombu's unacked hash and unacked index.
# ARGV: the time to record (seconds, like QoS.append), the largest entry to record (0: no limit), and the
# most entries to take (the consumer's prefetch credit, capped at MAX_BATCH).
# Returns {key, entry, tag, key, entry, 0, ...}: a triple per entry taken, oldest first, with the delivery tag
# (a string) under which the entry was recorded as unacked, or the integer 0 when it is not a usable envelope
# (the client dead-letters it); or nil when every queue is empty. The tag is the one read here: Lua's cjson
# accepts some JSON that Python's refuses (``01``, ``0x10``, ``nan``), and such an entry, recorded here but
# refused by the client, must be unrecorded without parsing it again.
POP_SCRIPT = """
local n = #KEYS - 2
local limit = tonumber(ARGV[2])
local wanted = tonumber(ARGV[3])
local taken = {}
for i = 1, n do
  while #taken < 3 * wanted do
    local entry = redis.call('LINDEX', KEYS[i], -1)
    if not entry then break end
    local ok, message = true, nil
    if limit > 0 and #entry > limit then ok = false else ok, message = pcall(cjson.decode, entry) end
    local properties = ok and type(message) == 'table' and message['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    local info = type(properties) == 'table' and properties['delivery_info']
    if type(tag) ~= 'string' or type(info) ~= 'table' then
      redis.call('RPOP', KEYS[i])
      taken[#taken + 1] = KEYS[i]; taken[#taken + 1] = entry; taken[#taken + 1] = 0
    else
      -- Record first, pop last: a write refused here (a full Redis) leaves the entry in its queue.
      redis.call('ZADD', KEYS[n + 2], ARGV[1], tag)
      redis.call('HSET', KEYS[n + 1], tag,
        '[' .. entry .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
      redis.call('RPOP', KEYS[i])
      taken[#taken + 1] = KEYS[i]; taken[#taken + 1] = entry; taken[#taken + 1] = tag
    end
  end
end
if #taken == 0 then return false end
return taken
"""


def supports_atomic_fetch(version: str) -> bool:
    """True for a Redis version string that has BLMOVE."""
    try:
        parts = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    return parts >= MIN_REDIS_VERSION
