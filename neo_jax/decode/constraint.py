"""The SID constraint as device arrays: which tokens each beam may take next, and how its state moves.

A constraint is a pytree with four methods the decoding loops call every step:
- `init_state(batch, beams)`: the per-beam state, leaves `[batch, beams, ...]`;
- `allowed(state, vocab_size) -> mask`: bool, broadcastable to `[batch, beams, vocab]`;
- `advance(state, tokens [batch, beams]) -> state`: the state after taking `tokens`;
- `complete(state) -> [batch, beams] bool`: the sequence is finished without an EOS (all that
  could follow is forced).
A beam search gathers the state by parent beam before `advance`, exactly as it gathers the KV
cache. `Unconstrained` is the no-op (only the vocabulary's padding rows are masked), so
constrained and unconstrained decoding run the same loop.

`SidConstraint` walks the trie through the bitmaps of `neo_jax.decode.sid_tables`. Per beam it
keeps `in_span` (inside `[SID] ... [/SID]`) and `node` (the trie node reached; outside a span,
the leaf of the last item closed, or 0 before any). Per request it holds the output format
(`text`: no SIDs; `mixed`: text and SIDs; `ids`: one SID then EOS), the tokens allowed right
after `[SID]` (the level-0 codes of allowed types that still hold an allowed item) and, when it
restricts items, which children lost every item. With `ids_codes_only`, an ID-mode request
decodes just its item's codes: its prompt ends with `[SID]` (the loop starts inside the span)
and its sequences are complete at a leaf, since `[/SID]` and EOS are forced there; ranking is
then by the codes' probability alone, and decoding takes `levels` model steps, not
`levels + 3`. A step costs one bitmap row per beam and
elementwise work over the vocabulary, whatever the catalog size. A child is allowed iff its
subtree still holds an allowed item, so a restricted catalog never leaves a beam in a dead end.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
from typing import Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.catalog.table import ROOT, SidTrie
from neo_jax.decode.sid_tables import WORD_BITS, SidTables, expand_bits
from neo_jax.decode.state import PyTree
from neo_jax.errors import UserError
from neo_jax.vocab import VocabLayout

_NO_ITEM = np.iinfo(np.int32).max  # padding of the sorted excluded-position lists


class Constraint(Protocol):
    def init_state(self, batch: int, beams: int) -> PyTree: ...

    def allowed(self, state: PyTree, vocab_size: int) -> jax.Array: ...

    def advance(self, state: PyTree, tokens: jax.Array) -> PyTree: ...

    def complete(self, state: PyTree) -> jax.Array: ...

    def item_ids(self, state: PyTree, tokens: jax.Array) -> jax.Array: ...


class OutputFormat(enum.IntEnum):
    """What may appear outside SID spans: only SIDs, only text, or both."""

    IDS = 0
    TEXT = 1
    MIXED = 2

    @classmethod
    def parse(cls, name: str) -> "OutputFormat":
        try:
            return cls[name.upper()]
        except KeyError:
            raise UserError(f"unknown output format {name!r}; choose one of "
                            f"{[f.name.lower() for f in cls]}") from None


@flax.struct.dataclass
class Unconstrained:
    """The no-op constraint: every real token is allowed (padding rows of the vocabulary are not)."""

    vocab_limit: int = flax.struct.field(pytree_node=False)  # layout.size: ids at or past it are padding

    def init_state(self, batch: int, beams: int) -> tuple:
        return ()

    def allowed(self, state: tuple, vocab_size: int) -> jax.Array:
        return jnp.arange(vocab_size) < self.vocab_limit  # [vocab]

    def advance(self, state: tuple, tokens: jax.Array) -> tuple:
        return state

    def complete(self, state: tuple) -> jax.Array:
        return jnp.zeros((), bool)

    def item_ids(self, state: tuple, tokens: jax.Array) -> jax.Array:
        """No trie, so no item is known to close: unconstrained decoding feeds no item identity."""
        return jnp.zeros(tokens.shape, jnp.int32)


@flax.struct.dataclass
class SidRequests:
    """Per-request constants of the SID constraint."""

    output_format: jax.Array  # [batch] int32 (OutputFormat)
    root_mask: jax.Array  # [batch, sid_tokens] bool: SID tokens allowed right after `[SID]`
    has_items: jax.Array  # [batch] bool: at least one allowed item exists, so `[SID]` leads somewhere
    child_bits: jax.Array | None  # like `SidTables.child_bits`, less the children with no allowed item
    dead_parent: jax.Array | None  # [batch, dead] int32: a node one of whose children lost every item (-1: none)
    dead_code: jax.Array | None  # [batch, dead] int32: that child's code

    @classmethod
    def create(cls, tables: SidTables, allowed_types: jax.Array, output_format: jax.Array,
               excluded: jax.Array | None = None, excluded_tokens: jax.Array | None = None,
               allowed_prefix: jax.Array | None = None) -> "SidRequests":
        """Device-side setup (traceable).

        `allowed_types` `[batch, num_types]` bool; `output_format` `[batch]` int32;
        `excluded` `[batch, max_excluded]` int32 sorted distinct trie positions of items the
        request may not name, `_NO_ITEM` padding, and `excluded_tokens` `[batch, max_excluded,
        max_levels]` int32 their SID tokens (-1 past an item's depth and in padding);
        `allowed_prefix` `[n_items + 1]` int32: an allowed-items subset's (`ItemSubset.prefix`); its
        bitmaps (`child_bits`) are the caller's to attach, so the subset's arrays never pass through here.
        """

        def item_count(node: jax.Array) -> jax.Array:
            """Items each request may still name under each node: `[batch, n]` -> `[batch, n]`."""
            lo, hi = tables.subtree_lo[node], tables.subtree_hi[node]  # [batch, n]
            count = hi - lo if allowed_prefix is None else allowed_prefix[hi] - allowed_prefix[lo]
            if excluded is not None:
                below = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side="left"))
                count = count - (below(excluded, hi) - below(excluded, lo))  # [batch, n]
            return count

        batch = output_format.shape[0]
        num_root_children = tables.root_token.shape[0]
        root_children = jnp.broadcast_to(1 + jnp.arange(num_root_children), (batch, num_root_children))
        root_ok = allowed_types[:, tables.root_type] & (item_count(root_children) > 0)  # [batch, root_children]
        sid_tokens = tables.root_child.shape[0]
        root_mask = jnp.zeros((batch, sid_tokens), bool).at[:, tables.root_token - tables.sid_start].set(
            root_ok, mode="drop")  # [batch, sid_tokens]

        dead_parent = dead_code = None
        if excluded_tokens is not None and excluded_tokens.shape[-1] > 1:
            dead_parent, dead_code = _dead_children(tables, excluded_tokens, item_count)
        return cls(output_format=output_format.astype(jnp.int32), root_mask=root_mask,
                   has_items=jnp.any(root_mask, axis=1), child_bits=None,
                   dead_parent=dead_parent, dead_code=dead_code)

    def cleared_bits(self, node: jax.Array, words: int) -> jax.Array:
        """Bits of the children with no item left for the request: `[batch, beams]` -> `[batch, beams, words]`."""
        match = self.dead_parent[:, None, :] == node[:, :, None]  # [batch, beams, dead]
        word = (self.dead_code // WORD_BITS)[:, None, :, None]  # [batch, 1, dead, 1]
        bit = (jnp.uint32(1) << (self.dead_code % WORD_BITS).astype(jnp.uint32))[:, None, :, None]
        hit = match[..., None] & (word == jnp.arange(words))  # [batch, beams, dead, words]
        return jax.lax.reduce(jnp.where(hit, bit, jnp.uint32(0)), jnp.uint32(0), jax.lax.bitwise_or, (2,))


def _dead_children(tables: SidTables, excluded_tokens: jax.Array, item_count) -> tuple[jax.Array, jax.Array]:
    """Walk each excluded item's path below the root; a node on it with no item left is dead.

    Returns `(parent, code)` `[batch, max_excluded * (max_levels - 1)]` int32 of each dead node
    below level 0 (parent -1 where the node is alive or absent); level 0 is the root mask's.
    """
    tokens, max_levels = excluded_tokens, excluded_tokens.shape[-1]  # [batch, max_excluded, max_levels]
    parents, codes = [], []
    node = tables.child(jnp.zeros(tokens.shape[:2], jnp.int32), tokens[..., 0])  # [batch, max_excluded]
    for level in range(1, max_levels):
        token = tokens[..., level]  # [batch, max_excluded]
        child = tables.child(node, token)  # [batch, max_excluded]
        present = token >= 0
        dead = present & (item_count(child) <= 0)  # [batch, max_excluded]
        parents.append(jnp.where(dead, node, -1))
        codes.append(tables.child_code(node, token))
        node = child
    return jnp.concatenate(parents, axis=1), jnp.concatenate(codes, axis=1)


def _restricted_bits(tables: SidTables, allowed_prefix: jax.Array) -> jax.Array:
    """The tables' bitmaps (same layout) keeping only children whose subtree holds an allowed item."""
    num_nodes = tables.node_code.shape[0]
    nodes = jnp.arange(1, num_nodes, dtype=jnp.int32)  # [n]: every node but the root
    parent = jnp.searchsorted(tables.child_start, nodes, side="right").astype(jnp.int32) - 1  # [n]
    available = allowed_prefix[tables.subtree_hi[nodes]] > allowed_prefix[tables.subtree_lo[nodes]]
    code = tables.node_code[nodes]  # [n]
    bit = jnp.where(available, jnp.uint32(1) << (code % WORD_BITS).astype(jnp.uint32), jnp.uint32(0))
    # The children of one (parent, word) set distinct bits, so adding them ORs them. The root has no
    # words (requests mask its children), so its children's bits are dropped.
    words = tables.child_bits.shape[0]
    slot = jnp.where(parent == ROOT, words, tables.bits_start[parent] + code // WORD_BITS)  # [n]
    return jnp.zeros_like(tables.child_bits).at[slot].add(bit, mode="drop")


_create_requests = jax.jit(SidRequests.create)


@flax.struct.dataclass
class ItemSubset:
    """An allowed-items subset (in stock) on the device, built once (`ItemSubsets`) and read by every
    request batch that names it: the per-node scatter of its bitmaps runs once per subset, not per call."""

    prefix: jax.Array  # [n_items + 1] int32: allowed items among the first k in trie order
    child_bits: jax.Array  # like `SidTables.child_bits`, less the children with no allowed item

    @classmethod
    def create(cls, tables: SidTables, allowed_items: jax.Array) -> "ItemSubset":
        """`allowed_items` `[n_items]` bool over trie order (traceable)."""
        prefix = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(allowed_items.astype(jnp.int32),
                                                                       dtype=jnp.int32)])
        return cls(prefix=prefix, child_bits=_restricted_bits(tables, prefix))


