"""Any filter a client can send, and any id, meets the store as a result or as a UsageError
that names what is wrong: never another exception (which the server would answer with a 500).
Hypothesis draws the shapes: JSON of any nesting, keys good and bad, thousands of keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipsearch.errors import ClipsearchError, UsageError
from clipsearch.filters import MAX_FILTER_KEYS, check_filters, matches
from clipsearch.identity import ModelIdentity
from clipsearch.store import NewItem, SQLiteStore

IDENTITY = ModelIdentity("fake", "fake-colour", "", 4, {"size": [32, 32]})
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.one_of(st.sampled_from(["width", "label", "taken_at", "path", "a", "a.b", "x-y"]), st.text(max_size=10))
operators = st.sampled_from(["gt", "gte", "lt", "lte", "iexact", "eq", "", "$or"])
filters = st.one_of(
    st.dictionaries(keys, json_values, max_size=6),
    st.dictionaries(keys, st.dictionaries(operators, json_values, max_size=3), max_size=4),
    json_values,  # not even an object
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = SQLiteStore(tmp_path_factory.mktemp("shapes") / "s.db")
    s.bind_namespace("default", IDENTITY, {})
    items = [
        NewItem(
            f"i{i}", {"width": 100 * i, "label": ["cat", "dog"][i % 2], "taken_at": f"2024-0{i + 1}-01"}, "", 0, None
        )
        for i in range(5)
    ]
    vectors = np.eye(5, 4, dtype=np.float32) + 0.1
    s.write_batch("default", items, vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    yield s
    s.close()


def _served_or_refused(call):
    try:
        call()
    except UsageError as e:
        assert e.message and "\n" not in e.message
    except ClipsearchError as e:  # any other error of the library is a typed answer too
        assert e.message


@settings(
    max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(shape=filters)
def test_every_filter_shape_is_served_or_refused(store, shape):
    query = np.full((1, 4), 0.5, np.float32)
    _served_or_refused(lambda: store.search("default", query, k=3, filters=shape))
    _served_or_refused(lambda: store.keyword_search("default", "cat", k=3, filters=shape))
    _served_or_refused(lambda: matches({"width": 1}, shape))


@pytest.mark.parametrize(
    ("shape", "says"),
    [
        ({"a": []}, "no values"),
        ({"a": [["x"]]}, "a list of values"),
        ({"a": {"x": 1}}, "operator"),
        ({"a": None}, "no value"),
        ({"a": math.nan}, "finite"),
        ({f"k{i}": 1 for i in range(2000)}, "at most"),
        ({"a": list(range(5000))}, "at most"),
        ("label=cat", "object"),
    ],
)
def test_bad_shapes_say_what_is_wrong(shape, says):
    with pytest.raises(UsageError, match=says) as e:
        check_filters(shape)
    assert e.value.param == "filter"


def test_the_limits_leave_room_for_real_filters(store):
    wide = {f"k{i}": "x" for i in range(MAX_FILTER_KEYS)}
    check_filters(wide)
    assert store.search("default", np.ones((1, 4), np.float32), k=3, filters={"label": ["cat", "dog"]})


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(item_id=st.text(max_size=220))
def test_every_id_is_refused_or_stored_and_read_back_exactly(store, item_id):
    from clipsearch.store.base import check_item_id

    try:
        check_item_id(item_id)
    except UsageError as e:
        assert e.param == "id"
        return
    vector = np.full((1, 4), 0.5, np.float32)
    store.write_batch("default", [NewItem(item_id, {"label": "x"}, "", 0, None)], vector)
    assert [it.id for it in store.get_items("default", [item_id])] == [item_id]
    assert store.delete_items("default", [item_id]) == 1


@pytest.mark.parametrize("item_id", [".", "..", "a/../b", "x\x00y", " padded", "z" * 201])
def test_ids_no_url_or_database_can_carry_are_refused(item_id):
    from clipsearch.store.base import check_item_id

    with pytest.raises(UsageError) as e:
        check_item_id(item_id)
    assert e.value.param == "id"
