"""Tests for tasks.urlguard: pure checks and injected fake resolvers; only ``localhost`` is ever really resolved."""

from __future__ import annotations

import asyncio
import ipaddress
import pickle
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline.jobs.urlguard import (
    METADATA_ADDRESSES,
    Allowlist,
    GuardedUrl,
    HostUnresolvable,
    UrlRefused,
    aresolve_and_check,
    check_address,
    check_url,
    resolve_and_check,
)

pytestmark = pytest.mark.timeout(30)

# database=None: no .hypothesis/ directory in the tree; deadline=None: no flaky timing failures on a busy CI box
property_settings = settings(database=None, deadline=None, max_examples=200)

GUARDED_V4_NETWORKS = [
    ipaddress.IPv4Network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16")
]


def fake_resolver(table: dict[str, list[str]], calls: list[tuple[str, int]] | None = None):
    def resolve(host: str, port: int) -> list[str]:
        if calls is not None:
            calls.append((host, port))
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    return resolve


def refusal(url: str, allowlist: Allowlist | None = None) -> str:
    with pytest.raises(UrlRefused) as info:
        check_url(url, allowlist)
    return info.value.reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/", "127.0.0.1 is a loopback address"),
        ("http://127.255.255.254/", "loopback"),
        ("http://[::1]/", "::1 is a loopback address"),
        ("http://10.0.0.1/", "10.0.0.1 is a private address"),
        ("http://172.16.5.4/", "private"),
        ("http://172.31.255.255/", "private"),
        ("http://192.168.1.1/", "private"),
        ("http://[fd12:3456::1]/", "fd12:3456::1 is a private address"),
        ("http://169.254.1.1/", "169.254.1.1 is a link-local address"),
        ("http://[fe80::1]/", "link-local"),
        ("http://[fe80::1%25eth0]/", "link-local"),
        ("http://224.0.0.1/", "224.0.0.1 is a multicast address"),
        ("http://239.255.255.250/", "multicast"),
        ("http://[ff02::1]/", "multicast"),
        ("http://240.0.0.1/", "240.0.0.1 is a reserved address"),
        ("http://255.255.255.255/", "reserved"),
        ("http://0.0.0.0/", "0.0.0.0 is an unspecified address"),
        ("http://[::]/", "unspecified"),
        ("http://0/", "unspecified"),
        ("http://100.64.0.1/", "100.64.0.1 is a shared (carrier-grade NAT) address"),
        ("http://100.127.255.254/", "shared"),
        ("http://[fec0::1]/", "fec0::1 is a site-local address"),
        ("http://[::ffff:127.0.0.1]/", "::ffff:7f00:1 embeds 127.0.0.1, a loopback address"),
        ("http://[::ffff:a00:1]/", "embeds 10.0.0.1, a private address"),
        ("http://[2002:a00:1::1]/", "2002:a00:1::1 embeds 10.0.0.1, a private address"),
        ("http://[64:ff9b::c0a8:101]/", "64:ff9b::c0a8:101 embeds 192.168.1.1, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254 is a cloud metadata address"),
        ("http://[fd00:ec2::254]/", "fd00:ec2::254 is a cloud metadata address"),
        ("http://100.100.100.200/", "100.100.100.200 is a cloud metadata address"),
        ("http://168.63.129.16/", "168.63.129.16 is a cloud metadata address"),
        ("http://[::ffff:169.254.169.254]/", "embeds 169.254.169.254, a cloud metadata address"),
        ("http://metadata.google.internal/computeMetadata/v1/", "metadata.google.internal is a cloud metadata host"),
        ("http://METADATA.google.internal./", "metadata.google.internal is a cloud metadata host"),
        ("http://localhost:8080/", "localhost always names a loopback address"),
        ("http://api.localhost/", "api.localhost always names a loopback address"),
    ],
)
def test_guarded_literals_are_refused(url: str, reason: str) -> None:
    assert reason in refusal(url)