_create_subset = jax.jit(ItemSubset.create)


@dataclasses.dataclass(frozen=True)
class CachedSubset:
    """An `ItemSubset` with what the host checks of each request need of it, computed once."""

    device: ItemSubset
    items_per_type: np.ndarray  # [num_types] int64: the subset's items of each entity type


class ItemSubsets:
    """The allowed-items subsets seen so far, each on the device once, keyed by the mask's content
    (a digest of its packed bits: about 1.3 ms at 10M items); the `capacity` most recently used are
    kept. A read-only mask given again (the same array, so the same content) is not digested again."""

    def __init__(self, trie: SidTrie, tables: SidTables, capacity: int = 8):
        self.trie, self.tables, self.capacity = trie, tables, capacity
        self._subsets: collections.OrderedDict[bytes, CachedSubset] = collections.OrderedDict()
        self._last_read_only: tuple[np.ndarray, bytes] | None = None  # (mask, its digest)
        self.built = 0  # subsets computed on the device (the rest were reused)

    def _key(self, allowed_rows: np.ndarray) -> bytes:
        if self._last_read_only is not None and self._last_read_only[0] is allowed_rows:
            return self._last_read_only[1]
        key = hashlib.sha1(np.packbits(allowed_rows).tobytes()).digest()
        if not allowed_rows.flags.writeable:
            self._last_read_only = (allowed_rows, key)
        return key

    def get(self, allowed_rows: np.ndarray) -> CachedSubset:
        """The subset of `allowed_rows` `[n_items]` bool over catalog rows."""
        key = self._key(allowed_rows)
        if key in self._subsets:
            self._subsets.move_to_end(key)
            return self._subsets[key]
        num_types = len(self.trie.levels_per_type)
        subset = CachedSubset(_create_subset(self.tables, jnp.asarray(allowed_rows[self.trie.item_order])),
                              np.bincount(self.trie.item_types[allowed_rows], minlength=num_types))
        self.built += 1
        self._subsets[key] = subset
        if len(self._subsets) > self.capacity:
            self._subsets.popitem(last=False)
        return subset


