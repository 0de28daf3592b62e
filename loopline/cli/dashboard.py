"""``loopline dashboard``: serve the pool comparison of the runs in a results folder, live while a bench runs."""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from rich.console import Console

__all__ = ["LOOPBACK", "add_dashboard_arguments", "run_from_args"]

LOOPBACK = ("127.0.0.1", "localhost", "::1")
SHUTDOWN_GRACE_S = 2
console = Console(stderr=True, soft_wrap=True)


def add_dashboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    p.add_argument("--results", type=Path, default=Path("results"),
                   help="folder of `loopline bench` run files (default: results/)")
    p.add_argument("--flower-url", default="http://127.0.0.1:5555/",
                   help="where the page links to Flower (`loopline flower`) (default: %(default)s)")


def _listen(host: str, port: int) -> socket.socket:
    """Bind before announcing the URL, so the printed port (0 included) is the one that answers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def run_from_args(args: argparse.Namespace) -> int:
    import uvicorn

    from loopline.dashboard.app import create_app
    from loopline.dashboard.auth import AUTH_VARIABLE, credentials_from_env

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, got {args.port}")
    if args.results.exists() and not args.results.is_dir():
        raise ValueError(f"--results {args.results} is not a folder")
    auth = credentials_from_env()
    if auth is None and args.host not in LOOPBACK:
        console.print(f"[yellow]warning:[/] the dashboard on {args.host} without {AUTH_VARIABLE} is open to anyone "
                      "who can reach that address")
    app = create_app(args.results, flower_url=args.flower_url or None, auth=auth)
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    shown_host = f"[{args.host}]" if ":" in args.host else args.host
    runs = len(list(args.results.glob("*.json"))) if args.results.is_dir() else 0
    print(f"Dashboard: http://{shown_host}:{port}/  ({runs} run(s) in {args.results}/; Ctrl-C stops it)", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    sys.stdout.flush()
    return 0
