"""The Redis keys of the politeness engine, in one place (all under ``loopline:polite:``)."""

from __future__ import annotations

__all__ = ["HOSTS_KEY", "PAUSED_KEY", "PREFIX", "RULES_KEY", "host_key", "leases_key", "waiting_key"]

PREFIX = "loopline:polite:"
#: host -> rule as JSON
RULES_KEY = PREFIX + "rules"
#: host -> paused until (ms, Redis clock); read by every worker once a second, so hosts without a rule pause too
PAUSED_KEY = PREFIX + "paused"
#: ZSET host -> last time a request for it was checked (ms), for `limits list` and the dashboard
HOSTS_KEY = PREFIX + "hosts"


def host_key(host: str) -> str:
    """Hash: GCRA's theoretical arrival time (tat), the virtual queue's tail (qtail), latency, counters."""
    return f"{PREFIX}h:{host}"


def leases_key(host: str) -> str:
    """ZSET of concurrency lease ids scored by expiry (ms)."""
    return f"{PREFIX}leases:{host}"


def waiting_key(host: str) -> str:
    """ZSET of job ids waiting for the host, scored by the time they are due (ms)."""
    return f"{PREFIX}waiting:{host}"