@flax.struct.dataclass
class SidState:
    """Per-beam constraint state, gathered with the beams."""

    in_span: jax.Array  # [batch, beams] bool: between `[SID]` and `[/SID]`
    node: jax.Array  # [batch, beams] int32: trie node reached (outside: last closed leaf, 0 before any)


@flax.struct.dataclass
class SidConstraint:
    tables: SidTables
    requests: SidRequests
    text_size: int = flax.struct.field(pytree_node=False)  # ids below it are text
    sid_open: int = flax.struct.field(pytree_node=False)
    sid_close: int = flax.struct.field(pytree_node=False)
    eos_id: int = flax.struct.field(pytree_node=False)
    ids_codes_only: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, tables: SidTables, requests: SidRequests, layout: VocabLayout, eos_id: int,
               ids_codes_only: bool = False) -> "SidConstraint":
        if not 0 <= eos_id < layout.text_size:
            raise UserError(f"EOS id {eos_id} is not a text token of the vocabulary (0..{layout.text_size - 1})")
        return cls(tables=tables, requests=requests, text_size=layout.text_size,
                   sid_open=layout.sid_open_id, sid_close=layout.sid_close_id, eos_id=int(eos_id),
                   ids_codes_only=ids_codes_only)

    def _codes_only(self) -> jax.Array:
        """`[batch, 1]` bool: the request decodes just its item's codes (see the module doc)."""
        return (self.requests.output_format[:, None] == OutputFormat.IDS) & self.ids_codes_only

    def init_state(self, batch: int, beams: int) -> SidState:
        in_span = jnp.broadcast_to(self._codes_only(), (batch, beams))  # [batch, beams]
        return SidState(in_span=in_span, node=jnp.zeros((batch, beams), jnp.int32))

    def complete(self, state: SidState) -> jax.Array:
        """`[batch, beams]`: a codes-only request whose SID reached a leaf."""
        return self._codes_only() & state.in_span & self.tables.is_leaf(state.node)

    def item_ids(self, state: SidState, tokens: jax.Array) -> jax.Array:
        """`[batch, beams]` int32: 1 + the catalog row of the item each beam's last token, a `[/SID]`,
        closed (`advance` leaves the closed leaf as the node), else 0 (`neo_jax.catalog.item_ids`)."""
        closed = (tokens == self.sid_close) & ~state.in_span & self.tables.is_leaf(state.node)
        return jnp.where(closed, self.tables.leaf_row(state.node) + 1, 0)

    def allowed(self, state: SidState, vocab_size: int) -> jax.Array:
        """Outside a span, by output format: `text`: text tokens (EOS among them); `mixed`: text and
        `[SID]`; `ids`: exactly one item, `[SID]` first and then EOS, so a request's beams are
        distinct items. Inside: the codes of the node's children that hold an allowed item, or
        `[/SID]` at a leaf. The mask is `[text | specials | SID blocks | padding]`, built by
        broadcasting per-beam flags against the vocabulary, with no scatter."""
        tables, requests = self.tables, self.requests
        sid_end = tables.sid_start + sum(tables.block_sizes)
        if vocab_size < sid_end:
            raise UserError(f"the model's vocabulary of {vocab_size} rows is smaller than the layout's {sid_end}")
        node, in_span = state.node, state.in_span  # [batch, beams]
        row = tables.row(node)  # [batch, beams]
        child_bits = tables.child_bits if requests.child_bits is None else requests.child_bits
        bits = tables.row_bits(child_bits, row)  # [batch, beams, words]
        if requests.dead_parent is not None:
            bits = bits & ~requests.cleared_bits(node, tables.words)
        block = tables.child_block[row]  # [batch, beams]
        code_ok = expand_bits(bits)  # [batch, beams, words * 32]
        below_root = jnp.concatenate([code_ok[..., :size] & (block == b)[..., None]
                                      for b, size in enumerate(tables.block_sizes)], axis=-1)  # [batch, beams, sid]
        at_root = node == ROOT  # [batch, beams]
        sid = jnp.where(at_root[..., None], requests.root_mask[:, None, :], below_root) & in_span[..., None]

        outside = ~in_span  # [batch, beams]
        output_format = requests.output_format[:, None]  # [batch, 1]
        has_items = requests.has_items[:, None]  # [batch, 1]
        id_mode = output_format == OutputFormat.IDS  # [batch, 1]
        names_item_next = id_mode & has_items & at_root  # [batch, beams]: ID mode, no item yet
        open_ok = outside & has_items & ((output_format == OutputFormat.MIXED) | names_item_next)
        eos_ok = outside & ~names_item_next  # [batch, beams]
        text_ok = outside & ~id_mode  # [batch, beams]
        close_ok = in_span & ~at_root & (block < 0)  # [batch, beams]: at a leaf
        text_ids = jnp.arange(self.text_size)  # [text]
        text = text_ok[..., None] | ((text_ids == self.eos_id) & eos_ok[..., None])  # [batch, beams, text]
        special_ids = jnp.arange(self.text_size, tables.sid_start)  # [specials]
        specials = (((special_ids == self.sid_open) & open_ok[..., None])
                    | ((special_ids == self.sid_close) & close_ok[..., None]))  # [batch, beams, specials]
        padding = jnp.zeros(node.shape + (vocab_size - sid_end,), bool)  # [batch, beams, padding]
        return tables.pin(jnp.concatenate([text, specials, sid, padding], axis=-1))  # [batch, beams, vocab]

    def advance(self, state: SidState, tokens: jax.Array) -> SidState:
        child = self.tables.child(state.node, tokens)  # [batch, beams]
        opened = ~state.in_span & (tokens == self.sid_open)  # [batch, beams]
        stepped = state.in_span & (tokens != self.sid_close)  # [batch, beams]
        node = jnp.where(opened, ROOT, jnp.where(stepped, child, state.node))  # [batch, beams]
        return SidState(in_span=opened | stepped, node=node)


