"""The tracer's result repr: the same text as Celery's saferepr, for every value."""

from __future__ import annotations

import math
from typing import Any

import celery.app.trace
import pytest
from celery.utils.saferepr import saferepr as celery_saferepr
from hypothesis import given, settings
from hypothesis import strategies as st

from config.celery_app import app
from loopline.concurrency import fastrepr
from loopline.concurrency.asyncio import TaskPool

scalars = st.one_of(st.text(), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(), inner,
                                                                                                     max_size=4)),
                      max_leaves=12)
keys = st.one_of(st.text(), st.integers())


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(keys, values, max_size=12), st.sampled_from([None, 8, 64, 200, 1024]))
def test_same_text_as_celerys_saferepr(value: dict[Any, Any], maxlen: int | None) -> None:
    assert fastrepr.saferepr(value, maxlen) == celery_saferepr(value, maxlen)


@pytest.mark.parametrize("value", [
    {}, {"a": "it's"}, {"a": "line\nbreak\\"}, {"é": "ünï"}, {"n": math.inf, "m": -0.0, "t": True, "z": None},
    {"x": "a" * 1015}, {"x": "a" * 1016}, {"x": "a" * 1017}, {"x": "a b " * 400}, {1: "int key"}, {"d": {"n": 1}},
    {"url": "http://127.0.0.1/job", "status": 200, "elapsed_ms": 101.5, "sha256": "f" * 64, "type": None},
])
def test_same_text_at_the_edges(value: dict[Any, Any]) -> None:
    assert fastrepr.saferepr(value, 1024) == celery_saferepr(value, 1024)


def test_the_pool_puts_it_in_the_tracer_while_it_runs() -> None:
    pool = TaskPool(limit=2, app=app)
    pool.on_start()
    try:
        assert celery.app.trace.saferepr is fastrepr.saferepr
    finally:
        pool.on_stop()
    assert celery.app.trace.saferepr is celery_saferepr