def test_refusal_message_names_url_address_and_remedy() -> None:
    with pytest.raises(UrlRefused) as info:
        check_url("http://10.0.0.1/x")
    exc = info.value
    reason = "10.0.0.1 is a private address (allow it with LOOPLINE_URL_ALLOWLIST)"
    assert isinstance(exc, ValueError)
    assert (str(exc), exc.url, exc.reason) == (f"refused http://10.0.0.1/x: {reason}", "http://10.0.0.1/x", reason)
    copy = pickle.loads(pickle.dumps(exc))
    assert (type(copy), str(copy), copy.url, copy.reason) == (UrlRefused, str(exc), exc.url, exc.reason)


def test_metadata_refusal_says_only_an_exact_entry_allows_it() -> None:
    assert "entry for exactly 169.254.169.254" in refusal("http://169.254.169.254/")


def test_refusal_hides_the_password() -> None:
    with pytest.raises(UrlRefused) as info:
        check_url("http://user:hunter2@10.0.0.1/")
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value.args)
    assert "user:***@10.0.0.1" in str(info.value)


@pytest.mark.parametrize(
    ("url", "host", "port", "ip"),
    [
        ("http://8.8.8.8/", "8.8.8.8", 80, "8.8.8.8"),
        ("https://1.1.1.1/dns-query", "1.1.1.1", 443, "1.1.1.1"),
        ("https://[2606:4700:4700::1111]:8443/", "2606:4700:4700::1111", 8443, "2606:4700:4700::1111"),
        ("http://[::ffff:8.8.8.8]/", "::ffff:8.8.8.8", 80, "::ffff:808:808"),
        ("http://134744072/", "134744072", 80, "8.8.8.8"),
        ("HTTPS://Example.COM./path?q=1#f", "example.com.", 443, None),
        ("http://user:pw@example.com:8080/", "example.com", 8080, None),
    ],
)
def test_public_and_named_urls_pass(url: str, host: str, port: int, ip: str | None) -> None:
    guarded = check_url(url)
    expected_ip = None if ip is None else ipaddress.ip_address(ip)
    assert guarded == GuardedUrl(url=url, scheme=url.split(":")[0].lower(), host=host, port=port, ip=expected_ip)


LOOPBACK_SPELLINGS = [
    "127.0.0.1",
    "2130706433",
    "0x7f000001",
    "0X7F000001",
    "0x7f.0.0.1",
    "0x7f.0x0.0x0.0x1",
    "0177.0.0.1",
    "0177.0000.0000.0001",
    "017700000001",
    "127.1",
    "127.0.1",
    "0x7f.1",
    "127.0.0.1.",
    "127.000.000.001",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[0:0:0:0:0:ffff:7f00:1]",
]
TEN_SPELLINGS = [
    "10.0.0.1",
    "167772161",
    "0xa000001",
    "0x0a.0.0.1",
    "0xa.0x0.0x0.0x1",
    "012.0.0.1",
    "012.0.0.01",
    "01200000001",
    "10.1",
    "10.0.1",
    "0xa.1",
    "10.0.0.1.",
    "[::ffff:10.0.0.1]",
    "[::ffff:a00:1]",
]


@pytest.mark.parametrize("host", LOOPBACK_SPELLINGS)
def test_odd_spellings_of_loopback_are_refused(host: str) -> None:
    assert "a loopback address" in refusal(f"http://{host}/")
    assert check_url(f"http://{host}/", Allowlist.parse(["127.0.0.1", "::1"])).ip in {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("::ffff:127.0.0.1"),
    }


@pytest.mark.parametrize("host", TEN_SPELLINGS)
def test_odd_spellings_of_10_0_0_1_are_refused(host: str) -> None:
    reason = refusal(f"http://{host}:8080/")
    assert "10.0.0.1 is a private address" in reason or "embeds 10.0.0.1, a private address" in reason


