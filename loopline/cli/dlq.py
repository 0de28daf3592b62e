"""``loopline dlq``: list, show, replay and purge the dead-letter store."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict
from typing import Any

import redis
from rich.console import Console
from rich.table import Table

from loopline.deadletter.deliveries import forget
from loopline.deadletter.store import DeadLetter, DeadLetterStore

__all__ = ["DESCRIPTION", "add_dlq_arguments", "run_from_args"]

DESCRIPTION = (
    "The dead-letter store (in the result backend's Redis) holds jobs loopline gave up on: poison jobs delivered "
    "more than LOOPLINE_MAX_DELIVERIES times, jobs whose retries ran out, and messages workers could not decode "
    "or run (not JSON, pickle, unknown task, missing fields, over LOOPLINE_MAX_MESSAGE_BYTES). Each entry keeps "
    "the task, its arguments, the error, the traceback and the delivery count."
)
ERROR_WIDTH = 80
console = Console(width=None if sys.stdout.isatty() else 160)


def add_dlq_arguments(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("list", help="one line per entry, oldest first",
                           description="List dead-lettered entries, one line each, oldest first: id, reason, task, "
                                       "deliveries, when and the error.")
    a.add_argument("--limit", type=int, default=100, help="show at most this many (default: %(default)s)")
    a.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    a = actions.add_parser("show", help="print one entry as JSON: arguments, error, traceback, raw message",
                           description="Print one dead-lettered entry as JSON: its arguments, error, traceback and, "
                                       "for a message that could not be read, the raw message.")
    a.add_argument("id", help="entry id (the task id, or msg-... for a message without one)")
    a = actions.add_parser("replay", help="send entries' jobs again under their task ids and remove them",
                           description="Send each entry's job again (same task id, so a caller waiting on its "
                                       "result gets the new one) with a fresh delivery count, and remove the entry. "
                                       "Messages that could not be decoded cannot be replayed.")
    a.add_argument("ids", nargs="*", help="entry ids")
    a.add_argument("--all", action="store_true", help="every replayable entry")
    a.add_argument("--queue", help="send to this queue instead of the one each job came from")
    a = actions.add_parser("purge", help="delete entries for good",
                           description="Delete dead-lettered entries for good: the given ids, or --all.")
    a.add_argument("ids", nargs="*", help="entry ids")
    a.add_argument("--all", action="store_true", help="every entry")


def _app(args: argparse.Namespace) -> Any:
    from loopline.cli.apps import DEFAULT_APP, load_app

    return load_app(getattr(args, "app", DEFAULT_APP))


def _store(args: argparse.Namespace) -> DeadLetterStore:
    return DeadLetterStore(_app(args).backend.client)


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds")


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= ERROR_WIDTH else line[: ERROR_WIDTH - 1] + "…"


def _list(store: DeadLetterStore, args: argparse.Namespace) -> int:
    entries = list(store.entries(args.limit))
    if args.json:
        for entry in entries:
            print(json.dumps(asdict(entry), default=repr))
        return 0
    table = Table(title=f"dead letters: {store.size()} (showing {len(entries)})")
    for column in ("id", "reason", "task", "deliveries", "dead at", "error"):
        table.add_column(column, justify="right" if column == "deliveries" else "left", overflow="fold")
    for entry in entries:
        table.add_row(entry.id, entry.reason, entry.task or "-", str(entry.deliveries), _when(entry.dead_at),
                      _short(entry.error))
    console.print(table)
    return 0


def _chosen(store: DeadLetterStore, args: argparse.Namespace) -> list[str]:
    if args.all and args.ids:
        raise ValueError(f"dlq {args.action}: give entry ids or --all, not both")
    if not args.all and not args.ids:
        raise ValueError(f"dlq {args.action}: which entries? give their ids (see `loopline dlq list`) or --all")
    return store.ids() if args.all else list(args.ids)


def _replay(store: DeadLetterStore, args: argparse.Namespace) -> int:
    app = _app(args)

    failed = 0
    for entry_id in _chosen(store, args):
        entry = store.get(entry_id)
        if entry is None:
            print(f"{entry_id}: no such entry", file=sys.stderr)
            failed += 1
        elif not entry.replayable:
            print(f"{entry_id}: cannot replay a {entry.reason} message ({entry.error}); "
                  "`loopline dlq show` has its raw bytes", file=sys.stderr)
            failed += not args.all
        else:
            _send(app, store, entry, args.queue)
            print(f"replayed {entry.id} ({entry.task})")
    return 1 if failed else 0


def _send(app: Any, store: DeadLetterStore, entry: DeadLetter, queue: str | None) -> None:
    if entry.task_id is not None:
        forget(store.client, entry.task_id, entry.retries)
    app.send_task(entry.task, args=entry.args, kwargs=entry.kwargs, task_id=entry.task_id, queue=queue or entry.queue)
    store.remove(entry.id)


def _purge(store: DeadLetterStore, args: argparse.Namespace) -> int:
    if args.all and not args.ids:
        print(f"purged {store.purge()} entries")
        return 0
    missing = [entry_id for entry_id in _chosen(store, args) if not store.remove(entry_id)]
    for entry_id in missing:
        print(f"{entry_id}: no such entry", file=sys.stderr)
    print(f"purged {len(args.ids) - len(missing)} entries")
    return 1 if missing else 0


def run_from_args(args: argparse.Namespace) -> int:
    """The ``loopline dlq`` handler: exit 0 on success, 1 when an entry named was missing or not replayable."""
    try:
        return _run(args)
    except redis.RedisError as exc:
        # One line, and the URL without its password: the CLI prints RuntimeError as "loopline dlq: error: ...".
        from loopline.app.install import backend_url
        from loopline.settings import redact_url

        raise RuntimeError(f"cannot use the dead-letter store at {redact_url(str(backend_url(_app(args))))}: "
                           f"{type(exc).__name__}: {exc}") from None


def _run(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action == "list":
        return _list(store, args)
    if args.action == "show":
        entry = store.get(args.id)
        if entry is None:
            print(f"{args.id}: no such entry", file=sys.stderr)
            return 1
        print(json.dumps(asdict(entry), indent=2, default=repr))
        return 0
    if args.action == "replay":
        return _replay(store, args)
    return _purge(store, args)
