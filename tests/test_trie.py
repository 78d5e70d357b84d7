"""The SID trie: every SID is reachable and nothing else is; ranges, order, tokens, store."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.catalog.store import load_sid_trie, save_sid_trie
from neo_jax.catalog.table import ROOT, SidTokenIndex, SidTrie, build_trie, node_tokens
from neo_jax.errors import UserError
from neo_jax.vocab import EntityType, VocabLayout


def walk_leaves(trie: SidTrie) -> dict[tuple, int]:
    """Walk the CSR from the root (plain Python, DFS); `(type, *codes) -> catalog row` of each leaf."""
    leaves, stack = {}, [(ROOT, ())]
    while stack:
        node, path = stack.pop()
        lo, hi = trie.child_start[node], trie.child_start[node + 1]
        if lo == hi:
            assert node != ROOT
            leaf_type = int(trie.node_type[node])
            assert trie.subtree_hi[node] - trie.subtree_lo[node] == 1
            leaves[(leaf_type, *path)] = int(trie.item_order[trie.subtree_lo[node]])
            continue
        for child in range(lo, hi):
            stack.append((child, path + (int(trie.node_code[child]),)))
    return leaves


def input_sids(codes: np.ndarray, item_types: np.ndarray, levels: tuple[int, ...]) -> dict[tuple, int]:
    return {(int(t), *codes[i, : levels[t]].tolist()): i for i, t in enumerate(item_types)}


def check_structure(trie: SidTrie) -> None:
    """The invariants of the contract, node by node."""
    n = trie.num_nodes
    assert trie.child_start[0] == 1 and trie.child_start[-1] == n
    assert np.all(np.diff(trie.child_start) >= 0)
    assert trie.max_children == int(np.diff(trie.child_start).max())
    assert trie.node_level[0] == -1 and trie.node_type[0] == -1 and trie.node_code[0] == -1
    assert (trie.subtree_lo[0], trie.subtree_hi[0]) == (0, trie.n_items)
    for node in range(n):
        kids = trie.children(node)
        if kids.size == 0:
            continue
        if node == ROOT:
            keys = list(zip(trie.node_type[kids].tolist(), trie.node_code[kids].tolist()))
            assert keys == sorted(set(keys)) and np.all(trie.node_level[kids] == 0)
        else:
            assert np.all(np.diff(trie.node_code[kids]) > 0)  # sorted, distinct codes
            assert np.all(trie.node_level[kids] == trie.node_level[node] + 1)
            assert np.all(trie.node_type[kids] == trie.node_type[node])
        # the children partition the parent's leaf range, in order
        assert trie.subtree_lo[kids[0]] == trie.subtree_lo[node]
        assert trie.subtree_hi[kids[-1]] == trie.subtree_hi[node]
        assert np.all(trie.subtree_lo[kids[1:]] == trie.subtree_hi[kids[:-1]])
    # BFS numbering: levels never decrease along the node ids
    assert np.all(np.diff(trie.node_level.astype(np.int32)) >= 0)
    assert sorted(trie.item_order.tolist()) == list(range(trie.n_items))


def check_prefixes(trie: SidTrie) -> None:
    """Every item in a node's range has that node's prefix (and type)."""
    for node in range(1, trie.num_nodes):
        rows = trie.item_order[trie.subtree_lo[node]: trie.subtree_hi[node]]
        level = trie.node_level[node]
        assert np.all(trie.item_types[rows] == trie.node_type[node])
        assert np.all(trie.codes[rows, level] == trie.node_code[node])


def random_catalog(rng: np.random.Generator, levels: tuple[int, ...], sizes: list[int], counts: list[int]):
    """Distinct random SIDs per type; codes padded with -1 past each type's depth."""
    max_levels = max(levels)
    all_codes, all_types = [], []
    for t, (depth, size, count) in enumerate(zip(levels, sizes, counts)):
        space = size ** depth
        flat = rng.choice(space, size=min(count, space), replace=False)
        digits = np.stack([(flat // size ** (depth - 1 - level)) % size for level in range(depth)], axis=1)
        block = np.full((flat.size, max_levels), -1, np.int64)
        block[:, :depth] = digits
        all_codes.append(block)
        all_types.append(np.full(flat.size, t))
    perm = rng.permutation(sum(c.shape[0] for c in all_codes))
    return np.concatenate(all_codes)[perm], np.concatenate(all_types)[perm]


@pytest.mark.parametrize("levels,sizes,counts", [
    ((3,), [4], [40]),  # one type
    ((3, 2, 4), [3, 5, 2], [20, 25, 16]),  # several types, uneven depth (type 2 is full)
    ((2, 1, 3), [4, 7, 3], [9, 1, 12]),  # a 1-item type of depth 1
    ((1,), [10], [1]),  # a 1-item catalog
    ((2, 3, 1), [3, 3, 3], [5, 0, 3]),  # a declared type with no items
])
def test_every_sid_reachable_and_nothing_else(levels, sizes, counts):
    codes, types = random_catalog(np.random.default_rng(0), levels, sizes, counts)
    trie = build_trie(codes, types, levels)
    assert walk_leaves(trie) == input_sids(codes, types, levels)
    check_structure(trie)
    check_prefixes(trie)
    for sid, row in input_sids(codes, types, levels).items():
        assert trie.find_item(sid[0], sid[1:]) == row
        assert trie.find_item(sid[0], sid[1:-1]) is None  # a proper prefix is not an item


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.lists(st.integers(1, 4), min_size=1, max_size=3),
       st.lists(st.integers(1, 4), min_size=3, max_size=3), st.lists(st.integers(1, 30), min_size=3, max_size=3))
def test_trie_matches_walk_property(seed, levels, sizes, counts):
    levels = tuple(levels)
    codes, types = random_catalog(np.random.default_rng(seed), levels, sizes[: len(levels)], counts[: len(levels)])
    trie = build_trie(codes, types, levels)
    assert walk_leaves(trie) == input_sids(codes, types, levels)
    check_structure(trie)
    check_prefixes(trie)


def test_hand_built_example():
    codes = np.array([[1, 0], [0, 2], [0, 1], [1, -1]])
    trie = build_trie(codes, [0, 0, 0, 1], (2, 1))
    # root; level 0: (t0,c0) (t0,c1) (t1,c1); level 1: under t0/0: 1, 2; under t0/1: 0
    assert trie.child_start.tolist() == [1, 4, 6, 7, 7, 7, 7, 7]
    assert trie.node_code.tolist() == [-1, 0, 1, 1, 1, 2, 0]
    assert trie.node_type.tolist() == [-1, 0, 0, 1, 0, 0, 0]
    assert trie.node_level.tolist() == [-1, 0, 0, 0, 1, 1, 1]
    assert trie.item_order.tolist() == [2, 1, 0, 3]
    assert trie.subtree_lo.tolist() == [0, 0, 2, 3, 0, 1, 2]
    assert trie.subtree_hi.tolist() == [4, 2, 3, 4, 1, 2, 3]
    assert trie.max_children == 3
    assert trie.find_item(1, [1]) == 3 and trie.find_item(0, [1]) is None and trie.find_item(1, [0]) is None


def test_node_tokens_follow_layout():
    codes, types = random_catalog(np.random.default_rng(1), (2, 3), [4, 3], [10, 12])
    trie = build_trie(codes, types, (2, 3))
    layout = VocabLayout(text_size=50, entity_types=(EntityType("a", (4, 4)), EntityType("b", (3, 3, 3))))
    tokens = node_tokens(trie, layout)
    assert tokens[0] == -1
    for node in range(1, trie.num_nodes):
        assert tokens[node] == layout.sid_token(int(trie.node_type[node]), int(trie.node_level[node]),
                                                int(trie.node_code[node]))
    small = VocabLayout(text_size=50, entity_types=(EntityType("a", (4, 2)), EntityType("b", (3, 3, 3))))
    with pytest.raises(UserError, match="outside its codebook"):
        node_tokens(trie, small)
    with pytest.raises(UserError, match="levels per type"):
        node_tokens(trie, VocabLayout(text_size=50, entity_types=(EntityType("a", (4, 4)),)))


def test_token_index_finds_every_item_as_find_item_does_and_nothing_else():
    levels, sizes = (2, 3), [4, 3]
    codes, types = random_catalog(np.random.default_rng(3), levels, sizes, [12, 20])
    trie = build_trie(codes, types, levels)
    layout = VocabLayout(text_size=50, entity_types=(EntityType("a", (4, 4)), EntityType("b", (3, 3, 3))))
    index = SidTokenIndex.build(trie, layout)
    width = max(levels)
    cases, expected = [], []  # SIDs as code tokens, and the row `find_item` gives (-1 for None)
    for sid, row in input_sids(codes, types, levels).items():
        type_index, sid_codes = sid[0], sid[1:]
        tokens = [layout.sid_token(type_index, level, code) for level, code in enumerate(sid_codes)]
        cases += [tokens, tokens[:-1]]  # the item, and a proper prefix of it
        expected += [row, -1]
        if len(tokens) < width:  # one code too many
            cases.append(tokens + [layout.sid_token(type_index, len(tokens) - 1, 0)])
            expected.append(-1)
    for type_index, entity in enumerate(layout.entity_types):  # every SID, in the catalog or not
        for sid_codes in np.ndindex(*entity.codebook_sizes):
            cases.append([layout.sid_token(type_index, level, code) for level, code in enumerate(sid_codes)])
            row = trie.find_item(type_index, sid_codes)
            expected.append(-1 if row is None else row)
    cases.append([3, 4])  # text tokens
    expected.append(-1)
    tokens = np.zeros((len(cases), width), np.int64)  # [cases, width], 0 past each length
    for i, case in enumerate(cases):
        tokens[i, :len(case)] = case
    lengths = np.array([len(c) for c in cases])  # [cases]
    assert index.rows(tokens, lengths).tolist() == expected
    assert index.rows(np.stack([tokens, tokens[::-1]]), np.stack([lengths, lengths[::-1]])).tolist() == \
        [expected, expected[::-1]]  # any leading shape


@pytest.mark.parametrize("codes,types,levels,message", [
    (np.zeros((0, 2)), np.zeros(0), (2,), "empty catalog"),
    (np.array([[0, 1], [0, 1]]), [0, 0], (2,), "same SID"),
    (np.array([[0, 1], [0, 2]]), [0, 3], (2,), "entity type 3"),
    (np.array([[0, 1], [0, -1]]), [0, 0], (2,), "item row 1"),
    (np.array([[0, 1], [0, 5]]), [0, 1], (2, 1), "item row 1"),
    (np.array([[0, 1]]), [0], (0,), "depth >= 1"),
    (np.array([[0, 1]]), [0], (3,), "2 columns"),
    (np.array([0, 1]), [0, 0], (1,), "2-D"),
])
def test_bad_input_is_a_user_error(codes, types, levels, message):
    with pytest.raises(UserError, match=message):
        build_trie(codes, np.asarray(types), levels)


def test_store_round_trip(tmp_path):
    codes, types = random_catalog(np.random.default_rng(2), (3, 1), [5, 9], [60, 4])
    trie = build_trie(codes, types, (3, 1))
    save_sid_trie(trie, tmp_path / "trie")
    loaded = load_sid_trie(tmp_path / "trie")
    assert loaded.levels_per_type == trie.levels_per_type and loaded.max_children == trie.max_children
    for name, array in trie.arrays().items():
        got = loaded.arrays()[name]
        assert got.dtype == array.dtype and np.array_equal(got, array), name
    with pytest.raises(UserError, match="not found"):
        load_sid_trie(tmp_path / "missing")
