"""The SID trie as flat arrays: what the constrained decoder walks on device.

Contract (see `/work/notes/trie_spec.md`): nodes are numbered in BFS order, node 0 is
the super-root (the state right after `[SID]`), its children are the level-0 nodes of
every entity type ordered by (type, code). Children of every node are contiguous and
sorted by code, and the children of node n directly follow those of node n-1, so one
CSR row pointer `child_start` describes them all. A leaf is one complete SID, that is
exactly one catalog item; `item_order` lists catalog rows in trie (DFS) order and
`subtree_lo/hi` give the leaves under each node as a range of that order.

The build is vectorised numpy: one lexsort of the items by (type, codes), then per
level a prefix-change mask marks where a new node starts. No Python loop runs per item.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from neo_jax.errors import UserError
from neo_jax.vocab import VocabLayout

ROOT = 0
_INT8_MAX = np.iinfo(np.int8).max


@dataclasses.dataclass(frozen=True)
class SidTrie:
    """The trie of every item's SID, host side (numpy); the decoder moves it to device."""

    codes: np.ndarray  # [n_items, max_levels] int32, level-local codes, -1 past a type's depth
    item_types: np.ndarray  # [n_items] int32, entity type index of each catalog row
    levels_per_type: tuple[int, ...]  # SID depth of each entity type index
    child_start: np.ndarray  # [num_nodes + 1] int32, CSR row pointer over BFS-ordered nodes
    node_code: np.ndarray  # [num_nodes] int32, code on the edge into the node (-1 for the root)
    node_level: np.ndarray  # [num_nodes] int8, level of that code (-1 for the root)
    node_type: np.ndarray  # [num_nodes] int8, entity type index (-1 for the root)
    item_order: np.ndarray  # [n_items] int32, catalog row of the k-th leaf in trie order
    subtree_lo: np.ndarray  # [num_nodes] int32, first trie-order leaf position under the node
    subtree_hi: np.ndarray  # [num_nodes] int32, one past the last leaf position under the node
    max_children: int  # widest CSR row (reported by `sids build` and the benchmarks)

    @property
    def n_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_nodes(self) -> int:
        return int(self.node_code.shape[0])

    @property
    def max_levels(self) -> int:
        return int(self.codes.shape[1])

    @functools.cached_property
    def items_per_type(self) -> np.ndarray:
        """`[num_types]` int64: the items of each entity type (counted once)."""
        return np.bincount(self.item_types, minlength=len(self.levels_per_type))

    def arrays(self) -> dict[str, np.ndarray]:
        """The array fields by name (what the store writes)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), np.ndarray)}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def children(self, node: int) -> np.ndarray:
        """Node ids of the children of `node` (sorted by code)."""
        return np.arange(self.child_start[node], self.child_start[node + 1], dtype=np.int32)

    def find_item(self, type_index: int, codes: Sequence[int]) -> int | None:
        """Catalog row of the item of type `type_index` with this full SID, or None."""
        lo, hi = int(self.child_start[ROOT]), int(self.child_start[ROOT + 1])
        root_types = self.node_type[lo:hi]  # sorted: the root's children are ordered by (type, code)
        lo, hi = lo + int(np.searchsorted(root_types, type_index)), lo + int(
            np.searchsorted(root_types, type_index, side="right"))
        node = ROOT
        for code in codes:
            pos = lo + int(np.searchsorted(self.node_code[lo:hi], code))
            if pos == hi or self.node_code[pos] != code:
                return None
            node = pos
            lo, hi = int(self.child_start[node]), int(self.child_start[node + 1])
        if node == ROOT or lo != hi:
            return None  # an empty SID, or a proper prefix of longer SIDs
        return int(self.item_order[self.subtree_lo[node]])


def _check_inputs(codes: np.ndarray, item_types: np.ndarray, levels_per_type: Sequence[int]) -> np.ndarray:
    """Validate the builder's inputs; return each item's depth `[n_items]`."""
    if codes.ndim != 2:
        raise UserError(f"SID codes must be a 2-D array [n_items, max_levels], got shape {codes.shape}")
    n_items, max_levels = codes.shape
    if n_items == 0:
        raise UserError("cannot build a SID trie for an empty catalog (no items)")
    if item_types.shape != (n_items,):
        raise UserError(f"item_types has shape {item_types.shape}; expected ({n_items},), one type per item")
    depths = np.asarray(levels_per_type, dtype=np.int64)
    if depths.ndim != 1 or depths.size == 0 or depths.min() < 1:
        raise UserError(f"levels_per_type must list a depth >= 1 for every entity type, got {list(levels_per_type)}")
    if depths.size > _INT8_MAX or depths.max() > _INT8_MAX:
        raise UserError(f"at most {_INT8_MAX} entity types and levels are supported, got {list(levels_per_type)}")
    if max_levels != depths.max():
        raise UserError(f"SID codes have {max_levels} columns but the deepest type has {depths.max()} levels")
    if item_types.min() < 0 or item_types.max() >= depths.size:
        bad = int(np.flatnonzero((item_types < 0) | (item_types >= depths.size))[0])
        raise UserError(f"item row {bad} has entity type {item_types[bad]}; valid types are 0..{depths.size - 1}")
    item_depth = depths.astype(np.int8)[item_types]  # [n_items]
    bad = np.zeros(n_items, dtype=bool)  # [n_items]
    for level in range(max_levels):  # codes >= 0 inside each item's depth, -1 after it
        column = codes[:, level]  # [n_items]
        bad |= np.where(item_depth > level, column < 0, column != -1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise UserError(f"item row {row} has SID codes {codes[row].tolist()}: codes must be >= 0 for the "
                        f"{item_depth[row]} levels of its type and -1 after them")
    return item_depth


def _check_distinct(prefix_changed: np.ndarray, item_order: np.ndarray, sorted_types: np.ndarray) -> None:
    """After the last level, a row that starts no new prefix repeats the previous row's SID."""
    repeats = np.flatnonzero(~prefix_changed)
    if repeats.size:
        k = int(repeats[0])
        raise UserError(f"item rows {int(item_order[k - 1])} and {int(item_order[k])} of entity type "
                        f"{int(sorted_types[k])} have the same SID; resolve collisions before building the trie")