@pytest.mark.parametrize("host", ["foo.123", "1.2.3.4.5", "256.0.0.1", "1.2.3.0x100", "08.0.0.1", "0x", "example.0x1"])
def test_hosts_ending_in_a_number_must_be_valid_ipv4(host: str) -> None:
    assert "not a valid IPv4 address" in refusal(f"http://{host}/")


def test_userinfo_trick_checks_the_real_host() -> None:
    guarded = check_url("http://127.0.0.1@example.com/")
    assert (guarded.host, guarded.ip) == ("example.com", None)
    assert "loopback" in refusal("http://example.com@127.0.0.1/")
    assert "private" in refusal("http://a@b:c@10.0.0.1/")
    calls: list[tuple[str, int]] = []
    with pytest.raises(UrlRefused, match="10.9.9.9 is a private address"):
        resolve_and_check("http://127.0.0.1:80@evil.test/", resolver=fake_resolver({"evil.test": ["10.9.9.9"]}, calls))
    assert calls == [("evil.test", 80)]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1\\@evil.test/", "backslash"),
        ("http://evil.test\\@127.0.0.1/", "backslash"),
        ("http://evil.test /", "whitespace or control characters"),
        ("http://127.0.0.1\t/", "whitespace or control characters"),
        ("http://evil.test\n.10.0.0.1/", "whitespace or control characters"),
        ("http://\uff11\uff12\uff17.0.0.1/", "not ASCII"),
        ("http://b\u00fccher.test/", "not ASCII"),
        ("http://bad_host!.test/", "not a valid host name"),
        ("http://a..b.test/", "not a valid host name"),
        ("http://-a.test/", "not a valid host name"),
        ("http://[::1/", "not a valid URL"),
        ("http://[not:ipv6]/", "not a valid"),
        ("http://[v1.abc]/", "[v1.abc] is not a valid IPv6 address"),
        ("http://u@[v7.8.8.8.8]:80/", "not a valid IPv6 address"),
        ("http://x[2606:4700::1111]/", "brackets in the host part"),
        ("http://[2606:4700::1111]x/", "brackets in the host part"),
    ],
)
def test_hosts_clients_could_read_differently_are_refused(url: str, reason: str) -> None:
    assert reason in refusal(url)


def test_trailing_dot_localhost_is_refused_even_by_a_fake_resolver() -> None:
    with pytest.raises(UrlRefused, match="localhost always names a loopback address"):
        resolve_and_check("http://localhost./", resolver=fake_resolver({"localhost.": ["127.0.0.1"]}))


def test_trailing_dot_name_is_resolved_as_written_and_checked() -> None:
    calls: list[tuple[str, int]] = []
    with pytest.raises(UrlRefused, match="127.0.0.1 is a loopback address"):
        resolve_and_check("https://intranet.test./", resolver=fake_resolver({"intranet.test.": ["127.0.0.1"]}, calls))
    assert calls == [("intranet.test.", 443)]


def test_every_resolved_address_is_checked() -> None:
    resolver = fake_resolver({"mixed.test": ["8.8.8.8", "2606:4700:4700::1111", "192.168.0.7", "1.1.1.1"]})
    with pytest.raises(UrlRefused) as info:
        resolve_and_check("http://mixed.test/", resolver=resolver)
    assert "192.168.0.7 is a private address" in info.value.reason
    with pytest.raises(UrlRefused, match="embeds 10.0.0.1"):
        resolve_and_check("http://v6.test/", resolver=fake_resolver({"v6.test": ["2001:4860::1", "::ffff:10.0.0.1"]}))


def test_public_resolved_addresses_are_returned() -> None:
    resolver = fake_resolver({"public.test": ["8.8.8.8", "2606:4700:4700::1111"]})
    assert resolve_and_check("http://public.test:8080/", resolver=resolver) == [
        ipaddress.ip_address("8.8.8.8"),
        ipaddress.ip_address("2606:4700:4700::1111"),
    ]


