"""Packed binary records: round trips, alignment, and clear errors on records that are not packed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, strategies as st

from neo_jax.errors import UserError
from neo_jax.tasks.packed import pack, unpack
from neo_jax.tasks.preference import PreferenceExample
from neo_jax.tasks.records import TokenizedExample

texts = st.lists(st.text(max_size=12), max_size=4)
int_arrays = st.lists(st.integers(-2**31, 2**31 - 1), max_size=20).map(lambda v: np.asarray(v, np.int32))
float_arrays = st.lists(st.floats(allow_nan=False, width=32), max_size=20).map(lambda v: np.asarray(v, np.float32))


@given(texts, st.lists(st.one_of(int_arrays, float_arrays), max_size=5))
def test_pack_round_trips_texts_and_arrays(names, arrays):
    record = pack(names, arrays)
    got_names, got_arrays = unpack(record)
    assert got_names == names
    assert len(got_arrays) == len(arrays)
    for got, want in zip(got_arrays, arrays):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_arrays_start_aligned_after_texts_of_any_length():
    for text in ("", "a", "ab", "abc", "é"):
        _, (first, second) = unpack(pack([text], [np.arange(3, dtype=np.int32), np.ones(2, np.float32)]))
        assert first.tolist() == [0, 1, 2] and second.tolist() == [1.0, 1.0]


def test_task_and_preference_examples_round_trip():
    tokens = lambda *v: np.asarray(v, np.int32)  # noqa: E731
    example = TokenizedExample("recommend", "product", "ids", tokens(1, 5, 6), tokens(7, 2), tokens(8), tokens(2))
    back = TokenizedExample.from_bytes(example.to_bytes())
    assert (back.task, back.entity_type, back.output_format) == ("recommend", "product", "ids")
    for part in ("prompt", "completion", "avoid", "end"):
        np.testing.assert_array_equal(getattr(back, part), getattr(example, part))
    preference = PreferenceExample("recommend", "product", "ids", tokens(1, 4), (tokens(5, 6), tokens(7), tokens()),
                                   np.array([-1.5, -2.0, -0.25], np.float32))
    back = PreferenceExample.from_bytes(preference.to_bytes())
    assert [c.tolist() for c in back.completions] == [[5, 6], [7], []]
    np.testing.assert_array_equal(back.reference, preference.reference)
    assert back.prompt.tolist() == [1, 4]


def test_a_json_record_is_refused_with_what_to_do():
    old = json.dumps({"task": "recommend", "prompt": [1, 2], "completion": [3]}).encode()
    with pytest.raises(UserError, match="not a packed neo_jax record.*neo-jax data records"):
        TokenizedExample.from_bytes(old)


@pytest.mark.parametrize("damage", [lambda r: r + bytes(4), lambda r: r[:-4], lambda r: r[:7]])
def test_a_damaged_record_is_refused(damage):
    record = pack(["recommend"], [np.arange(4, dtype=np.int32)])
    with pytest.raises(UserError, match="damaged"):
        unpack(damage(record))


def test_only_numbers_are_packed():
    with pytest.raises(TypeError, match="numbers"):
        pack([], [np.array(["a"])])
