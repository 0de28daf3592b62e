"""URL-guard properties that tests/jobs/test_urlguard.py checks only by example: userinfo tricks, trailing dots,
IPv6 spellings of guarded ranges, names that resolve to a guarded address, and redirects to one.

Pure checks use injected resolvers; the redirect property goes through the real fetch loop, but only to
the local target on 127.0.0.1 and to other loopback addresses, so nothing here connects anywhere else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.celery_app import settings as loopline_settings
from loopline.errors import FetchFailed
from loopline.jobs import http_sync
from loopline.jobs.specs import FetchRequest
from loopline.jobs.urlguard import UrlRefused, check_url, resolve_and_check

pytestmark = pytest.mark.timeout(60)
property_settings = settings(database=None, deadline=None, max_examples=150)

GUARDED_V4 = [ipaddress.IPv4Network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                                                  "169.254.0.0/16", "100.64.0.0/10", "0.0.0.0/8")]
GUARDED_V6 = [ipaddress.IPv6Network(n) for n in ("::1/128", "fe80::/10", "fc00::/7", "::ffff:10.0.0.0/104")]
label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
# A last label that is a number (decimal, or 0x... hex) makes the host an IPv4 address to the URL parser, one
# check_url refuses as such; those are not the host names these properties are about.
host_name = st.lists(label, min_size=2, max_size=4).map(".".join).filter(
    lambda h: not re.fullmatch(r"[0-9]+|0x[0-9a-f]*", h.rsplit(".", 1)[-1]))
guarded_v4 = st.sampled_from(GUARDED_V4).flatmap(
    lambda net: st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv4Address))
guarded_v6 = st.sampled_from(GUARDED_V6).flatmap(
    lambda net: st.integers(int(net.network_address), int(net.broadcast_address)).map(ipaddress.IPv6Address))
userinfo = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~:", min_size=0, max_size=12)


def _v6_spelling(ip: ipaddress.IPv6Address, style: str) -> str:
    if style == "exploded":
        return ip.exploded
    if style == "upper":
        return ip.compressed.upper()
    if style == "no-zeros":  # every group written out, without leading zeros
        return ":".join(format(int(group, 16), "x") for group in ip.exploded.split(":"))
    return ip.compressed


def _resolver(answers: list[str]) -> Callable[[str, int], list[str]]:
    def resolve(host: str, port: int) -> list[str]:
        return answers

    return resolve


@property_settings
@given(guarded_v4, host_name, userinfo)
def test_property_userinfo_never_changes_which_host_is_checked(ip: ipaddress.IPv4Address, name: str,
                                                               user: str) -> None:
    # The guarded address hidden in the userinfo is not the host; the one after the @ is.
    assert check_url(f"http://{ip}@{name}/").host == name
    with pytest.raises(UrlRefused, match=str(ip)):
        check_url(f"http://{name}@{ip}/")
    with pytest.raises(UrlRefused, match=str(ip)):
        check_url(f"http://{user}@{ip}:8080/")
    with pytest.raises(UrlRefused, match=str(ip)):
        resolve_and_check(f"http://{ip}:80@{name}/", resolver=_resolver([str(ip)]))


@property_settings
@given(guarded_v4, st.sampled_from(["{}", "{}.", "{}:80", "{}.:443"]))
def test_property_a_trailing_dot_does_not_hide_a_guarded_ipv4(ip: ipaddress.IPv4Address, form: str) -> None:
    with pytest.raises(UrlRefused, match=str(ip)):
        check_url("http://" + form.format(ip) + "/")
    with pytest.raises(UrlRefused, match=str(ip)):
        check_url("http://" + form.format(int(ip)) + "/")


@property_settings
@given(guarded_v6, st.sampled_from(["compressed", "exploded", "upper", "no-zeros"]))
def test_property_every_spelling_of_a_guarded_ipv6_is_refused(ip: ipaddress.IPv6Address, style: str) -> None:
    with pytest.raises(UrlRefused):
        check_url(f"http://[{_v6_spelling(ip, style)}]/")


@property_settings
@given(host_name, st.one_of(guarded_v4, guarded_v6), st.lists(st.sampled_from(["8.8.8.8", "2606:4700::1111"]),
                                                             max_size=2), st.booleans())
def test_property_a_name_that_resolves_to_a_guarded_address_is_refused(
    name: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, public: list[str], trailing_dot: bool
) -> None:
    host = name + "." if trailing_dot else name
    with pytest.raises(UrlRefused):
        resolve_and_check(f"http://{host}/", resolver=_resolver([*public, str(ip)]))


@pytest.fixture(scope="module")
def fetch_session() -> Iterator[None]:
    yield
    http_sync.close_sessions()  # the sessions the fetches left idle


loopback_but_not_allowlisted = st.one_of(
    st.integers(int(ipaddress.IPv4Address("127.0.0.2")), int(ipaddress.IPv4Address("127.255.255.254"))).flatmap(
        lambda value: st.sampled_from([str(ipaddress.IPv4Address(value)), str(value), hex(value)])),
    st.sampled_from(["[::1]", "[0:0:0:0:0:0:0:1]", "[::ffff:127.0.0.2]", "0x7f.2", "127.1.2"]),
)


@settings(database=None, deadline=None, max_examples=25)
@given(loopback_but_not_allowlisted)
def test_property_a_redirect_to_a_guarded_address_is_refused_before_connecting(
    fetch_session: None, target_url: str, guarded_host: str
) -> None:
    # LOOPLINE_URL_ALLOWLIST=127.0.0.1 (conftest) lets the first hop reach the target; the second hop,
    # to any other loopback spelling, must be refused by the guard in the fetch loop itself.
    req = FetchRequest.build(loopline_settings, f"{target_url}/redirect?to=http://{guarded_host}:9/x",
                             timeout_s=5)
    with pytest.raises(FetchFailed, match="loopback"):
        http_sync.fetch(req)


def test_the_redirect_property_reaches_the_target(fetch_session: None, target_url: str) -> None:
    # The same path, redirected to the allowlisted target itself, succeeds: the refusals above are the guard's.
    result = http_sync.fetch(FetchRequest.build(loopline_settings, f"{target_url}/redirect?to=/job%3Fbytes%3D3"))
    assert (result.status, result.bytes) == (200, 3)