def test_literal_host_is_not_resolved() -> None:
    calls: list[tuple[str, int]] = []
    assert resolve_and_check("http://8.8.8.8/", resolver=fake_resolver({}, calls)) == [ipaddress.ip_address("8.8.8.8")]
    assert calls == []


def test_unresolvable_name_is_refused_with_a_clear_message() -> None:
    with pytest.raises(UrlRefused) as info:
        resolve_and_check("http://nowhere.test/", resolver=fake_resolver({}))
    assert str(info.value).startswith("refused http://nowhere.test/: host nowhere.test does not resolve (")
    assert "Name or service not known" in str(info.value)
    assert isinstance(info.value, HostUnresolvable)  # the one refusal that a later try may get past
    with pytest.raises(UrlRefused, match="resolves to no address"):
        resolve_and_check("http://empty.test/", resolver=fake_resolver({"empty.test": []}))
    with pytest.raises(UrlRefused, match="'bogus' is not an IP address"):
        resolve_and_check("http://weird.test/", resolver=fake_resolver({"weird.test": ["bogus"]}))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "gopher://example.com:70/_x",
        "javascript:alert(1)",
        "data:text/plain,hi",
        "ws://example.com/",
        "//example.com/",
        "example.com/path",
        "",
    ],
)
def test_non_http_schemes_are_refused(url: str) -> None:
    assert "is not allowed; use http or https" in refusal(url)


@pytest.mark.parametrize("url", ["http:///path", "http://", "https://:443/", "http://user:pw@/", "http:path"])
def test_missing_host_is_refused(url: str) -> None:
    assert refusal(url) == "URL has no host"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://example.com:0/", "port 0"),
        ("http://example.com:65536/", "not a valid URL"),
        ("http://example.com:http/", "not a valid URL"),
    ],
)
def test_bad_ports_are_refused(url: str, reason: str) -> None:
    assert reason in refusal(url)


def test_ip_allowlist_lets_exactly_that_address_through() -> None:
    allow = Allowlist.parse(["127.0.0.1"])
    guarded = check_url("http://127.0.0.1:8080/", allow)
    assert (guarded.host, guarded.port, guarded.ip) == ("127.0.0.1", 8080, ipaddress.ip_address("127.0.0.1"))
    assert check_url("http://localhost:8080/", allow).ip is None
    assert "127.0.0.2 is a loopback address" in refusal("http://127.0.0.2/", allow)
    assert "10.0.0.1 is a private address" in refusal("http://10.0.0.1/", allow)


def test_allowlisted_localhost_passes_with_the_real_resolver() -> None:
    # ::1 too: some hosts list localhost as ::1 as well, and every resolved address must be allowed
    allow = Allowlist.parse(["127.0.0.1", "::1"])
    addresses = resolve_and_check("http://localhost:8080/", allow)
    assert addresses and all(ip.is_loopback for ip in addresses)
    assert ipaddress.ip_address("127.0.0.1") in addresses or ipaddress.ip_address("::1") in addresses
    with pytest.raises(UrlRefused, match="loopback"):
        resolve_and_check("http://localhost:8080/")


def test_cidr_allowlist() -> None:
    allow = Allowlist.parse(["10.0.0.0/8", "192.168.1.7/24", "fd00::/8", "169.254.0.0/16"])
    assert check_url("http://10.200.3.4/", allow).ip == ipaddress.ip_address("10.200.3.4")
    assert check_url("http://0xa.1/", allow).ip == ipaddress.ip_address("10.0.0.1")
    assert check_url("http://[::ffff:10.1.1.1]/", allow).ip == ipaddress.ip_address("::ffff:10.1.1.1")
    assert check_url("http://192.168.1.200/", allow).ip == ipaddress.ip_address("192.168.1.200")
    assert check_url("http://[fd12::1]/", allow).ip == ipaddress.ip_address("fd12::1")
    assert check_url("http://169.254.1.1/", allow).ip == ipaddress.ip_address("169.254.1.1")
    assert "192.168.2.1 is a private address" in refusal("http://192.168.2.1/", allow)
    assert "172.16.0.1 is a private address" in refusal("http://172.16.0.1/", allow)
    # a wide CIDR never opens a metadata address; an exact entry does
    assert "cloud metadata" in refusal("http://169.254.169.254/", allow)
    assert "cloud metadata" in refusal("http://[fd00:ec2::254]/", allow)
    exact = Allowlist.parse(["169.254.169.254", "fd00:ec2::254/128"])
    assert check_url("http://169.254.169.254/", exact).ip == ipaddress.ip_address("169.254.169.254")
    assert check_url("http://[fd00:ec2::254]/", exact).ip == ipaddress.ip_address("fd00:ec2::254")
    resolver = fake_resolver({"svc.internal.test": ["10.1.2.3", "10.4.5.6"]})
    assert len(resolve_and_check("http://svc.internal.test/", allow, resolver=resolver)) == 2


