"""The SSRF guard: refuse URLs whose host is, or resolves to, an address a job must not reach.

A URL passes when its scheme is http or https, it has a host, and every address of that host is
public. The host checked is ``urlsplit(url).hostname``, the one an HTTP client connects to, so
``http://127.0.0.1@evil.com/`` is checked as ``evil.com`` (user info itself is allowed).

Refused: loopback, private (every range ``ipaddress`` calls private, documentation and benchmark
ones included), link-local, multicast, reserved, unspecified, shared (100.64/10), site-local and
unique-local IPv6, cloud metadata addresses, the name ``metadata.google.internal`` and ``localhost``
names. An IPv6 address that embeds an IPv4 one (IPv4-mapped, 6to4, NAT64 64:ff9b::/96) is judged
by the IPv4 address. IPv4 literals are read as ``inet_aton`` and browsers read them (``2130706433``,
``0x7f.1``, ``0177.0.0.1``, ``127.1``); a host whose last label is a number but is not a valid IPv4
address is refused, as browsers do. So are URLs that HTTP clients could split differently: with a
backslash, whitespace or control characters, stray brackets, or a non-ASCII host (send the punycode
``xn--`` form; clients disagree on IDNA).

Allowlist semantics (``LOOPLINE_URL_ALLOWLIST``): an address is allowed if it is public or inside an
allowlisted IP/CIDR; a cloud metadata address only by an entry for exactly that address, never by
a wider CIDR. A host-name entry (case-insensitive, trailing dot ignored) allows that name and
everything it resolves to.

``check_url`` does no DNS; ``resolve_and_check`` and ``aresolve_and_check`` resolve the host and
check every address. Every lookup goes through one seam, the installed :class:`Resolver` (the system's
``getaddrinfo`` unless :func:`install_resolver` put another in place), and clients connect to the
addresses it returned instead of resolving the name again: ``tasks.guarded_adapter`` pins them for
requests, and the aiohttp session's resolver (``workers.loop_resources``) is the guard itself. A name
that answers an allowed address to the check and another one later (DNS rebinding) so never gets its
second answer connected to.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from loopline.settings import redact_url

__all__ = [
    "Allowlist",
    "GuardedUrl",
    "HostUnresolvable",
    "IPAddress",
    "Resolver",
    "UrlRefused",
    "aresolve_and_check",
    "aresolve_host",
    "check_address",
    "check_url",
    "install_resolver",
    "resolve_and_check",
    "resolve_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOWED_SCHEMES = {"http": 80, "https": 443}
ALLOWLIST_VAR = "LOOPLINE_URL_ALLOWLIST"
METADATA_HOSTS = frozenset({"metadata.google.internal"})
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack, ...
        ipaddress.ip_address("fd00:ec2::254"),  # AWS over IPv6
        ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
        ipaddress.ip_address("168.63.129.16"),  # Azure WireServer: public space, but serves VM secrets
    }
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_LOOPBACK_V4 = ipaddress.IPv4Address("127.0.0.1")
_LOOPBACK_V6 = ipaddress.IPv6Address("::1")
_HOST_RE = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*")
_NUMBER_RE = re.compile(r"0x[0-9a-f]*|[0-9]+")  # the WHATWG "ends in a number" test
_IPV4_CHARS_RE = re.compile(r"[0-9a-fx.]+")
_BRACKETED_RE = re.compile(r"\[[^\[\]]+\](:[0-9]*)?")


class UrlRefused(ValueError):
    """A URL (or an address it resolves to) is one a job must not reach; says which and why."""

    def __init__(self, url: str, reason: str) -> None:
        try:
            url = redact_url(url)
        except ValueError:  # unparsable, so no password to find
            pass
        super().__init__(url, reason)  # args stay (url, reason) so pickling and Celery rebuild it
        self.url = url
        self.reason = reason

    def __str__(self) -> str:
        return f"refused {self.url}: {self.reason}" if self.url else f"refused: {self.reason}"


@dataclass(frozen=True)
class Allowlist:
    """Host names and IP networks let through the guard; build it with :meth:`parse`."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> Allowlist:
        """Read entries that are host names, IPs or CIDRs; raise ValueError naming a bad entry."""
        if isinstance(entries, str):
            raise TypeError("Allowlist.parse takes an iterable of entries, not one string")
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            text = entry.strip().lower() if isinstance(entry, str) else ""
            try:
                networks.append(ipaddress.ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            name = _without_dot(text)
            if len(name) > 253 or not _HOST_RE.fullmatch(name) or _NUMBER_RE.fullmatch(name.rsplit(".", 1)[-1]):
                raise ValueError(f"{ALLOWLIST_VAR} entry {entry!r} is neither an IP, a CIDR nor a host name")
            hosts.add(name)
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        """Whether ``host`` is an allowlisted name (case-insensitive, trailing dot ignored)."""
        return _without_dot(host.lower()) in self.hosts

    def allows_address(self, ip: IPAddress) -> bool:
        """Whether ``ip`` is inside an allowlisted network (metadata addresses: only an exact entry)."""
        if ip in METADATA_ADDRESSES:
            return any(net.num_addresses == 1 and ip in net for net in self.networks)
        return any(ip in net for net in self.networks)


_NOTHING_ALLOWED = Allowlist()


@dataclass(frozen=True)
class GuardedUrl:
    """A URL that passed :func:`check_url`.

    ``host`` is ``urlsplit(url).hostname`` (lowercase, no brackets, a trailing dot kept); ``port`` is
    explicit or the scheme's default; ``ip`` is set when the host is an IP literal, in any spelling.
    """

    url: str
    scheme: str
    host: str
    port: int
    ip: IPAddress | None


def _without_dot(host: str) -> str:
    return host[:-1] if host.endswith(".") else host


# In order; _category stops at the first hit (each ipaddress property scans a table of networks).
_CATEGORIES: tuple[tuple[Callable[[IPAddress], bool], str], ...] = (
    (lambda a: a in METADATA_ADDRESSES, "a cloud metadata address"),
    (lambda a: a.is_loopback, "a loopback address"),
    (lambda a: a.is_unspecified, "an unspecified address"),
    (lambda a: a.is_link_local, "a link-local address"),
    (lambda a: a.is_multicast, "a multicast address"),
    (lambda a: a in _SHARED, "a shared (carrier-grade NAT) address"),
    (lambda a: isinstance(a, ipaddress.IPv6Address) and a.is_site_local, "a site-local address"),
    (lambda a: a.is_reserved, "a reserved address"),
    (lambda a: a.is_private, "a private address"),
)


@functools.lru_cache(maxsize=1024)
def _category(ip: IPAddress) -> str | None:
    return next((label for hit, label in _CATEGORIES if hit(ip)), None)


def _embedded_v4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _parse_ip(address: str | IPAddress, url: str) -> IPAddress:
    try:
        return ipaddress.ip_address(address)
    except ValueError:
        raise UrlRefused(url, f"{address!r} is not an IP address") from None


def check_address(address: str | IPAddress, allowlist: Allowlist | None = None, *, url: str = "") -> IPAddress:
    """Return ``address`` parsed if a job may reach it; raise :class:`UrlRefused` if it is guarded."""
    allow = allowlist or _NOTHING_ALLOWED
    ip = _parse_ip(address, url)
    inner = _embedded_v4(ip)
    judged = ip if inner is None else inner
    why = _category(judged)
    if why is None or allow.allows_address(ip) or (inner is not None and allow.allows_address(inner)):
        return ip
    what = f"{ip} is {why}" if inner is None else f"{ip} embeds {inner}, {why}"
    if judged in METADATA_ADDRESSES:
        raise UrlRefused(url, f"{what} (allow it with a {ALLOWLIST_VAR} entry for exactly {judged})")
    raise UrlRefused(url, f"{what} (allow it with {ALLOWLIST_VAR})")


def _literal(url: str, host: str, bracketed: bool) -> IPAddress | None:
    """Validate ``urlsplit``'s hostname; return its address when it is an IP literal."""
    if bracketed:
        try:
            return ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise UrlRefused(url, f"[{host}] is not a valid IPv6 address") from None
    if not host.isascii():
        raise UrlRefused(url, f"host {host!r} is not ASCII; use its punycode (xn--) form")
    name = _without_dot(host)
    if _NUMBER_RE.fullmatch(name.rsplit(".", 1)[-1]):
        # the character check first: glibc's inet_aton ignores anything after a space
        if _IPV4_CHARS_RE.fullmatch(name):
            with contextlib.suppress(OSError):
                return ipaddress.IPv4Address(socket.inet_aton(name))
        raise UrlRefused(url, f"host {host!r} ends in a number but is not a valid IPv4 address")
    if len(name) > 253 or not _HOST_RE.fullmatch(name):
        raise UrlRefused(url, f"host {host!r} is not a valid host name")
    return None


def check_url(url: str, allowlist: Allowlist | None = None) -> GuardedUrl:
    """Check a URL's scheme, host and port, and its host if that is an IP literal. No DNS."""
    return _check_url(url, allowlist or _NOTHING_ALLOWED)


# A pure function of its two (immutable) arguments, called twice per job (when the job is built and
# before each request): the verdicts on recent URLs are kept. Refusals raise, and are never cached.
@functools.lru_cache(maxsize=4096)
def _check_url(url: str, allow: Allowlist) -> GuardedUrl:
    if any(ch <= " " or ch == "\x7f" for ch in url):
        raise UrlRefused(url.encode("unicode_escape").decode("ascii"), "URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused(url, f"not a valid URL ({exc})") from None
    if parts.scheme not in ALLOWED_SCHEMES:
        raise UrlRefused(url, f"scheme {parts.scheme!r} is not allowed; use http or https")
    if "\\" in parts.netloc:  # urllib3 ends the host at a backslash, urlsplit does not
        raise UrlRefused(url, "backslash in the host part")
    if not parts.hostname:
        raise UrlRefused(url, "URL has no host")
    if port == 0:
        raise UrlRefused(url, "port 0 is not a valid port")
    hostport = parts.netloc.rpartition("@")[2]
    if ("[" in hostport or "]" in hostport) and not _BRACKETED_RE.fullmatch(hostport):
        raise UrlRefused(url, "brackets in the host part must enclose exactly the IPv6 address")
    # the host keeps a trailing dot: "name." and "name" can resolve differently (resolver search domains)
    host, ip = parts.hostname, _literal(url, parts.hostname, hostport.startswith("["))
    guarded = GuardedUrl(url, parts.scheme, host, port or ALLOWED_SCHEMES[parts.scheme], ip)
    name = _without_dot(host)
    if ip is not None:
        check_address(ip, allow, url=url)
    elif allow.allows_host(name):
        pass
    elif name in METADATA_HOSTS:
        raise UrlRefused(url, f"{name} is a cloud metadata host (allow it with {ALLOWLIST_VAR})")
    elif (name == "localhost" or name.endswith(".localhost")) and not (
        allow.allows_address(_LOOPBACK_V4) or allow.allows_address(_LOOPBACK_V6)
    ):
        raise UrlRefused(url, f"{name} always names a loopback address (allow it with {ALLOWLIST_VAR})")
    return guarded


class HostUnresolvable(UrlRefused):
    """The host did not resolve (now): unlike the other refusals, this one may pass on a later try."""


class Resolver:
    """How the guard turns a host name into addresses: the system's ``getaddrinfo``.

    The one place loopline asks DNS. Subclass it and :func:`install_resolver` an instance to answer
    differently (the rebinding tests script answers this way); both methods return the addresses as
    strings, in the resolver's order, and raise ``OSError`` for a name that does not resolve.
    """

    def resolve(self, host: str, port: int) -> list[str]:
        return _addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))

    async def aresolve(self, host: str, port: int) -> list[str]:
        """``resolve`` without blocking the event loop (the loop runs ``getaddrinfo`` in its executor)."""
        return _addresses(await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM))