def _join_levels(head: int, parts: list[np.ndarray], dtype) -> np.ndarray:
    """`[head, *parts]` as one array; pops `parts` as it copies so each piece is freed early."""
    joined = np.empty(1 + sum(p.size for p in parts), dtype)  # [1 + total size]
    joined[0] = head
    position = 1
    while parts:
        part = parts.pop(0)
        joined[position: position + part.size] = part
        position += part.size
    return joined


def build_trie(codes, item_types, levels_per_type: Sequence[int]) -> SidTrie:
    """Build the trie of the given SIDs.

    `codes` `[n_items, max_levels]` int: level-local codes, -1 past each type's depth.
    `item_types` `[n_items]` int: entity type index per item.
    `levels_per_type[t]`: SID depth of type t. Full SIDs must be distinct within a type.
    """
    codes = np.ascontiguousarray(codes, dtype=np.int32)
    item_types = np.ascontiguousarray(item_types, dtype=np.int32)
    item_depth = _check_inputs(codes, item_types, levels_per_type)
    n_items, max_levels = codes.shape

    # Trie (DFS) order = sort by type, then codes lexicographically (lexsort's last key is primary).
    item_order = np.lexsort([codes[:, level] for level in reversed(range(max_levels))] + [item_types])
    item_order = item_order.astype(np.int32)  # [n_items]
    sorted_types = item_types[item_order]  # [n_items]
    sorted_depth = item_depth[item_order]  # [n_items]

    # prefix_changed[i]: row i starts a new (type, codes[:level+1]) prefix vs row i-1.
    prefix_changed = np.ones(n_items, dtype=bool)  # [n_items]
    prefix_changed[1:] = sorted_types[1:] != sorted_types[:-1]

    level_code, level_type, level_lo, level_hi, child_counts = [], [], [], [], []
    parent_of_row = np.zeros(n_items, dtype=np.int32)  # [n_items] index of the row's node in its level
    for level in range(max_levels):
        sorted_codes = codes[item_order, level]  # [n_items]
        prefix_changed[1:] |= sorted_codes[1:] != sorted_codes[:-1]
        boundaries = np.flatnonzero(prefix_changed).astype(np.int32)  # [n_prefixes] rows starting a prefix
        ends = np.append(boundaries[1:], np.int32(n_items))  # [n_prefixes]
        has_level = sorted_depth[boundaries] > level  # [n_prefixes] prefixes that are real nodes
        starts = boundaries[has_level]  # [n_level_nodes]
        level_code.append(sorted_codes[starts])
        level_type.append(sorted_types[starts].astype(np.int8))
        level_lo.append(starts)
        level_hi.append(ends[has_level])
        # Each new node's parent is the node of the previous level holding its first row.
        if level == 0:
            child_counts.append(np.array([starts.size], dtype=np.int32))  # the root's children
        else:
            parents = parent_of_row[starts]  # [n_level_nodes]
            child_counts.append(np.bincount(parents, minlength=level_lo[-2].size).astype(np.int32))
        del sorted_codes, boundaries, ends, has_level
        starts_node = np.zeros(n_items, dtype=bool)  # [n_items]
        starts_node[starts] = True
        # Rows past their type's depth inherit a neighbour's index; no deeper node reads them.
        parent_of_row = np.cumsum(starts_node, dtype=np.int32) - 1  # [n_items]
    child_counts.append(np.zeros(level_lo[-1].size, dtype=np.int32))  # the deepest level has no children
    _check_distinct(prefix_changed, item_order, sorted_types)
    del prefix_changed, parent_of_row, starts_node, sorted_types, sorted_depth

    node_level = [np.full(c.size, level, np.int8) for level, c in enumerate(level_code)]
    child_start = _join_levels(0, child_counts, np.int32)  # [num_nodes + 1]: 0, then each node's child count
    max_children = int(child_start.max())
    np.cumsum(child_start, out=child_start)
    child_start += 1  # the root's children start at node 1
    return SidTrie(
        codes=codes,
        item_types=item_types,
        levels_per_type=tuple(int(d) for d in levels_per_type),
        child_start=child_start,
        node_code=_join_levels(-1, level_code, np.int32),
        node_level=_join_levels(-1, node_level, np.int8),
        node_type=_join_levels(-1, level_type, np.int8),
        item_order=item_order,
        subtree_lo=_join_levels(0, level_lo, np.int32),
        subtree_hi=_join_levels(n_items, level_hi, np.int32),
        max_children=max_children,
    )


