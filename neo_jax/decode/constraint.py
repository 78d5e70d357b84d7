"""The SID constraint as device arrays: which tokens each beam may take next, and how its state moves.

A constraint is a pytree with three methods the decoding loops call every step:
- `init_state(batch, beams)`: the per-beam state, leaves `[batch, beams, ...]`;
- `allowed(state, vocab_size) -> (mask, children)`: a bool mask broadcastable to
  `[batch, beams, vocab]` and a per-beam pytree the transition needs (leaves `[batch, beams, ...]`);
- `advance(state, children, tokens [batch, beams]) -> state`: the state after taking `tokens`.
A beam search gathers the state and `children` by parent beam before `advance`, exactly as it
gathers the KV cache. `Unconstrained` is the no-op (only the vocabulary's padding rows are
masked), so constrained and unconstrained decoding run the same loop.

`SidConstraint` walks the trie of `neo_jax.catalog.table` (see its contract). Per beam it keeps
`in_span` (inside `[SID] ... [/SID]`) and `node` (the trie node reached; outside a span, the leaf of
the last item closed, or 0 before any). Per request it holds the allowed entity types, the output
format (`text`: no SIDs; `mixed`: text and SIDs; `ids`: one SID then EOS) and an optional item
restriction. A step costs one gather of `max_children` trie entries per beam and one scatter
into a `[vocab]` mask, whatever the catalog size. A child is allowed iff its subtree still holds
an allowed item, so a restricted catalog never leaves a beam in a dead end.
"""

from __future__ import annotations

import enum
from typing import Protocol, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.catalog.table import ROOT, SidTrie, node_tokens
from neo_jax.decode.state import PyTree
from neo_jax.errors import UserError
from neo_jax.vocab import VocabLayout

_NO_ITEM = np.iinfo(np.int32).max  # padding of the sorted excluded-position lists


class Constraint(Protocol):
    def init_state(self, batch: int, beams: int) -> PyTree: ...

    def allowed(self, state: PyTree, vocab_size: int) -> tuple[jax.Array, PyTree]: ...

    def advance(self, state: PyTree, children: PyTree, tokens: jax.Array) -> PyTree: ...


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

    def allowed(self, state: tuple, vocab_size: int) -> tuple[jax.Array, tuple]:
        return jnp.arange(vocab_size) < self.vocab_limit, ()  # [vocab]

    def advance(self, state: tuple, children: tuple, tokens: jax.Array) -> tuple:
        return state