def sid_requests(trie: SidTrie, layout: VocabLayout, tables: SidTables, *,
                 entity_types: Sequence[Sequence[str] | None], output_formats: Sequence[str], beam_size: int,
                 excluded_rows: Sequence[Sequence[int]] | None = None, max_excluded: int | None = None,
                 allowed_rows: np.ndarray | None = None, subsets: ItemSubsets | None = None) -> SidRequests:
    """Check a batch of user requests on the host and set them up on device.

    `entity_types[b]`: type names request b may name (None: every type); `output_formats[b]`:
    `ids`, `text` or `mixed`; `excluded_rows[b]`: catalog rows request b must not name (its
    history), padded to `max_excluded` entries if given (a fixed width keeps one compiled decoder
    across batches); `allowed_rows` `[n_items]` bool over catalog rows (in stock), shared by the batch,
    its device side taken from `subsets` when given (built once per subset), else built for this call.
    In ID mode each of the `beam_size` beams names a distinct item, so the allowed items must
    number at least `beam_size`.
    """
    batch = len(output_formats)
    if len(entity_types) != batch or (excluded_rows is not None and len(excluded_rows) != batch):
        raise UserError(f"{batch} output formats but {len(entity_types)} entity-type lists"
                        + ("" if excluded_rows is None else f" and {len(excluded_rows)} exclusion lists"))
    formats = np.array([OutputFormat.parse(f) for f in output_formats], np.int32)  # [batch]
    num_types = len(trie.levels_per_type)
    allowed_types = np.zeros((batch, num_types), bool)  # [batch, num_types]
    for b, names in enumerate(entity_types):
        if names is None:
            allowed_types[b] = True
            continue
        if not names:
            raise UserError(f"request {b}: the list of entity types is empty")
        for name in names:
            try:
                allowed_types[b, layout.type_index(name)] = True
            except UserError as e:
                raise UserError(f"request {b}: {e}") from None

    if allowed_rows is not None:
        allowed_rows = np.asarray(allowed_rows)
        if allowed_rows.dtype != bool or allowed_rows.shape != (trie.n_items,):
            raise UserError(f"the allowed-items mask must be bool [{trie.n_items}] over catalog rows, "
                            f"got {allowed_rows.dtype} {list(allowed_rows.shape)}")
    subset = None
    if allowed_rows is not None:
        subset = (subsets if subsets is not None else ItemSubsets(trie, tables)).get(allowed_rows)
    # [batch, max_excluded] catalog rows, -1 padding
    excluded = None if excluded_rows is None else _padded_rows(excluded_rows, trie.n_items, max_excluded)
    items_per_type = trie.items_per_type if subset is None else subset.items_per_type  # [num_types]
    _check_enough_items(trie, layout, formats, allowed_types, excluded, allowed_rows, items_per_type, beam_size)
    positions = tokens = None
    if excluded is not None:
        positions, tokens = _excluded_items(trie, layout, excluded, allowed_rows)
    requests = _create_requests(tables, jnp.asarray(allowed_types), jnp.asarray(formats),
                                None if positions is None else jnp.asarray(positions),
                                None if tokens is None else jnp.asarray(tokens),
                                None if subset is None else subset.device.prefix)
    return requests if subset is None else requests.replace(child_bits=subset.device.child_bits)


