"""HTTP basic auth for the dashboard, turned on by ``LOOPLINE_DASHBOARD_AUTH=user:password``.

A plain ASGI middleware rather than Starlette's ``BaseHTTPMiddleware``, which would buffer the
server-sent event stream of live mode.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping

from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from loopline.settings import ConfigError

__all__ = ["AUTH_VARIABLE", "BasicAuth", "credentials_from_env"]

AUTH_VARIABLE = "LOOPLINE_DASHBOARD_AUTH"


def credentials_from_env(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """``(user, password)`` from LOOPLINE_DASHBOARD_AUTH, None when unset; ConfigError when malformed."""
    raw = (os.environ if environ is None else environ).get(AUTH_VARIABLE, "").strip()
    if not raw:
        return None
    user, _, password = raw.partition(":")
    if not user or not password:
        raise ConfigError(f"{AUTH_VARIABLE} must look like user:password, both non-empty")
    return user, password


class BasicAuth:
    """Answers 401 to any request without the right ``Authorization: Basic`` header."""

    def __init__(self, app: ASGIApp, user: str, password: str) -> None:
        self.app = app
        self.expected = f"{user}:{password}".encode()

    def _allowed(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"basic":
                    return False
                try:
                    given = base64.b64decode(token.strip(), validate=True)
                except (binascii.Error, ValueError):
                    return False
                return secrets.compare_digest(given, self.expected)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        response = PlainTextResponse("authentication required\n", status_code=401,
                                     headers={"WWW-Authenticate": 'Basic realm="loopline dashboard"'})
        await response(scope, receive, send)
