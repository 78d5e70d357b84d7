"""Self-play negatives: over random catalogs each is a real item, never the target, in the bin of
the SID prefix it shares with the target; from a model's constrained beams, of the asked type."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.errors import UserError
from neo_jax.train.self_play import DIFFICULTY_BINS, bin_negatives
from sid_fixtures import catalogs
from test_generate import cli_inputs  # noqa: F401 (a fixture: a random model, its tokenizer and SIDs)


def shared_by_hand(a, b) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x < 0 or x != y:
            break
        shared += 1
    return shared


@settings(max_examples=60, deadline=None)
@given(catalog=catalogs(), data=st.data())
def test_negatives_are_real_items_never_the_target_in_their_prefix_bin(catalog, data):
    codes = catalog.trie.codes  # [items, levels]
    n, beams = catalog.n_items, data.draw(st.integers(1, 8))
    prompts = data.draw(st.integers(1, 4))
    targets = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=prompts, max_size=prompts)))
    rows = np.array([data.draw(st.lists(st.integers(-1, n - 1), min_size=beams, max_size=beams))
                     for _ in range(prompts)])
    binned = bin_negatives(rows, targets, codes)  # [prompt, bin, beam]
    assert binned.shape == (prompts, len(DIFFICULTY_BINS), beams)
    for p in range(prompts):
        expected = [[r for r in rows[p] if r >= 0 and r != targets[p]
                     and min(shared_by_hand(codes[r], codes[targets[p]]), 2) == b] for b in range(3)]
        for b in range(3):
            got = binned[p, b]
            assert got[got >= 0].tolist() == expected[b]  # the bin's beams, in beam order
            assert (got[len(expected[b]):] == -1).all()  # left-aligned, padded with -1


def test_an_item_of_another_depth_shares_no_padded_level():
    codes = np.array([[0, 1, -1], [0, 1, 2], [0, 2, -1], [1, 0, 0]], np.int32)
    binned = bin_negatives(np.array([[1, 2, 3, 0, -1]]), np.array([0]), codes)
    assert binned[0].tolist() == [[3, -1, -1, -1, -1], [2, -1, -1, -1, -1], [1, -1, -1, -1, -1]]


def test_bad_shapes_and_rows_are_refused():
    codes = np.zeros((3, 2), np.int32)
    with pytest.raises(UserError, match=r"\[prompt, beam\]"):
        bin_negatives(np.array([1, 2]), np.array([0]), codes)
    with pytest.raises(UserError, match="catalog rows below 3"):
        bin_negatives(np.array([[1, 5]]), np.array([0]), codes)


def test_negatives_from_constrained_beams_are_of_the_asked_type(cli_inputs):
    from neo_jax.config import MeshConfig
    from neo_jax.decode.commands import load_generator
    from neo_jax.decode.generate import DecodeSettings
    from neo_jax.sharding import make_mesh

    root, catalog = cli_inputs
    generator = load_generator(root / "ckpt", root / "sids", make_mesh(MeshConfig()), root / "tokenizer")
    for entity_type in catalog.type_names:
        of_type = catalog.rows_of_type(entity_type)
        prompts = [f"task: recommend | type: {entity_type} | format: ids\nuser {u}" for u in range(3)]
        rows = generator.rank_items(prompts, DecodeSettings(method="beam", max_new_tokens=5, beam_size=6))
        targets = rows[:, 0]  # the top beam as the chosen item: it must never come back as a negative
        binned = bin_negatives(rows, targets, generator.sids.trie.codes)
        negatives = binned[binned >= 0]
        assert negatives.size == int((rows[:, 1:] >= 0).sum())  # every other real beam is a negative
        assert all(catalog.type_name(int(r)) == entity_type and int(r) in set(of_type.tolist()) for r in negatives)
        assert not any(int(t) in binned[p].ravel().tolist() for p, t in enumerate(targets))