def test_host_name_allowlist() -> None:
    allow = Allowlist.parse([" Internal.Example. ", "metadata.google.internal"])
    assert allow.allows_host("INTERNAL.example") and allow.allows_host("internal.example.")
    assert not allow.allows_host("other.internal.example")
    assert check_url("http://internal.example./", allow).ip is None
    assert check_url("http://metadata.google.internal/", allow).ip is None
    resolver = fake_resolver({"internal.example": ["10.0.0.5", "127.0.0.1"], "other.example": ["10.0.0.5"]})
    assert resolve_and_check("http://internal.example/", allow, resolver=resolver) == [
        ipaddress.ip_address("10.0.0.5"),
        ipaddress.ip_address("127.0.0.1"),
    ]
    with pytest.raises(UrlRefused, match="10.0.0.5 is a private address"):
        resolve_and_check("http://other.example/", allow, resolver=resolver)
    # a name entry does not open IP literals
    assert "private" in refusal("http://10.0.0.5/", allow)


def test_allowlist_parse_and_address_checks() -> None:
    allow = Allowlist.parse(("10.1.2.3/8", "2001:db8::/32", "example.com"))
    assert allow.networks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert allow.hosts == frozenset({"example.com"})
    assert allow.allows_address(ipaddress.ip_address("10.255.0.1"))
    assert not allow.allows_address(ipaddress.ip_address("11.0.0.1"))
    assert allow.allows_address(ipaddress.ip_address("2001:db8::1"))
    assert Allowlist.parse([]) == Allowlist()


@pytest.mark.parametrize(
    "entry",
    [
        "",
        "  ",
        "foo bar",
        "10.0.0.0/33",
        "300.1.2.3",
        "a..b",
        "http://example.com",
        "127.1",
        "-x-.test",
        "10.0.0.0/8/8",
        "exa$mple.com",
        "x" * 64 + ".test",
    ],
)
def test_bad_allowlist_entry_raises_value_error(entry: str) -> None:
    with pytest.raises(ValueError, match="LOOPLINE_URL_ALLOWLIST entry .* is neither an IP, a CIDR nor a host name"):
        Allowlist.parse(["127.0.0.1", entry])


def test_allowlist_parse_refuses_one_string() -> None:
    with pytest.raises(TypeError, match="iterable of entries"):
        Allowlist.parse("127.0.0.1")


def test_check_address_directly() -> None:
    assert check_address("8.8.8.8") == ipaddress.ip_address("8.8.8.8")
    assert check_address(ipaddress.ip_address("2606:4700:4700::1111")) == ipaddress.ip_address("2606:4700:4700::1111")
    with pytest.raises(UrlRefused) as info:
        check_address("10.0.0.1")
    assert str(info.value) == "refused: 10.0.0.1 is a private address (allow it with LOOPLINE_URL_ALLOWLIST)"
    with pytest.raises(UrlRefused, match=r"^refused http://x.test/: 'nope' is not an IP address$"):
        check_address("nope", url="http://x.test/")
    assert check_address("10.0.0.1", Allowlist.parse(["10.0.0.0/8"])) == ipaddress.ip_address("10.0.0.1")