@flax.struct.dataclass
class SidTables:
    """The trie on device, shared by every request (about 20 bytes a node)."""

    child_start: jax.Array  # [num_nodes + 1] int32: children of n are child_start[n] .. child_start[n+1]-1
    node_token: jax.Array  # [num_nodes] int32: token id of the edge into the node (root: -1)
    node_type: jax.Array  # [num_nodes] int32: entity type index (root: 0, never read)
    subtree_lo: jax.Array  # [num_nodes] int32: first trie-order item position under the node
    subtree_hi: jax.Array  # [num_nodes] int32: one past the last
    max_children: int = flax.struct.field(pytree_node=False)
    num_types: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_trie(cls, trie: SidTrie, layout: VocabLayout) -> "SidTables":
        return cls(
            child_start=jnp.asarray(trie.child_start, jnp.int32),
            node_token=jnp.asarray(node_tokens(trie, layout), jnp.int32),
            node_type=jnp.asarray(np.maximum(trie.node_type, 0), jnp.int32),
            subtree_lo=jnp.asarray(trie.subtree_lo, jnp.int32),
            subtree_hi=jnp.asarray(trie.subtree_hi, jnp.int32),
            max_children=int(trie.max_children),
            num_types=len(trie.levels_per_type),
        )

    def child_slots(self, node: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The `max_children` child slots of each node: `[...]` -> node ids and real flags `[..., max_children]`."""
        start = self.child_start[node]  # [...]
        end = self.child_start[node + 1]  # [...]
        slots = start[..., None] + jnp.arange(self.max_children, dtype=jnp.int32)  # [..., max_children]
        real = slots < end[..., None]  # [..., max_children]
        return jnp.where(real, slots, ROOT), real


@flax.struct.dataclass
class SidRequests:
    """Per-request constants of the SID constraint."""

    allowed_types: jax.Array  # [batch, num_types] bool
    output_format: jax.Array  # [batch] int32 (OutputFormat)
    has_items: jax.Array  # [batch] bool: at least one allowed item exists, so `[SID]` leads somewhere
    excluded: jax.Array | None  # [batch, max_excluded] int32 sorted distinct trie positions, _NO_ITEM padding
    allowed_prefix: jax.Array | None  # [n_items + 1] int32: allowed items among the first k in trie order

    @classmethod
    def create(cls, tables: SidTables, allowed_types: jax.Array, output_format: jax.Array,
               excluded: jax.Array | None = None, allowed_items: jax.Array | None = None) -> "SidRequests":
        """Device-side setup (traceable).

        `allowed_types` `[batch, num_types]` bool; `output_format` `[batch]` int32;
        `excluded` `[batch, max_excluded]` int32 trie-order positions, -1 padding;
        `allowed_items` `[n_items]` bool over trie order, shared by the batch.
        """
        allowed_prefix = None
        if allowed_items is not None:
            allowed_prefix = jnp.concatenate(
                [jnp.zeros(1, jnp.int32), jnp.cumsum(allowed_items.astype(jnp.int32), dtype=jnp.int32)])
        if excluded is not None:
            excluded = _distinct_allowed_positions(excluded, allowed_items)  # [batch, max_excluded]
        requests = cls(allowed_types=allowed_types, output_format=output_format.astype(jnp.int32),
                       has_items=jnp.ones(output_format.shape, bool), excluded=excluded,
                       allowed_prefix=allowed_prefix)
        root = jnp.zeros((output_format.shape[0], 1), jnp.int32)  # [batch, 1]
        child, real = tables.child_slots(root)  # [batch, 1, max_children]
        has_items = jnp.any(real & requests.available(tables, child), axis=(1, 2))  # [batch]
        return requests.replace(has_items=has_items)

    def available(self, tables: SidTables, node: jax.Array) -> jax.Array:
        """Whether each node's subtree holds an item this request may emit: `[batch, ...]` -> `[batch, ...]` bool."""
        batch = node.shape[0]
        batch_index = jnp.arange(batch).reshape((batch,) + (1,) * (node.ndim - 1))  # [batch, 1, ...]
        type_ok = self.allowed_types[batch_index, tables.node_type[node]]  # [batch, ...]
        lo, hi = tables.subtree_lo[node], tables.subtree_hi[node]  # [batch, ...]
        if self.allowed_prefix is None:
            count = hi - lo  # [batch, ...]
        else:
            count = self.allowed_prefix[hi] - self.allowed_prefix[lo]  # [batch, ...]
        if self.excluded is not None:
            below = jax.vmap(lambda row, v: jnp.searchsorted(row, v, side="left"))
            count = count - (below(self.excluded, hi) - below(self.excluded, lo))  # [batch, ...]
        return type_ok & (count > 0)


_create_requests = jax.jit(SidRequests.create)


def _distinct_allowed_positions(excluded: jax.Array, allowed_items: jax.Array | None) -> jax.Array:
    """Sort each row, drop padding, repeats and items the global mask already removes (no double count)."""
    keep = excluded >= 0  # [batch, max_excluded]
    if allowed_items is not None:
        keep &= allowed_items[jnp.maximum(excluded, 0)]
    keys = jnp.sort(jnp.where(keep, excluded, _NO_ITEM), axis=1)  # [batch, max_excluded]
    repeat = jnp.concatenate([jnp.zeros_like(keys[:, :1], bool), keys[:, 1:] == keys[:, :-1]], axis=1)
    return jnp.sort(jnp.where(repeat, _NO_ITEM, keys), axis=1)  # [batch, max_excluded]


@flax.struct.dataclass
class SidState:
    """Per-beam constraint state, gathered with the beams."""

    in_span: jax.Array  # [batch, beams] bool: between `[SID]` and `[/SID]`
    node: jax.Array  # [batch, beams] int32: trie node reached (outside: last closed leaf, 0 before any)


@flax.struct.dataclass
class SidChildren:
    """The allowed children of each beam's node, kept from the mask for the transition."""

    node: jax.Array  # [batch, beams, max_children] int32
    token: jax.Array  # [batch, beams, max_children] int32, -1 where not allowed


@flax.struct.dataclass
class SidConstraint:
    tables: SidTables
    requests: SidRequests
    text_size: int = flax.struct.field(pytree_node=False)  # ids below it are text (padding rows lie past the SIDs)
    sid_open: int = flax.struct.field(pytree_node=False)
    sid_close: int = flax.struct.field(pytree_node=False)
    eos_id: int = flax.struct.field(pytree_node=False)

    @classmethod
    def create(cls, tables: SidTables, requests: SidRequests, layout: VocabLayout, eos_id: int) -> "SidConstraint":
        if not 0 <= eos_id < layout.text_size:
            raise UserError(f"EOS id {eos_id} is not a text token of the vocabulary (0..{layout.text_size - 1})")
        return cls(tables=tables, requests=requests, text_size=layout.text_size,
                   sid_open=layout.sid_open_id, sid_close=layout.sid_close_id, eos_id=int(eos_id))

    def init_state(self, batch: int, beams: int) -> SidState:
        return SidState(in_span=jnp.zeros((batch, beams), bool), node=jnp.zeros((batch, beams), jnp.int32))

    def allowed(self, state: SidState, vocab_size: int) -> tuple[jax.Array, SidChildren]:
        """Outside a span, by output format: `text`: text tokens (EOS among them); `mixed`: text and
        `[SID]`; `ids`: exactly one item, `[SID]` first and then EOS, so a request's beams are
        distinct items. Inside: the allowed children of the node, or `[/SID]` at a leaf."""
        batch, beams = state.node.shape
        child, real = self.tables.child_slots(state.node)  # [batch, beams, max_children]
        ok = real & state.in_span[..., None] & self.requests.available(self.tables, child)
        child_token = jnp.where(ok, self.tables.node_token[child], -1)  # [batch, beams, max_children]

        outside = ~state.in_span  # [batch, beams]
        output_format = self.requests.output_format[:, None]  # [batch, 1]
        has_items = self.requests.has_items[:, None]  # [batch, 1]
        id_mode = output_format == OutputFormat.IDS  # [batch, 1]
        names_item_next = id_mode & has_items & (state.node == ROOT)  # [batch, beams]: ID mode, no item yet
        open_ok = outside & has_items & ((output_format == OutputFormat.MIXED) | names_item_next)
        eos_ok = outside & ~names_item_next  # [batch, beams]
        text_ok = outside & ~id_mode  # [batch, beams]
        close_ok = state.in_span & ~jnp.any(real, axis=-1)  # [batch, beams]: at a leaf
        specials = jnp.stack([jnp.where(close_ok, self.sid_close, -1), jnp.where(open_ok, self.sid_open, -1),
                              jnp.where(eos_ok, self.eos_id, -1)], axis=-1)  # [batch, beams, 3]
        targets = jnp.concatenate([child_token, specials], axis=-1)  # [batch, beams, max_children + 3]
        targets = jnp.where(targets < 0, vocab_size, targets)  # out of range: dropped by the scatter
        batch_index = jnp.arange(batch)[:, None, None]  # [batch, 1, 1]
        beam_index = jnp.arange(beams)[None, :, None]  # [1, beams, 1]
        listed = jnp.zeros((batch, beams, vocab_size), bool).at[batch_index, beam_index, targets].set(
            True, mode="drop")  # [batch, beams, vocab]
        text = jnp.arange(vocab_size) < self.text_size  # [vocab]
        mask = listed | (text & text_ok[..., None])  # [batch, beams, vocab]
        return mask, SidChildren(node=child, token=child_token)

    def advance(self, state: SidState, children: SidChildren, tokens: jax.Array) -> SidState:
        match = children.token == tokens[..., None]  # [batch, beams, max_children]
        child = jnp.max(jnp.where(match, children.node, ROOT), axis=-1)  # [batch, beams]
        opened = ~state.in_span & (tokens == self.sid_open)  # [batch, beams]
        stepped = state.in_span & (tokens != self.sid_close)  # [batch, beams]
        node = jnp.where(opened, ROOT, jnp.where(stepped, child, state.node))  # [batch, beams]
        return SidState(in_span=opened | stepped, node=node)


def sid_requests(trie: SidTrie, layout: VocabLayout, tables: SidTables, *,
                 entity_types: Sequence[Sequence[str] | None], output_formats: Sequence[str], beam_size: int,
                 excluded_rows: Sequence[Sequence[int]] | None = None, max_excluded: int | None = None,
                 allowed_rows: np.ndarray | None = None) -> SidRequests:
    """Check a batch of user requests on the host and set them up on device.

    `entity_types[b]`: type names request b may name (None: every type); `output_formats[b]`:
    `ids`, `text` or `mixed`; `excluded_rows[b]`: catalog rows request b must not name (its
    history), padded to `max_excluded` entries if given (a fixed width keeps one compiled decoder
    across batches); `allowed_rows` `[n_items]` bool over catalog rows (in stock), shared by the batch.
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
    # [batch, max_excluded] catalog rows, -1 padding
    excluded = None if excluded_rows is None else _padded_rows(excluded_rows, trie.n_items, max_excluded)
    _check_enough_items(trie, layout, formats, allowed_types, excluded, allowed_rows, beam_size)
    if excluded is not None:
        position_of_row = np.empty(trie.n_items, np.int32)  # [n_items]
        position_of_row[trie.item_order] = np.arange(trie.n_items, dtype=np.int32)
        excluded = np.where(excluded >= 0, position_of_row[np.maximum(excluded, 0)], -1)  # [batch, max_excluded]
    allowed_items = None if allowed_rows is None else jnp.asarray(allowed_rows[trie.item_order])  # [n_items]
    return _create_requests(tables, jnp.asarray(allowed_types), jnp.asarray(formats),
                            None if excluded is None else jnp.asarray(excluded), allowed_items)


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
                        excluded: np.ndarray | None, allowed_rows: np.ndarray | None, beam_size: int) -> None:
    """In ID mode the beams are distinct items: refuse a beam wider than the items left to name."""
    num_types = allowed_types.shape[1]
    kept = trie.item_types if allowed_rows is None else trie.item_types[allowed_rows]
    per_type = np.bincount(kept, minlength=num_types)  # [num_types]
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
