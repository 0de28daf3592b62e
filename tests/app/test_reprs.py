"""loopline.app.reprs: ``plain_saferepr`` is Celery's ``saferepr`` byte for byte, or None (then saferepr runs)."""

from __future__ import annotations

from typing import Any

import pytest
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline.app.reprs import plain_saferepr

pytestmark = pytest.mark.timeout(60)
property_settings = settings(database=None, deadline=None, max_examples=400)

# What JSON arguments decode to, plus tuples (a job's args), in every corner saferepr treats apart: quotes,
# backslashes, control and non-ASCII characters, surrogates, floats of every kind, big ints, bools, None.
scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-10 ** 40, max_value=10 ** 40)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text() | st.text(alphabet="'\"\\ \n\x00é\u2028"))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner) | st.tuples(inner, inner)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


@property_settings
@given(args=st.lists(values, max_size=5).map(tuple), maxlen=st.sampled_from([1, 8, 30, 100, 1024]),
       maxlevels=st.sampled_from([1, 2, 3, 4]))
def test_plain_saferepr_is_saferepr_or_none(args: tuple[Any, ...], maxlen: int, maxlevels: int) -> None:
    fast = plain_saferepr(args, maxlen, maxlevels)
    if fast is not None:
        assert fast == saferepr(args, maxlen, maxlevels=maxlevels)


@property_settings
@given(kwargs=st.dictionaries(st.text(max_size=10), values, max_size=5))
def test_plain_saferepr_of_kwargs_is_saferepr_at_celerys_defaults(kwargs: dict[str, Any]) -> None:
    fast = plain_saferepr(kwargs, 1024, 3)
    if fast is not None:
        assert fast == saferepr(kwargs, 1024, maxlevels=3)


@pytest.mark.parametrize("value", [
    (1,), (), (None, True, 2.5, -0.0, float("nan")), ("it's", 'say "hi"', "back\\slash", "new\nline", "grüße 日本"),
    ({"k": [1, None]},), {"method": "HEAD", "timeout_s": 5}, {}, ([], {}, ()), ((1,), (1, 2)),
])
def test_plain_values_are_handled_by_the_fast_path(value: Any) -> None:
    assert plain_saferepr(value, 1024, 3) == saferepr(value, 1024, maxlevels=3)


@pytest.mark.parametrize(("value", "why"), [
    (("x" * 1030,), "long enough for saferepr to truncate"),
    (("x" * 1020,), "within a few characters of the limit"),
    (([[[1]]],), "deeper than maxlevels: saferepr elides it"),
    ((b"bytes",), "bytes: saferepr shows them its own way"),
    (({1: "int key"},), "a key that is not a str"),
    (({1, 2},), "a set"),
    ((object(),), "any other type"),
])
def test_anything_else_is_left_to_saferepr(value: Any, why: str) -> None:
    assert plain_saferepr(value, 1024, 3) is None, why


def test_a_cycle_is_left_to_saferepr() -> None:
    loop: list[Any] = []
    loop.append(loop)
    assert plain_saferepr((loop,), 1024, 3) is None
    assert plain_saferepr((loop,), 1024, 0) is None  # 0: no depth limit in saferepr, so none of ours either