def test_aresolve_and_check() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        await asyncio.sleep(0)
        table = {"public.test": ["8.8.8.8"], "private.test": ["8.8.8.8", "10.0.0.1"]}
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]

    async def scenario() -> None:
        assert await aresolve_and_check("http://public.test/", resolver=resolve) == [ipaddress.ip_address("8.8.8.8")]
        with pytest.raises(UrlRefused, match="10.0.0.1 is a private address"):
            await aresolve_and_check("http://private.test/", resolver=resolve)
        with pytest.raises(UrlRefused, match="host nowhere.test does not resolve"):
            await aresolve_and_check("http://nowhere.test/", resolver=resolve)
        with pytest.raises(UrlRefused, match="scheme 'file' is not allowed"):
            await aresolve_and_check("file:///etc/passwd", resolver=resolve)
        with pytest.raises(UrlRefused, match="loopback"):
            await aresolve_and_check("http://0x7f.1/", resolver=resolve)
        addresses = await aresolve_and_check("http://localhost/", Allowlist.parse(["127.0.0.1", "::1"]))
        assert addresses and all(ip.is_loopback for ip in addresses)

    asyncio.run(scenario())


def _spellings(value: int) -> st.SearchStrategy[str]:
    octets = value.to_bytes(4, "big")
    per_octet = st.lists(st.sampled_from(["dec", "hex", "oct"]), min_size=4, max_size=4).map(
        lambda bases: ".".join(
            str(b) if base == "dec" else hex(b) if base == "hex" else "0" + format(b, "o")
            for b, base in zip(octets, bases, strict=True)
        )
    )
    return st.one_of(
        st.just(str(ipaddress.IPv4Address(value))),
        st.just(str(value)),
        st.just(hex(value)),
        st.just("0" + format(value, "o")),
        st.just(".".join(hex(b) for b in octets)),
        st.just(".".join("0" + format(b, "o") for b in octets)),
        st.just(f"{octets[0]}.{value & 0xFFFFFF}"),
        st.just(f"{octets[0]}.{octets[1]}.{value & 0xFFFF}"),
        per_octet,
    )


guarded_v4 = st.sampled_from(GUARDED_V4_NETWORKS).flatmap(
    lambda net: st.integers(int(net.network_address), int(net.broadcast_address))
)
public_v4 = (
    st.integers(0, 2**32 - 1)
    .map(ipaddress.IPv4Address)
    .filter(lambda ip: ip.is_global and not ip.is_multicast and ip not in METADATA_ADDRESSES)
)


@property_settings
@given(st.data())
def test_property_any_spelling_of_a_guarded_ipv4_is_refused(data: st.DataObject) -> None:
    value = data.draw(guarded_v4)
    host = data.draw(_spellings(value))
    with pytest.raises(UrlRefused) as info:
        check_url(f"http://{host}/")
    assert f"{ipaddress.IPv4Address(value)} is a" in info.value.reason


@property_settings
@given(guarded_v4, st.booleans())
def test_property_ipv4_mapped_guarded_address_is_refused(value: int, dotted: bool) -> None:
    mapped = ipaddress.IPv6Address(0xFFFF00000000 | value)
    host = f"::ffff:{ipaddress.IPv4Address(value)}" if dotted else str(mapped)
    with pytest.raises(UrlRefused) as info:
        check_url(f"http://[{host}]/")
    assert f"embeds {ipaddress.IPv4Address(value)}, a" in info.value.reason


@property_settings
@given(st.data())
def test_property_any_spelling_of_a_public_ipv4_is_accepted(data: st.DataObject) -> None:
    ip = data.draw(public_v4)
    host = data.draw(_spellings(int(ip)))
    assert check_url(f"http://{host}/").ip == ip
    assert check_url(f"https://[::ffff:{ip}]/").ip == ipaddress.IPv6Address(0xFFFF00000000 | int(ip))
