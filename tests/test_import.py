"""Importing loopline reads no setting from the environment, opens no socket, starts no thread, connects no signal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = r'''
import collections.abc, json, os, pkgutil, importlib, socket, threading

seen = {"env": [], "connect": [], "thread": [], "signal": []}


class Environ(collections.abc.MutableMapping):
    def __init__(self, real):
        self.real = real

    def _note(self, key):
        if isinstance(key, str) and key.startswith("LOOPLINE_"):
            seen["env"].append(key)

    def __getitem__(self, key):
        self._note(key)
        return self.real[key]

    def __contains__(self, key):
        self._note(key)
        return key in self.real

    def get(self, key, default=None):
        self._note(key)
        return self.real.get(key, default)

    def __setitem__(self, key, value):
        self.real[key] = value

    def __delitem__(self, key):
        del self.real[key]

    def __iter__(self):
        seen["env"].append("<iterated>")
        return iter(self.real)

    def __len__(self):
        return len(self.real)


os.environ = Environ(os.environ)
os.environ.real["LOOPLINE_BROKER_URL"] = "redis://127.0.0.1:1/0"  # a broker that would fail if it were resolved


def refuse(*args, **kwargs):
    seen["connect"].append(repr(args[1:2]))
    raise OSError("no sockets at import")


socket.socket.connect = refuse
socket.create_connection = refuse
real_start = threading.Thread.start
threading.Thread.start = lambda self: seen["thread"].append(self.name)

from celery.utils.dispatch import signal as dispatch

real_connect = dispatch.Signal.connect


def connect(self, *args, **kwargs):
    seen["signal"].append(getattr(self, "name", "?"))
    return real_connect(self, *args, **kwargs)


dispatch.Signal.connect = connect

import loopline

modules = ["loopline"]
for info in pkgutil.walk_packages(loopline.__path__, "loopline."):
    if info.name.rsplit(".", 1)[-1] != "__main__":
        importlib.import_module(info.name)
        modules.append(info.name)
print(json.dumps({"modules": modules, **seen}))
'''


@pytest.mark.timeout(120)
def test_importing_every_module_has_no_side_effects() -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=100, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(result.stdout.splitlines()[-1])
    package = Path(__file__).resolve().parents[1] / "loopline"
    expected = {".".join(path.relative_to(package.parent).with_suffix("").parts).removesuffix(".__init__")
                for path in package.rglob("*.py") if path.name != "__main__.py"}
    assert set(found["modules"]) == expected
    assert found["env"] == [], f"read at import: {found['env']}"
    assert found["connect"] == [], f"connected at import: {found['connect']}"
    assert found["thread"] == [], f"threads started at import: {found['thread']}"
    assert found["signal"] == [], f"signal handlers connected at import: {found['signal']}"