def _excluded_items(trie: SidTrie, layout: VocabLayout, excluded: np.ndarray,
                    allowed_rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The excluded items each request could otherwise name, sorted by trie position, no repeats.

    `excluded` `[batch, width]` catalog rows (-1 padding) -> `[batch, width]` int32 trie positions
    (`_NO_ITEM` padding) and `[batch, width, max_levels]` int32 their SID tokens (-1 padding).
    Items the allowed-items mask already removes are dropped, so nothing is counted twice.
    """
    position_of_row = np.empty(trie.n_items, np.int64)  # [n_items]
    position_of_row[trie.item_order] = np.arange(trie.n_items)
    keep = excluded >= 0  # [batch, width]
    if allowed_rows is not None:
        keep &= allowed_rows[np.maximum(excluded, 0)]
    positions = np.sort(np.where(keep, position_of_row[np.maximum(excluded, 0)], _NO_ITEM), axis=1)
    repeat = np.zeros(positions.shape, bool)  # [batch, width]
    repeat[:, 1:] = positions[:, 1:] == positions[:, :-1]
    positions = np.sort(np.where(repeat, _NO_ITEM, positions), axis=1)  # [batch, width]
    rows = trie.item_order[np.minimum(positions, trie.n_items - 1)]  # [batch, width]
    codes = trie.codes[rows]  # [batch, width, max_levels]
    real = (codes >= 0) & (positions < _NO_ITEM)[..., None]  # [batch, width, max_levels]
    tokens = np.where(real, layout.block_offset_table()[trie.item_types[rows]] + codes, -1)
    return positions.astype(np.int32), tokens.astype(np.int32)


def _padded_rows(rows_per_request: Sequence[Sequence[int]], n_items: int, width: int | None) -> np.ndarray:
    """`[batch, width]` int32 catalog rows, -1 padding; rows outside the catalog are an error."""
    longest = max([len(rows) for rows in rows_per_request] + [1])
    if width is not None and longest > width:
        raise UserError(f"a request excludes {longest} items, more than max_excluded={width}")
    width = longest if width is None else width
    padded = np.full((len(rows_per_request), width), -1, np.int32)  # [batch, max_excluded]
    for b, rows in enumerate(rows_per_request):
        rows = np.asarray(rows, np.int64).reshape(-1)
        bad = rows[(rows < 0) | (rows >= n_items)]
        if bad.size:
            raise UserError(f"request {b}: excluded item row {int(bad[0])} is outside the catalog "
                            f"(rows 0..{n_items - 1})")
        padded[b, : rows.size] = rows
    return padded


def _check_enough_items(trie: SidTrie, layout: VocabLayout, formats: np.ndarray, allowed_types: np.ndarray,
                        excluded: np.ndarray | None, allowed_rows: np.ndarray | None, per_type: np.ndarray,
                        beam_size: int) -> None:
    """In ID mode the beams are distinct items: refuse a beam wider than the items left to name
    (`per_type` `[num_types]`: the allowed items of each type)."""
    for b in np.flatnonzero(formats == OutputFormat.IDS):
        count = int(per_type[allowed_types[b]].sum())
        if excluded is not None:
            rows = np.unique(excluded[b][excluded[b] >= 0])
            if allowed_rows is not None:
                rows = rows[allowed_rows[rows]]
            count -= int(allowed_types[b, trie.item_types[rows]].sum())
        if beam_size > count:
            names = [layout.entity_types[t].name for t in np.flatnonzero(allowed_types[b])]
            raise UserError(f"request {b}: beam size {beam_size} is larger than the {count} catalog item(s) "
                            f"of type {', '.join(names)} it may name; lower the beam size")
