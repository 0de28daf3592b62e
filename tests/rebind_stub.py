"""A scripted DNS for the rebinding tests: ``.test`` names answer from a script, never from the system resolver.

A script maps a name to one answer per lookup, the last one repeating: ``{"rebind.test": [["127.0.0.1"],
["127.0.0.2"]]}`` answers 127.0.0.1 to the first lookup and 127.0.0.2 to every later one, as a rebinding
DNS server does. Lookups arrive two ways, counted together per name: through the URL guard's resolver
seam (:func:`tasks.urlguard.install_resolver`), and through ``socket.getaddrinfo``, where an HTTP client
that resolved a name on its own (urllib3, aiohttp's default resolver) would ask. A ``.test`` name that is
not in the script does not resolve; other names and IP literals go to the real ``getaddrinfo``.

Workers load it with ``CELERY_WORKER_INCLUDE=rebind_stub``, this directory on ``PYTHONPATH`` and the
script as JSON in ``REBIND_STUB_SCRIPT``; the import installs it (prefork children inherit it).
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from loopline.jobs import urlguard

__all__ = ["SCRIPT_VAR", "StubDns"]

SCRIPT_VAR = "REBIND_STUB_SCRIPT"
_real_getaddrinfo = socket.getaddrinfo


def _stub_name(host: object) -> str | None:
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return None
    name = host.lower().rstrip(".")
    return name if name.endswith(".test") else None


class StubDns(urlguard.Resolver):
    """The guard's resolver and the process's ``getaddrinfo`` for ``.test`` names, answering from a script."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.lookups: list[tuple[str, str]] = []  # (name, "guard" or "client"), in order
        self._lock = threading.Lock()

    def answer(self, host: str, via: str) -> list[str]:
        name = _stub_name(host) or host
        with self._lock:
            answers = self.script.get(name)
            asked = sum(1 for looked_up, _ in self.lookups if looked_up == name)
            self.lookups.append((name, via))
        if not answers:
            raise socket.gaierror(socket.EAI_NONAME, f"{name} is not in the stub DNS script")
        return answers[min(asked, len(answers) - 1)]

    def resolve(self, host: str, port: int) -> list[str]:
        return self.answer(host, "guard")

    async def aresolve(self, host: str, port: int) -> list[str]:
        return self.answer(host, "guard")

    def client_getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if _stub_name(host) is None:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        addresses = self.answer(host, "client")
        return [info for address in addresses for info in _real_getaddrinfo(address, port, *args, **kwargs)]

    def install(self) -> Callable[[], None]:
        """Make this the guard's resolver and the process's getaddrinfo; returns the function that undoes it."""
        previous = urlguard.install_resolver(self)
        socket.getaddrinfo = self.client_getaddrinfo

        def uninstall() -> None:
            urlguard.install_resolver(previous)
            socket.getaddrinfo = _real_getaddrinfo

        return uninstall


if os.environ.get(SCRIPT_VAR):
    StubDns(json.loads(os.environ[SCRIPT_VAR])).install()
