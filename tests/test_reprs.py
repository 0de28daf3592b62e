"""loopline.reprs: ``plain_saferepr`` is Celery's ``saferepr`` byte for byte, or None (then saferepr runs); the
drop-in ``saferepr`` is the same text for every value, and the asyncio pool puts it in the tracer while it runs."""

from __future__ import annotations

import math
from typing import Any

import celery.app.trace
import pytest
from celery.utils.saferepr import saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from config.celery_app import app
from loopline import reprs
from loopline.concurrency.asyncio import TaskPool
from loopline.reprs import plain_saferepr

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


result_keys = st.one_of(st.text(), st.integers())


@settings(max_examples=600, deadline=None, database=None)
@given(st.dictionaries(result_keys, values, max_size=12), st.sampled_from([None, 8, 64, 200, 1024]))
def test_the_drop_in_is_celerys_saferepr_for_results(value: dict[Any, Any], maxlen: int | None) -> None:
    assert reprs.saferepr(value, maxlen) == saferepr(value, maxlen)


@pytest.mark.parametrize("value", [
    {}, {"a": "it's"}, {"a": "line\nbreak\\"}, {"é": "ünï"}, {"n": math.inf, "m": -0.0, "t": True, "z": None},
    {"x": "a" * 1015}, {"x": "a" * 1016}, {"x": "a" * 1017}, {"x": "a b " * 400}, {1: "int key"}, {"d": {"n": 1}},
    {"url": "http://127.0.0.1/job", "status": 200, "elapsed_ms": 101.5, "sha256": "f" * 64, "type": None},
    {"big": 10 ** 5000},
])
def test_the_drop_in_is_celerys_saferepr_at_the_edges(value: dict[Any, Any]) -> None:
    try:
        expected = saferepr(value, 1024)
    except ValueError:  # an int too long for str(): the drop-in raises as Celery's does
        with pytest.raises(ValueError):
            reprs.saferepr(value, 1024)
    else:
        assert reprs.saferepr(value, 1024) == expected


def test_the_asyncio_pool_puts_it_in_the_tracer_while_it_runs() -> None:
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    try:
        assert celery.app.trace.saferepr is reprs.saferepr
    finally:
        pool.on_stop()
    assert celery.app.trace.saferepr is saferepr
