"""The embedded Redis loopline starts on a free loopback port when no broker is configured."""

from __future__ import annotations

from .errors import RedisBinaryNotFound, RedisNotRunning, RedisStartError
from .process import find_redis_server, free_port
from .server import EmbeddedRedis, RedisStatus, running_url

__all__ = [
    "EmbeddedRedis",
    "RedisBinaryNotFound",
    "RedisNotRunning",
    "RedisStartError",
    "RedisStatus",
    "find_redis_server",
    "free_port",
    "running_url",
]
