"""DNS rebinding: a request goes to the address the URL guard checked, never to a later answer for the name.

Three tiny HTTP servers listen on one port at 127.0.0.1 (allowlisted by conftest), 127.0.0.2 and 127.0.0.3
(loopback, so refused), and record every request they serve. Names answer from tests/rebind_stub.py, a
scripted DNS that also answers a client that resolves on its own, the way a rebinding server would: the
first lookup of ``rebind.test`` gets 127.0.0.1, later ones 127.0.0.2. Nothing resolves a real name or
connects beyond 127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
import requests
from rebind_stub import SCRIPT_VAR, StubDns

from config.celery_app import settings
from loopline.bench.procs import Child
from loopline.concurrency import loop_resources
from loopline.errors import GuardRefused
from loopline.jobs import http_async, http_sync
from loopline.jobs.guarded_adapter import GuardedAdapter
from loopline.jobs.specs import FetchRequest, WebhookRequest
from loopline.jobs.tasks import fetch_url
from loopline.jobs.urlguard import Allowlist, UrlRefused

pytestmark = pytest.mark.timeout(90)

ALLOWED, FORBIDDEN, OTHER_ALLOWED = "127.0.0.1", "127.0.0.2", "127.0.0.3"
REBINDS = [[ALLOWED], [FORBIDDEN]]
TESTS_DIR = Path(__file__).resolve().parents[1]
T = TypeVar("T")


@dataclass(frozen=True)
class Hit:
    server: str
    path: str
    host_header: str
    client_port: int
    sni: str | None = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        self.server.hits.append(Hit(self.server.server_address[0], self.path, self.headers.get("host", ""),
                                    self.client_address[1], getattr(self.connection, "sni", None)))
        query = parse_qs(urlsplit(self.path).query)
        keep = self.path.startswith("/keep")  # otherwise every answer closes: the next request connects anew
        body = f"served by {self.server.server_address[0]}".encode()
        self.send_response(302 if "to" in query else 200)
        if "to" in query:
            self.send_header("Location", query["to"][0])
        self.send_header("Content-Length", str(len(body)))
        if not keep:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = not keep

    do_GET = do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], hits: list[Hit], tls: ssl.SSLContext | None = None) -> None:
        self.hits, self.tls = hits, tls
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True)
        return sock, address


@dataclass
class Servers:
    port: int
    hits: list[Hit]

    def served_by(self) -> list[str]:
        return [hit.server for hit in self.hits]


def _serve(servers: list[_Server]) -> list[threading.Thread]:
    threads = [threading.Thread(target=server.serve_forever, name=f"http {server.server_address}", daemon=True)
               for server in servers]
    for thread in threads:
        thread.start()
    return threads


def _stop(servers: list[_Server], threads: list[threading.Thread]) -> None:
    for server in servers:
        server.shutdown()
        server.server_close()
    for thread in threads:
        thread.join(5)


@pytest.fixture(scope="module")
def _server_group() -> Iterator[Servers]:
    hits: list[Hit] = []
    first = _Server((ALLOWED, 0), hits)
    port = first.server_address[1]
    servers = [first]
    try:
        servers += [_Server((address, port), hits) for address in (FORBIDDEN, OTHER_ALLOWED)]
    except OSError:
        for server in servers:
            server.server_close()
        raise
    threads = _serve(servers)
    yield Servers(port, hits)
    _stop(servers, threads)


@pytest.fixture
def servers(_server_group: Servers) -> Servers:
    """The three servers on one port; their record of hits starts empty for each test."""
    _server_group.hits.clear()
    return _server_group


@pytest.fixture
def stub_dns() -> Iterator[Callable[[dict[str, list[list[str]]]], StubDns]]:
    """Install a scripted DNS for the test; the real resolver is back afterwards."""
    undo: list[Callable[[], None]] = []

    def install(script: dict[str, list[list[str]]]) -> StubDns:
        stub = StubDns(script)
        undo.append(stub.install())
        return stub

    yield install
    for uninstall in reversed(undo):
        uninstall()


@pytest.fixture
def sync_sessions() -> Iterator[None]:
    yield
    http_sync.close_sessions()


def _run(coroutine: Awaitable[T]) -> T:
    async def main() -> T:
        try:
            return await coroutine
        finally:
            await loop_resources.shutdown()  # closes the loop's aiohttp sessions

    return asyncio.run(main())


def _fetch(body: str, url: str) -> Any:
    req = FetchRequest.build(settings, url, timeout_s=10)
    return http_sync.fetch(req) if body == "sync" else _run(http_async.fetch(req))


BODIES = ["sync", "async"]


# -- the task bodies in this process ---------------------------------------------------------------------

@pytest.mark.parametrize("body", BODIES)
def test_a_fetch_goes_to_the_address_the_guard_checked(
    body: str, servers: Servers, stub_dns: Callable[..., StubDns], sync_sessions: None
) -> None:
    stub = stub_dns({"rebind.test": REBINDS})
    result = _fetch(body, f"http://rebind.test:{servers.port}/x")
    assert result.status == 200
    assert servers.hits == [Hit(ALLOWED, "/x", f"rebind.test:{servers.port}", servers.hits[0].client_port)]
    # one lookup, the guard's: the client connected to its answer instead of resolving the name again
    assert stub.lookups == [("rebind.test", "guard")]


@pytest.mark.parametrize("body", BODIES)
def test_a_redirect_to_a_name_that_rebinds_is_refused(
    body: str, servers: Servers, stub_dns: Callable[..., StubDns], sync_sessions: None
) -> None:
    stub_dns({"rebind.test": REBINDS})
    with pytest.raises(GuardRefused, match=rf"refused http://rebind\.test:{servers.port}/y: "
                                           rf"127\.0\.0\.2 is a loopback address"):
        _fetch(body, f"http://rebind.test:{servers.port}/redirect?to=/y")
    assert servers.served_by() == [ALLOWED]


@pytest.mark.parametrize("body", BODIES)
def test_any_forbidden_address_in_an_answer_refuses_before_connecting(
    body: str, servers: Servers, stub_dns: Callable[..., StubDns], sync_sessions: None
) -> None:
    stub_dns({"mixed.test": [[ALLOWED, FORBIDDEN]]})
    with pytest.raises(GuardRefused, match="127.0.0.2 is a loopback address"):
        _fetch(body, f"http://mixed.test:{servers.port}/x")
    assert servers.hits == []


@pytest.mark.parametrize("body", BODIES)
def test_a_webhook_goes_to_the_address_the_guard_checked(
    body: str, servers: Servers, stub_dns: Callable[..., StubDns], sync_sessions: None
) -> None:
    stub_dns({"hooks.test": REBINDS})
    req = WebhookRequest.build(settings, f"http://hooks.test:{servers.port}/hook", {"a": 1}, timeout_s=10)
    if body == "sync":
        status, _ = http_sync.post(req, b"{}", {})
    else:
        status, _ = _run(http_async.post(req, b"{}", {}))
    assert status == 200
    assert servers.served_by() == [ALLOWED]


def test_the_session_refuses_what_the_guard_refuses_for_any_task(
    servers: Servers, stub_dns: Callable[..., StubDns]
) -> None:
    # http_session() is for users' own tasks too: names and literals are checked there, redirects included.
    stub_dns({"rebind.test": REBINDS})

    async def get(url: str) -> int:
        async with loop_resources.http_session(Allowlist.parse([ALLOWED])).get(url) as response:
            return response.status

    assert _run(get(f"http://rebind.test:{servers.port}/x")) == 200
    with pytest.raises(UrlRefused, match="127.0.0.2 is a loopback address"):
        _run(get(f"http://rebind.test:{servers.port}/x"))
    with pytest.raises(UrlRefused, match="127.0.0.2 is a loopback address"):
        _run(get(f"http://{ALLOWED}:{servers.port}/redirect?to=http://{FORBIDDEN}:{servers.port}/x"))
    assert servers.served_by() == [ALLOWED, ALLOWED]


def test_connections_are_kept_per_host_and_checked_address(servers: Servers, stub_dns: Callable[..., StubDns]) -> None:
    stub_dns({"moving.test": [[ALLOWED], [ALLOWED], [OTHER_ALLOWED]]})
    with requests.Session() as session:
        session.mount("http://", GuardedAdapter(Allowlist.parse([ALLOWED, OTHER_ALLOWED])))
        for path in ("/keep/1", "/keep/2", "/keep/3"):
            session.get(f"http://moving.test:{servers.port}{path}", timeout=10).close()
    first, second, third = servers.hits
    assert (first.server, second.server, third.server) == (ALLOWED, ALLOWED, OTHER_ALLOWED)
    assert first.client_port == second.client_port  # kept alive while the name answers the same address
    assert third.client_port != first.client_port


# -- TLS: the connection goes to the checked address, the name stays the name ------------------------------

@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Servers, Path]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate for ``tls.test``; records the SNI it got."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=tls.test",
                    "-addext", "subjectAltName=DNS:tls.test"], check=True, capture_output=True, timeout=30)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def remember_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _: ssl.SSLContext) -> None:
        sock.sni = name  # type: ignore[union-attr]

    context.sni_callback = remember_sni
    hits: list[Hit] = []
    server = _Server((ALLOWED, 0), hits, tls=context)
    threads = _serve([server])
    yield Servers(server.server_address[1], hits), cert
    _stop([server], threads)


def test_https_keeps_the_name_for_sni_and_the_certificate_check(
    tls_server: tuple[Servers, Path], stub_dns: Callable[..., StubDns]
) -> None:
    tls, cert = tls_server
    tls.hits.clear()
    stub = stub_dns({"tls.test": [[ALLOWED]], "other.test": [[ALLOWED]]})
    allow = Allowlist.parse([ALLOWED])
    with requests.Session() as session:
        session.mount("https://", GuardedAdapter(allow))
        assert session.get(f"https://tls.test:{tls.port}/s", verify=str(cert), timeout=10).status_code == 200
        with pytest.raises(requests.exceptions.SSLError, match="other.test"):
            session.get(f"https://other.test:{tls.port}/s", verify=str(cert), timeout=10)

    async def get_async(name: str) -> int:
        context = ssl.create_default_context(cafile=str(cert))
        async with loop_resources.http_session(allow).get(f"https://{name}:{tls.port}/a", ssl=context) as response:
            return response.status

    assert _run(get_async("tls.test")) == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError, match="other.test"):
        _run(get_async("other.test"))
    assert [(hit.path, hit.host_header, hit.sni) for hit in tls.hits] == [
        ("/s", f"tls.test:{tls.port}", "tls.test"), ("/a", f"tls.test:{tls.port}", "tls.test")]
    assert {via for _, via in stub.lookups} == {"guard"}


# -- real workers of every pool --------------------------------------------------------------------------

@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent", "asyncio"])
def test_workers_of_every_pool_connect_only_to_checked_addresses(
    pool: str, servers: Servers, worker: Callable[..., Child], queue: str
) -> None:
    script = {"one.test": REBINDS, "two.test": REBINDS}
    worker(pool, 1, env={
        "PYTHONPATH": os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p),
        "CELERY_WORKER_INCLUDE": "rebind_stub",
        SCRIPT_VAR: json.dumps(script),
    })
    fetched = fetch_url.apply_async((f"http://one.test:{servers.port}/x",), queue=queue).get(timeout=30)
    assert (fetched["status"], servers.served_by()) == (200, [ALLOWED])
    redirected = fetch_url.apply_async((f"http://two.test:{servers.port}/redirect?to=/y",), queue=queue)
    with pytest.raises(GuardRefused, match=rf"two\.test:{servers.port}/y: 127\.0\.0\.2 is a loopback address"):
        redirected.get(timeout=30)
    assert servers.served_by() == [ALLOWED, ALLOWED]