def _addresses(infos: list[tuple[Any, ...]]) -> list[str]:
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


_resolver = Resolver()


def install_resolver(resolver: Resolver) -> Resolver:
    """Make ``resolver`` the one every check (and so every guarded connection) uses; returns the previous one."""
    global _resolver
    previous, _resolver = _resolver, resolver
    return previous


def _check_resolved(url: str, host: str, allow: Allowlist, addresses: list[str]) -> list[IPAddress]:
    if not addresses:
        raise UrlRefused(url, f"{host} resolves to no address")
    if allow.allows_host(host):
        return [_parse_ip(address, url) for address in addresses]
    return [check_address(address, allow, url=url) for address in addresses]


def resolve_host(host: str, port: int, allowlist: Allowlist | None = None, *, url: str = "") -> list[IPAddress]:
    """Resolve ``host`` through the installed resolver and check every address; return them all.

    Raises :class:`UrlRefused` (naming ``url``) if any address is guarded, and the resolver's ``OSError``
    if the name does not resolve.
    """
    return _check_resolved(url, host, allowlist or _NOTHING_ALLOWED, _resolver.resolve(host, port))


async def aresolve_host(host: str, port: int, allowlist: Allowlist | None = None, *,
                        url: str = "") -> list[IPAddress]:
    """:func:`resolve_host` for asyncio: resolves without blocking the event loop."""
    return _check_resolved(url, host, allowlist or _NOTHING_ALLOWED, await _resolver.aresolve(host, port))


