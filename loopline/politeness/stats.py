"""Live figures per host (rule, rate now, in flight, waiting, paused until, 429s): `limits list`, the dashboard."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import redis

from loopline.politeness.keys import HOSTS_KEY, PAUSED_KEY, host_key, leases_key, waiting_key
from loopline.politeness.limiter import STALE_MS
from loopline.politeness.rules import Rule, RuleStore

__all__ = ["HostFigures", "host_figures"]

#: hosts checked within this long are listed even without a rule
RECENT_MS = 3_600_000


@dataclass(frozen=True)
class HostFigures:
    """One host's rule and what the limiter saw of it, read at one moment."""

    host: str
    rule: Rule | None
    rate_now: int  # requests started in the last whole second
    in_flight: int  # concurrency leases held (only counted for hosts with a concurrency cap)
    waiting: int  # jobs deferred or waiting for their turn
    paused_until: float | None  # epoch seconds (Redis' clock)
    answers_429: int
    answers_503: int
    started: int

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rule"] = None if self.rule is None else asdict(self.rule)
        return data


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    return int(float(value)) if value is not None else 0


def host_figures(client: redis.Redis) -> list[HostFigures]:
    """Every host with a rule or checked within the last hour, by host name."""
    seconds, micros = client.time()
    now = seconds * 1000 + micros / 1000
    rules = RuleStore(client).all()
    recent = [_text(h) for h in client.zrangebyscore(HOSTS_KEY, now - RECENT_MS, "+inf")]
    paused = {_text(h): float(v) for h, v in client.hgetall(PAUSED_KEY).items()}
    hosts = sorted(set(rules) | set(recent) | set(paused))
    with client.pipeline(transaction=False) as pipe:
        for host in hosts:
            pipe.hmget(host_key(host), "sec", "n_sec", "n_prev", "n_429", "n_503", "granted")
            pipe.zcount(leases_key(host), now, "+inf")
            pipe.zcount(waiting_key(host), now - STALE_MS, "+inf")
        replies = pipe.execute()
    figures = []
    this_second = int(now // 1000)
    for at, host in enumerate(hosts):
        (sec, n_sec, n_prev, n429, n503, granted), in_flight, waiting = replies[3 * at:3 * at + 3]
        sec_i = _int(sec) if sec is not None else None
        rate_now = _int(n_sec) if sec_i == this_second - 1 else _int(n_prev) if sec_i == this_second else 0
        until = paused.get(host)
        figures.append(HostFigures(
            host=host, rule=rules.get(host), rate_now=rate_now, in_flight=int(in_flight), waiting=int(waiting),
            paused_until=until / 1000 if until is not None and until > now else None,
            answers_429=_int(n429), answers_503=_int(n503), started=_int(granted),
        ))
    return figures
