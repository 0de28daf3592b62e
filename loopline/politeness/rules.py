"""Per-host rules: parsing ``N/s|N/m|N/h`` and the rule store in the broker's Redis."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import redis

from loopline.politeness.keys import RULES_KEY, host_key, waiting_key

__all__ = ["PERIODS_S", "Rule", "RuleError", "RuleStore", "host_of", "parse_rate"]

PERIODS_S = {"s": 1.0, "m": 60.0, "h": 3600.0}
MAX_BURST = 10_000
MAX_CONCURRENCY = 100_000
#: the rule holds as the remote side counts, with up to this much between a request's turn and its arrival
#: (a busy worker, the network): requests are spaced over period + allowance, so N/s runs at >= 90 % of N/s
ARRIVAL_ALLOWANCE_MS = 100.0
_RATE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*/\s*([smh])\s*")
_HOST = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?|\[?[0-9a-f:.]+\]?")


class RuleError(ValueError):
    """A rule (rate, burst, concurrency or host) loopline cannot use; the message says which part and why."""


def parse_rate(text: str) -> tuple[float, str]:
    """``"5/s"`` -> (5.0, "s"). RuleError for anything but a positive count per s, m or h."""
    found = _RATE.fullmatch(text)
    if found is None:
        raise RuleError(f"rate {text!r} must look like N/s, N/m or N/h (for example 5/s or 300/m)")
    count = float(found.group(1))
    if count <= 0:
        raise RuleError(f"rate {text!r} must allow at least some requests: N must be above 0")
    return count, found.group(2)


def host_of(url_or_host: str) -> str:
    """The key rules and limits use: the URL's host name, lowercased, without port (a bare host is taken as is)."""
    text = url_or_host.strip()
    host = urlsplit(text).hostname if "://" in text else urlsplit(f"//{text}").hostname
    if not host or not _HOST.fullmatch(host):
        raise RuleError(f"{url_or_host!r} is not a host name or URL")
    return host.rstrip(".")


@dataclass(frozen=True)
class Rule:
    """How requests to one host are spread: a rate (with a burst on top) and/or a cap on requests in flight."""

    rate: str | None = None
    burst: int = 0
    concurrency: int = 0

    def __post_init__(self) -> None:
        if self.rate is not None:
            parse_rate(self.rate)
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or not 0 <= self.burst <= MAX_BURST:
            raise RuleError(f"burst must be a whole number in [0, {MAX_BURST}], got {self.burst!r}")
        if (isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int)
                or not 0 <= self.concurrency <= MAX_CONCURRENCY):
            raise RuleError(f"concurrency must be a whole number in [0, {MAX_CONCURRENCY}] (0: no cap), "
                            f"got {self.concurrency!r}")
        if self.rate is None and self.concurrency == 0:
            raise RuleError("a rule needs a rate (N/s, N/m, N/h), a concurrency above 0, or both")
        if self.rate is None and self.burst:
            raise RuleError("burst only applies to a rate")

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two requests at the steady rate (see ARRIVAL_ALLOWANCE_MS); 0 without a rate."""
        if self.rate is None:
            return 0.0
        count, unit = parse_rate(self.rate)
        return (PERIODS_S[unit] * 1000 + ARRIVAL_ALLOWANCE_MS) / count

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Rule:
        data = json.loads(raw)
        return cls(rate=data.get("rate"), burst=int(data.get("burst", 0)), concurrency=int(data.get("concurrency", 0)))


class RuleStore:
    """The rules in Redis: one hash, host -> rule as JSON, read by every worker (each caches it for a second)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def set(self, host: str, rule: Rule) -> None:
        """Store ``rule`` for ``host``; jobs already queued for the host are spread again under the new rule."""
        host = host_of(host)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(RULES_KEY, host, rule.to_json())
            self._forget_queue(pipe, host)
            pipe.execute()

    def clear(self, host: str) -> bool:
        """Remove the rule of ``host``; True if there was one."""
        host = host_of(host)
        with self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(RULES_KEY, host)
            self._forget_queue(pipe, host)
            removed, *_ = pipe.execute()
        return bool(removed)

    def all(self) -> dict[str, Rule]:
        return {_text(host): Rule.from_json(raw) for host, raw in self.client.hgetall(RULES_KEY).items()}

    @staticmethod
    def _forget_queue(pipe: redis.client.Pipeline, host: str) -> None:
        # The virtual queue was spaced for the old rule; waiting jobs re-check when they come back.
        pipe.hdel(host_key(host), "qtail")
        pipe.delete(waiting_key(host))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