def _unresolvable(guarded: GuardedUrl, exc: Exception) -> UrlRefused:
    return HostUnresolvable(guarded.url, f"host {guarded.host} does not resolve ({exc})")


def resolve_and_check(
    url: str, allowlist: Allowlist | None = None, *, resolver: Callable[[str, int], list[str]] | None = None
) -> list[IPAddress]:
    """:func:`check_url`, then resolve the host and check every address; return them all.

    ``resolver`` replaces the installed :class:`Resolver` for this one call.
    """
    allow = allowlist or _NOTHING_ALLOWED
    guarded = check_url(url, allow)
    if guarded.ip is not None:
        return [guarded.ip]
    try:
        addresses = (resolver or _resolver.resolve)(guarded.host, guarded.port)
    except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
        raise _unresolvable(guarded, exc) from None
    return _check_resolved(guarded.url, guarded.host, allow, addresses)


async def aresolve_and_check(
    url: str,
    allowlist: Allowlist | None = None,
    *,
    resolver: Callable[[str, int], Awaitable[list[str]]] | None = None,
) -> list[IPAddress]:
    """:func:`resolve_and_check` for asyncio: resolves without blocking the event loop."""
    allow = allowlist or _NOTHING_ALLOWED
    guarded = check_url(url, allow)
    if guarded.ip is not None:
        return [guarded.ip]
    try:
        addresses = await (resolver or _resolver.aresolve)(guarded.host, guarded.port)
    except (OSError, UnicodeError) as exc:
        raise _unresolvable(guarded, exc) from None
    return _check_resolved(guarded.url, guarded.host, allow, addresses)
