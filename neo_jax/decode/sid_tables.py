"""The SID trie as decoder tables: for every inner node, a bitmap of its children's codes.

The decoder never lists a node's children. Below the root, all children of a node are codes of
one SID block of the vocabulary (one entity type, one level), so a bitmap of uint32 words per
node (bit c set iff the node has a child of code c; as many words as that block's codebook
needs, so a node above a narrow disambiguation level takes one word, not the widest block's)
says which tokens may follow, and the rank of a code among the set bits (a popcount) says which
child it leads to: CSR children are sorted by code, so child = `child_start[node] + rank`. A
step then costs a gather of one bitmap row per beam and elementwise work over the vocabulary,
whatever the catalog size and however wide the trie's nodes. The root's children span the
level-0 blocks of every type; requests turn them into a per-request token mask once
(`root_token`, `root_type`), and `root_child` maps a level-0 token back to its node.

Bitmap rows exist for node ids up to the last inner node, plus one trailing empty row that
every larger id (a leaf) reads; leaves and the root have no words and `child_block` -1. The rows
lie end to end in one flat array (`bits_start`), and a read takes `words` (the widest row's
count) from a row's start, the words past its own zeroed.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neo_jax.catalog.table import ROOT, SidTrie, node_tokens
from neo_jax.errors import UserError
from neo_jax.vocab import VocabLayout

WORD_BITS = 32


@flax.struct.dataclass
class SidTables:
    """The trie on device, shared by every request."""

    child_start: jax.Array  # [num_nodes + 1] int32: children of n are child_start[n] .. child_start[n+1]-1
    child_bits: jax.Array  # [bitmap_words + words] uint32: the rows end to end, then `words` zeros
    bits_start: jax.Array  # [bitmap_rows + 1] int32: row n is child_bits[bits_start[n] : bits_start[n + 1]]
    child_block: jax.Array  # [bitmap_rows] int32: SID block of node n's children (-1: root or leaf)
    node_code: jax.Array  # [num_nodes] int32: code of the edge into the node (root: -1)
    subtree_lo: jax.Array  # [num_nodes] int32: first trie-order item position under the node
    subtree_hi: jax.Array  # [num_nodes] int32: one past the last
    item_row: jax.Array  # [n_items] int32: catalog row of each trie-order item position
    root_token: jax.Array  # [root_children] int32: token id of each child of the root (nodes 1, 2, ...)
    root_type: jax.Array  # [root_children] int32: its entity type
    root_child: jax.Array  # [sid_tokens] int32: node a SID token names right after `[SID]` (-1: none)
    block_sizes: tuple[int, ...] = flax.struct.field(pytree_node=False)  # codebook size of each SID block
    block_offsets: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)  # [type][level] first id
    sid_start: int = flax.struct.field(pytree_node=False)  # first SID token id
    words: int = flax.struct.field(pytree_node=False)  # the widest row's words: what a read takes
    # The mesh the tables are whole on every device of (`pin`); None: the default device.
    mesh: Mesh | None = flax.struct.field(pytree_node=False, default=None)

    @classmethod
    def from_trie(cls, trie: SidTrie, layout: VocabLayout, mesh: Mesh | None = None) -> "SidTables":
        """The tables on the default device, or with `mesh` replicated on every device of it once,
        so a decode over the mesh reads them locally instead of copying them in at every call."""
        placement = None if mesh is None else NamedSharding(mesh, PartitionSpec())
        put = lambda array: jax.device_put(np.asarray(array), placement)  # noqa: E731
        tokens = node_tokens(trie, layout)  # [num_nodes]; also checks the layout matches the trie
        block_sizes = tuple(int(s) for t in layout.entity_types for s in t.codebook_sizes)
        child_bits, bits_start, child_block = _bitmaps(trie, block_sizes)
        root_children = np.arange(1, trie.child_start[ROOT + 1])  # [root_children]
        root_child = np.full(layout.sid_end - layout.sid_start, -1, np.int32)  # [sid_tokens]
        root_child[tokens[root_children] - layout.sid_start] = root_children
        return cls(
            child_start=put(np.asarray(trie.child_start, np.int32)),
            child_bits=put(child_bits),
            bits_start=put(bits_start),
            child_block=put(child_block),
            node_code=put(np.asarray(trie.node_code, np.int32)),
            subtree_lo=put(np.asarray(trie.subtree_lo, np.int32)),
            subtree_hi=put(np.asarray(trie.subtree_hi, np.int32)),
            item_row=put(np.asarray(trie.item_order, np.int32)),
            root_token=put(np.asarray(tokens[root_children], np.int32)),
            root_type=put(np.asarray(trie.node_type[root_children], np.int32)),
            root_child=put(root_child),
            block_sizes=block_sizes,
            block_offsets=tuple(tuple(row) for row in layout.block_offsets()),
            sid_start=layout.sid_start,
            words=-(-max(block_sizes) // WORD_BITS),
            mesh=mesh,
        )

    def pin(self, x: jax.Array) -> jax.Array:
        """`x` `[..., n]`, read from the tables (bitmap words, a vocabulary mask), with its last axis whole on
        every device of the mesh; the leading (batch, beam) axes split as the batch is. Unchanged without
        a mesh. XLA's sharding propagation would otherwise split the tables' words like the
        vocabulary-sharded logits the mask meets: a slice of every table at each call (bytes growing with
        the catalog) and collectives at each step, where a local lookup costs nothing."""
        if self.mesh is None:
            return x
        spec = PartitionSpec(*[PartitionSpec.UNCONSTRAINED] * (x.ndim - 1), None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

    def row(self, node: jax.Array) -> jax.Array:
        """Bitmap row of each node: its own below the last inner node, the empty row past it."""
        return jnp.minimum(node, self.child_block.shape[0] - 1)

    def row_bits(self, child_bits: jax.Array, row: jax.Array) -> jax.Array:
        """`[...]` rows -> `[..., words]` uint32: each row's words from `child_bits` (these tables', or a
        subset's of the same layout), zero past the row's own."""
        offsets = jnp.arange(self.words, dtype=jnp.int32)  # [words]
        start = self.bits_start[row][..., None]  # [..., 1]
        own = offsets < self.bits_start[row + 1][..., None] - start  # [..., words]
        return self.pin(jnp.where(own, child_bits[start + offsets], jnp.uint32(0)))

    def is_leaf(self, node: jax.Array) -> jax.Array:
        """`[...]` bool: the node is an item (not the root, no children)."""
        return (node != ROOT) & (self.child_block[self.row(node)] < 0)

    def leaf_row(self, node: jax.Array) -> jax.Array:
        """`[...]` int32 catalog row of each leaf node (meaningless for other nodes)."""
        return self.item_row[jnp.clip(self.subtree_lo[node], 0, self.item_row.shape[0] - 1)]

    def child_code(self, node: jax.Array, token: jax.Array) -> jax.Array:
        """The code a SID `token` stands for below `node` (`[...]` int32 each; meaningless at the root)."""
        block_start = jnp.asarray([o for offsets in self.block_offsets for o in offsets], jnp.int32)  # [blocks]
        return token - block_start[jnp.maximum(self.child_block[self.row(node)], 0)]  # [...]

    def child(self, node: jax.Array, token: jax.Array) -> jax.Array:
        """The child of `node` along the SID `token` it allowed (`[...]` int32 each)."""
        row = self.row(node)  # [...]
        code = self.child_code(node, token)  # [...]
        below = code_bits_below(code, self.words)  # [..., words]
        bits = self.row_bits(self.child_bits, row)  # [..., words]
        rank = jnp.sum(jax.lax.population_count(bits & below), axis=-1, dtype=jnp.int32)  # [...]
        sid_index = jnp.clip(token - self.sid_start, 0, self.root_child.shape[0] - 1)  # [...]
        child = jnp.where(node == ROOT, self.root_child[sid_index], self.child_start[node] + rank)  # [...]
        return jnp.maximum(child, ROOT)  # a token no live beam could take leads back to the root


def code_bits_below(code: jax.Array, words: int) -> jax.Array:
    """`[...]` codes -> `[..., words]` uint32 masks of the bits of every smaller code."""
    word_index = jnp.arange(words, dtype=jnp.int32)  # [words]
    code = code[..., None]  # [..., 1]
    partial = (jnp.uint32(1) << (code % WORD_BITS).astype(jnp.uint32)) - jnp.uint32(1)  # [..., 1]
    full = jnp.uint32(0xFFFFFFFF)
    return jnp.where(word_index < code // WORD_BITS, full,
                     jnp.where(word_index == code // WORD_BITS, partial, jnp.uint32(0)))


def expand_bits(bits: jax.Array) -> jax.Array:
    """`[..., words]` uint32 -> `[..., words * 32]` bool, bit c of the bitmap at position c."""
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)  # [32]
    flags = ((bits[..., None] >> shifts) & jnp.uint32(1)).astype(bool)  # [..., words, 32]
    return flags.reshape(bits.shape[:-1] + (bits.shape[-1] * WORD_BITS,))


def _bitmaps(trie: SidTrie, block_sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host build of `child_bits [bitmap_words + words]` uint32, `bits_start [rows + 1]` int32 and
    `child_block [rows]` int32 (vectorised numpy)."""
    child_counts = np.diff(trie.child_start)  # [num_nodes]
    inner = np.flatnonzero(child_counts > 0)  # [inner_nodes], ascending
    rows = int(inner[-1]) + 2  # every node up to the last inner one, then the empty row
    offsets = np.cumsum([0] + list(trie.levels_per_type))  # block of (type t, level l) = offsets[t] + l
    child_block = np.full(rows, -1, np.int32)  # [rows]
    below_root = inner[inner != ROOT]
    child_block[below_root] = (offsets[trie.node_type[below_root]] + trie.node_level[below_root] + 1)
    block_words = -(-np.asarray(block_sizes, np.int64) // WORD_BITS)  # [blocks]
    row_words = np.where(child_block >= 0, block_words[np.maximum(child_block, 0)], 0)  # [rows]
    bits_start = np.concatenate([[0], np.cumsum(row_words)])  # [rows + 1]
    if bits_start[-1] >= np.iinfo(np.int32).max:
        raise UserError(f"the trie's bitmaps need {bits_start[-1]} words, past int32 offsets; split the catalog")
    words = int(block_words.max())
    child_bits = np.zeros(int(bits_start[-1]) + words, np.uint32)  # [bitmap_words + words]
    children = np.arange(trie.child_start[ROOT + 1], trie.num_nodes)  # [below]: the nodes below level 0
    parents = np.repeat(np.arange(trie.num_nodes, dtype=np.int64), child_counts)[children - 1]  # [...]
    codes = trie.node_code[children].astype(np.int64)  # [...]
    slots = bits_start[parents] + codes // WORD_BITS  # [...], nondecreasing (children sorted by code)
    values = np.left_shift(np.uint32(1), (codes % WORD_BITS).astype(np.uint32))  # [...]
    if slots.size:  # some SID has more than one level
        starts = np.flatnonzero(np.r_[True, slots[1:] != slots[:-1]])  # first child of each (parent, word)
        # Children of one (parent, word) set distinct bits, so their sum is their OR.
        child_bits[slots[starts]] = np.add.reduceat(values, starts, dtype=np.uint32)
    return child_bits, bits_start.astype(np.int32), child_block
