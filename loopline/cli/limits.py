"""``loopline limits``: set, list and clear per-host rules in the broker's Redis."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from loopline.politeness.rules import Rule, RuleStore, host_of

__all__ = ["DESCRIPTION", "add_limits_arguments", "run_from_args"]

DESCRIPTION = (
    "Per-host politeness rules, kept in the broker's Redis and read by every worker within about a second, "
    "with no restart. The key is the URL's host name, lowercased, without port. RATE is N/s, N/m or N/h: at "
    "most that many requests start per period (plus --burst at once), counted over every worker, pool and "
    "machine; --concurrency caps the requests in flight. LOOPLINE_DEFAULT_HOST_RATE and "
    "LOOPLINE_DEFAULT_HOST_CONCURRENCY apply to hosts without a rule."
)
console = Console(width=None if sys.stdout.isatty() else 160)


def add_limits_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("set", help="set (or replace) the rule of one host",
                           description="Set the rule of HOST (a host name or a URL). Examples: "
                                       "`loopline limits set example.com 5/s --concurrency 4`, "
                                       "`loopline limits set api.partner.io 300/m`.")
    a.add_argument("host", help="host name or URL")
    a.add_argument("rate", nargs="?", help="N/s, N/m or N/h (may be left out with --concurrency)")
    a.add_argument("--burst", type=int, default=0, help="requests that may start at once on top of the rate "
                   "(default: %(default)s)")
    a.add_argument("--concurrency", type=int, default=0, help="requests in flight at most, over all workers "
                   "(default: 0, no cap)")
    a = actions.add_parser("list", help="rules and live figures: rate now, in flight, waiting, paused until",
                           description="List every host with a rule or seen by the limiter within the last hour: "
                                       "its rule, requests started in the last second, in flight, waiting, paused "
                                       "until, and the 429s it answered.")
    a.add_argument("--json", action="store_true", help="one JSON object per host instead of a table")
    a = actions.add_parser("clear", help="remove the rule of one host", description="Remove the rule of HOST.")
    a.add_argument("host", help="host name or URL")


def _broker_url(args: argparse.Namespace) -> str:
    from loopline.cli.apps import DEFAULT_APP, load_app
    from loopline.politeness.engine import redis_url_of

    return redis_url_of(load_app(getattr(args, "app", DEFAULT_APP)))


def run_from_args(args: argparse.Namespace) -> int:
    """The ``loopline limits`` handler: 0 on success, 1 when ``clear`` found no rule; bad rules raise RuleError."""
    if args.action == "set":  # refused before anything connects
        rule = Rule(rate=args.rate, burst=args.burst, concurrency=args.concurrency)
        host = host_of(args.host)
    url = _broker_url(args)
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        if args.action == "set":
            RuleStore(client).set(host, rule)
            print(f"{host}: {_describe(rule)}")
            return 0
        if args.action == "clear":
            host = host_of(args.host)
            if RuleStore(client).clear(host):
                print(f"{host}: rule removed")
                return 0
            print(f"{host}: no rule", file=sys.stderr)
            return 1
        return _list(client, args)
    except redis.RedisError as exc:
        from loopline.settings import redact_url

        raise RuntimeError(f"cannot use the broker's Redis at {redact_url(url)}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()


def _describe(rule: Rule | None) -> str:
    if rule is None:
        return "-"
    parts = []
    if rule.rate is not None:
        parts.append(rule.rate + (f" +{rule.burst} burst" if rule.burst else ""))
    if rule.concurrency:
        parts.append(f"{rule.concurrency} in flight")
    return ", ".join(parts)


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _list(client: redis.Redis, args: argparse.Namespace) -> int:
    from loopline.politeness.stats import host_figures

    figures = host_figures(client)
    if args.json:
        for figure in figures:
            print(json.dumps(figure.as_dict()))
        return 0
    table = Table(title=f"per-host limits: {sum(f.rule is not None for f in figures)} rules")
    for column in ("host", "rule", "rate now /s", "in flight", "waiting", "paused until", "429s"):
        table.add_column(column, justify="left" if column in ("host", "rule", "paused until") else "right")
    for f in figures:
        row: list[Any] = [f.host, _describe(f.rule), f.rate_now, f.in_flight, f.waiting, _when(f.paused_until),
                          f.answers_429]
        table.add_row(*(str(v) for v in row))
    console.print(table)
    return 0
