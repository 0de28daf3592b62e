"""Per-host politeness: rate and concurrency limits shared by every worker, and remote back-off (429/503).

Rules live in the broker's Redis (``loopline limits set HOST RATE``); :func:`host_slot` takes a host's turn
for one request, and the built-in tasks take it for every request they make, redirect hops included.
"""

from __future__ import annotations

from loopline.politeness.backoff import retry_when_paused
from loopline.politeness.defer import DEFER_HEADER, deferring
from loopline.politeness.engine import PolitenessUnavailable, engine_for
from loopline.politeness.rules import Rule, RuleError, RuleStore, host_of, parse_rate
from loopline.politeness.slot import HostNotDue, HostSlot, host_slot

__all__ = ["DEFER_HEADER", "HostNotDue", "HostSlot", "PolitenessUnavailable", "Rule", "RuleError", "RuleStore",
           "deferring", "engine_for", "host_of", "host_slot", "parse_rate", "retry_when_paused"]
