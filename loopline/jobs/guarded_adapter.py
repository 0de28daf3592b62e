"""A requests transport adapter that connects only to the addresses the URL guard checked.

The guard resolves a request's host once (:func:`tasks.urlguard.resolve_and_check`) and the socket is
opened to those addresses, never to a new lookup of the name, so a name that rebinds between the check
and the connect cannot redirect the request. Everything else stays the name's: the URL, the ``Host``
header, the TLS server name (SNI) and the certificate's hostname check. Connections are kept alive per
(host, checked addresses): a name that moves to another allowed address gets a pool of its own.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from socket import socket
from typing import Any

from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from requests.exceptions import InvalidURL, ProxyError
from urllib3 import HTTPConnectionPool, HTTPSConnectionPool, PoolManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util.connection import create_connection

from loopline.jobs.urlguard import Allowlist, resolve_and_check

__all__ = ["GuardedAdapter"]

# The pool keyword that carries the checked addresses from the adapter to the connection's constructor.
_PINNED = "pinned_addresses"


class _PinnedConnection(HTTPConnection):
    """Opens its socket to ``pinned_addresses`` in turn; ``host`` stays the name for the Host header and TLS."""

    def __init__(self, *args: Any, pinned_addresses: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pinned_addresses = pinned_addresses

    def _new_conn(self) -> socket:
        # urllib3.connection.HTTPConnection._new_conn, with the checked addresses where it resolves
        # self._dns_host; connect() (and HTTPSConnection.connect, for SNI and the certificate check)
        # keep using self.host, the name.
        if not self.pinned_addresses:
            raise NewConnectionError(self, f"no checked address to connect to for {self.host}")
        error: OSError | None = None
        for address in self.pinned_addresses:
            try:
                sock = create_connection((address, self.port), self.timeout, source_address=self.source_address,
                                         socket_options=self.socket_options)
            except OSError as exc:  # the next checked address, as create_connection does for getaddrinfo's
                error = exc
                continue
            sys.audit("http.client.connect", self, self.host, self.port)
            return sock
        if isinstance(error, TimeoutError):
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out. (connect timeout={self.timeout})")
        raise NewConnectionError(self, f"Failed to establish a new connection: {error}")


class _PinnedHTTPSConnection(_PinnedConnection, HTTPSConnection):
    pass


class _PinnedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _PinnedConnection


class _PinnedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _PinnedHTTPSConnection


def _pinned_key(base: Callable[[dict[str, Any]], Any], request_context: dict[str, Any]) -> Any:
    context = dict(request_context)
    pinned = context.pop(_PINNED, None)
    return base(context), pinned


class _PinnedPoolManager(PoolManager):
    """A PoolManager whose pools connect to pinned addresses and are keyed by them too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Both are per-instance hooks of urllib3's PoolManager (see poolmanager.key_fn_by_scheme).
        self.pool_classes_by_scheme = {"http": _PinnedHTTPConnectionPool, "https": _PinnedHTTPSConnectionPool}
        self.key_fn_by_scheme = {scheme: functools.partial(_pinned_key, key_fn)
                                 for scheme, key_fn in self.key_fn_by_scheme.items()}


class GuardedAdapter(HTTPAdapter):
    """Checks each request's URL with the guard and connects to the addresses it checked (no proxies).

    Raises :class:`tasks.urlguard.UrlRefused` (``HostUnresolvable`` for a name that does not resolve)
    from ``send``, before any connection is made.
    """

    def __init__(self, allowlist: Allowlist, **kwargs: Any) -> None:
        self.allowlist = allowlist
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)  # records the sizes for pickling
        self.poolmanager = _PinnedPoolManager(num_pools=connections, maxsize=maxsize, block=block, **pool_kwargs)

    def get_connection_with_tls_context(self, request: PreparedRequest, verify: Any, proxies: Any = None,
                                        cert: Any = None) -> HTTPConnectionPool:
        # requests.adapters.HTTPAdapter.get_connection_with_tls_context without its proxy branch (a proxy
        # would resolve the name itself), and with the guard's addresses in the pool key and the connection.
        if proxies and any(proxies.values()):
            raise ProxyError("a guarded adapter connects directly; it does not use proxies", request=request)
        assert request.url is not None
        addresses = resolve_and_check(request.url, self.allowlist)  # the one lookup of this request
        try:
            host_params, tls_kwargs = self.build_connection_pool_key_attributes(request, verify, cert)
        except ValueError as exc:
            raise InvalidURL(exc, request=request) from None
        pool_kwargs: dict[str, Any] = {**tls_kwargs, _PINNED: tuple(str(address) for address in addresses)}
        return self.poolmanager.connection_from_host(**host_params, pool_kwargs=pool_kwargs)