def node_tokens(trie: SidTrie, layout: VocabLayout) -> np.ndarray:
    """`[num_nodes]` int32 token id of the edge into each node under `layout` (root: -1).

    Token of node n = `layout.block_offset_table()[node_type[n], node_level[n]] + node_code[n]`.
    """
    declared = tuple(t.num_levels for t in layout.entity_types)
    if declared != trie.levels_per_type:
        raise UserError(f"the vocabulary layout gives levels per type {declared} but the SID trie has "
                        f"{trie.levels_per_type}; build both from the same SID configuration")
    sizes = np.zeros(layout.block_offset_table().shape, np.int64)  # [num_types, max_levels]
    for t, entity in enumerate(layout.entity_types):
        sizes[t, : entity.num_levels] = entity.codebook_sizes
    inner = slice(1, None)  # every node but the root
    types, levels, codes = (trie.node_type[inner].astype(np.int64), trie.node_level[inner].astype(np.int64),
                            trie.node_code[inner])
    too_big = np.flatnonzero(codes >= sizes[types, levels])
    if too_big.size:
        n = int(too_big[0]) + 1
        raise UserError(f"trie node {n} has code {trie.node_code[n]} at level {trie.node_level[n]} of type "
                        f"{layout.entity_types[trie.node_type[n]].name!r}, outside its codebook of "
                        f"{sizes[types[n - 1], levels[n - 1]]}")
    tokens = np.full(trie.num_nodes, -1, np.int32)  # [num_nodes]
    tokens[inner] = layout.block_offset_table()[types, levels] + codes
    return tokens


@dataclasses.dataclass(frozen=True)
class SidTokenIndex:
    """Host-side lookup from SIDs written as code tokens to catalog rows, vectorised over a whole batch
    of beams (one `searchsorted` per level) where `SidTrie.find_item` walks one SID at a time."""

    child_keys: np.ndarray  # [num_nodes - 1] int64 sorted: parent * stride + token of each non-root node
    child_nodes: np.ndarray  # [num_nodes - 1] int64 node id of each key
    leaf_rows: np.ndarray  # [num_nodes] int64 catalog row of each leaf, -1 for the root and inner nodes
    stride: int  # above every token id

    @classmethod
    def build(cls, trie: SidTrie, layout: VocabLayout) -> "SidTokenIndex":
        tokens = node_tokens(trie, layout).astype(np.int64)  # [num_nodes]
        parents = np.repeat(np.arange(trie.num_nodes, dtype=np.int64), np.diff(trie.child_start))  # [num_nodes - 1]
        stride = layout.size + 1
        keys = parents * stride + tokens[1:]  # [num_nodes - 1]
        order = np.argsort(keys, kind="stable")
        is_leaf = np.diff(trie.child_start) == 0  # [num_nodes]
        is_leaf[0] = False
        leaf_rows = np.where(is_leaf, trie.item_order[np.minimum(trie.subtree_lo, trie.n_items - 1)], -1)
        return cls(keys[order], order.astype(np.int64) + 1, leaf_rows.astype(np.int64), stride)

    def rows(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """`[...]` catalog row of the SID each `tokens[..., :lengths]` spells (its code tokens, no
        `[SID]` markers); -1 where no item has that SID (unknown token, a proper prefix, empty)."""
        node = np.zeros(lengths.shape, np.int64)  # [...] trie node reached, 0 = root
        found = lengths > 0  # [...]
        for level in range(tokens.shape[-1]):
            walking = found & (level < lengths)  # [...]
            key = node * self.stride + tokens[..., level]  # [...]
            at = np.minimum(np.searchsorted(self.child_keys, key), self.child_keys.size - 1)  # [...]
            hit = self.child_keys[at] == key  # [...]
            found &= hit | ~walking
            node = np.where(walking & hit, self.child_nodes[at], node)
        return np.where(found, self.leaf_rows[node], -1)
