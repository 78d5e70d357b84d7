"""Random SID catalogs and requests, and a plain-Python reference of the SID constraint rules.

The reference knows nothing of the trie arrays: it works on the set of allowed items written
as token tuples, so the decoder's masks can be checked against it token by token.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st

from neo_jax.catalog.table import SidTrie, build_trie
from neo_jax.decode.constraint import OutputFormat, SidConstraint, sid_requests
from neo_jax.decode.sid_tables import SidTables
from neo_jax.vocab import EntityType, VocabLayout

TEXT_SIZE = 6
EOS_ID = 1
# One layout for every random catalog, so the jitted decoders compile once per test: a 1-item
# type of depth 1, and types of depth 2 and 3. Padding rows follow the SID blocks (24 -> 32).
ENTITY_TYPES = (EntityType("type0", (3,)), EntityType("type1", (2, 3)), EntityType("type2", (3, 2, 2)))
LAYOUT = VocabLayout(TEXT_SIZE, ENTITY_TYPES, pad_multiple=16)
MAX_ITEMS = 1 + 2 * 3 + 3 * 2 * 2
# Bounds on the trie of any such catalog; the device tables are padded to them.
MAX_NODES = 1 + 1 + (2 + 6) + (3 + 6 + 12)
MAX_ROOT_CHILDREN = 1 + 2 + 3
MAX_BITMAP_WORDS = MAX_NODES + 1 + 1  # a word a row at most (every codebook fits one), then a read's padding
MAX_EXCLUDED = MAX_ITEMS + 1


@dataclasses.dataclass(frozen=True)
class Catalog:
    layout: VocabLayout
    trie: SidTrie
    item_tokens: tuple[tuple[int, ...], ...]  # per catalog row: its SID code tokens

    @property
    def n_items(self) -> int:
        return len(self.item_tokens)


@st.composite
def catalogs(draw) -> Catalog:
    """Random item subsets (uneven branching) of the fixed layout; type0 holds exactly one item."""
    rows = []
    for t, entity in enumerate(ENTITY_TYPES):
        every_sid = list(itertools.product(*[range(s) for s in entity.codebook_sizes]))
        count = 1 if t == 0 else draw(st.integers(1, len(every_sid)))
        chosen = draw(st.permutations(range(len(every_sid))))[:count]
        rows += [(t, every_sid[i]) for i in chosen]
    rows = draw(st.permutations(rows))  # catalog order differs from trie order
    codes = np.full((len(rows), 3), -1, np.int32)
    for i, (_, sid) in enumerate(rows):
        codes[i, : len(sid)] = sid
    trie = build_trie(codes, np.array([t for t, _ in rows], np.int32), [e.num_levels for e in ENTITY_TYPES])
    item_tokens = tuple(tuple(LAYOUT.sid_token(t, level, c) for level, c in enumerate(sid)) for t, sid in rows)
    return Catalog(LAYOUT, trie, item_tokens)


def _grow(array: jax.Array, size: int, value) -> jax.Array:
    """`array` padded along its first axis to `size` rows of `value`."""
    padding = jnp.full((size - array.shape[0],) + array.shape[1:], value, array.dtype)
    return jnp.concatenate([array, padding])


def fixed_shape_constraint(constraint: SidConstraint) -> SidConstraint:
    """Pad the trie tables with unreachable childless nodes (and the root's child lists with
    tokens past the SID range) to the bounds above, so every random catalog gives the same shapes."""
    tables, requests_on_device = constraint.tables, constraint.requests
    sid_end = tables.sid_start + sum(tables.block_sizes)
    tables = tables.replace(
        child_start=_grow(tables.child_start, MAX_NODES + 1, tables.child_start[-1]),
        child_bits=_grow(tables.child_bits, MAX_BITMAP_WORDS, 0),
        bits_start=_grow(tables.bits_start, MAX_NODES + 2, tables.bits_start[-1]),
        child_block=_grow(tables.child_block, MAX_NODES + 1, -1),
        node_code=_grow(tables.node_code, MAX_NODES, -1),
        subtree_lo=_grow(tables.subtree_lo, MAX_NODES, 0), subtree_hi=_grow(tables.subtree_hi, MAX_NODES, 0),
        root_token=_grow(tables.root_token, MAX_ROOT_CHILDREN, sid_end),
        root_type=_grow(tables.root_type, MAX_ROOT_CHILDREN, 0))
    if requests_on_device.child_bits is not None:
        requests_on_device = requests_on_device.replace(
            child_bits=_grow(requests_on_device.child_bits, MAX_BITMAP_WORDS, 0))
    return constraint.replace(tables=tables, requests=requests_on_device)


@dataclasses.dataclass(frozen=True)
class Request:
    entity_types: tuple[str, ...] | None
    output_format: str
    excluded_rows: tuple[int, ...]


@st.composite
def requests(draw, catalog: Catalog, formats=("ids", "text", "mixed")) -> Request:
    names = [e.name for e in catalog.layout.entity_types]
    types = draw(st.none() | st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    excluded = draw(st.lists(st.integers(0, catalog.n_items - 1), max_size=catalog.n_items + 1))  # repeats too
    return Request(None if types is None else tuple(types), draw(st.sampled_from(formats)), tuple(excluded))


def item_masks(catalog: Catalog):
    """An in-stock mask over catalog rows."""
    return st.lists(st.booleans(), min_size=catalog.n_items, max_size=catalog.n_items).map(
        lambda bits: np.array(bits, bool))


def allowed_rows_masks(catalog: Catalog):
    return st.none() | item_masks(catalog)


class ReferenceRules:
    """The constraint as the spec states it, for one request, on token tuples."""

    def __init__(self, catalog: Catalog, request: Request, allowed_rows: np.ndarray | None):
        layout = catalog.layout
        types = (set(range(len(layout.entity_types))) if request.entity_types is None
                 else {layout.type_index(n) for n in request.entity_types})
        self.items = {tokens: row for row, tokens in enumerate(catalog.item_tokens)
                      if int(catalog.trie.item_types[row]) in types and row not in request.excluded_rows
                      and (allowed_rows is None or allowed_rows[row])}
        self.format = OutputFormat.parse(request.output_format)
        self.open, self.close, self.sid_start = layout.sid_open_id, layout.sid_close_id, layout.sid_start

    def parse(self, generated) -> tuple[bool, tuple[int, ...], int]:
        """(in a span?, the span's codes so far, items closed so far)."""
        in_span, prefix, closed = False, (), 0
        for token in generated:
            if not in_span and token == self.open:
                in_span, prefix = True, ()
            elif in_span and token == self.close:
                in_span, closed = False, closed + 1
            elif in_span:
                prefix += (token,)
        return in_span, prefix, closed

    def next_tokens(self, generated) -> set[int]:
        in_span, prefix, closed = self.parse(generated)
        if in_span:
            allowed = {item[len(prefix)] for item in self.items if len(item) > len(prefix)
                       and item[: len(prefix)] == prefix}
            return allowed | ({self.close} if prefix in self.items else set())
        if self.format == OutputFormat.IDS:  # one item, then EOS
            return {self.open} if closed == 0 and self.items else {EOS_ID}
        allowed = set(range(TEXT_SIZE))
        if self.format == OutputFormat.MIXED and self.items:
            allowed.add(self.open)
        return allowed

    def emitted_items(self, generated) -> list[tuple[int, ...]]:
        """The complete SIDs in a token sequence, as code-token tuples."""
        items, span = [], None
        for token in generated:
            if span is None and token == self.open:
                span = ()
            elif span is not None and token == self.close:
                items.append(span)
                span = None
            elif span is not None:
                span += (token,)
        return items

    def check(self, generated) -> None:
        """Every token was allowed when taken; every complete SID is an allowed catalog item."""
        for t, token in enumerate(generated):
            assert token in self.next_tokens(generated[:t]), (list(generated), t)
        for item in self.emitted_items(generated):
            assert item in self.items, (item, sorted(self.items))
        if self.format == OutputFormat.TEXT:
            assert self.open not in generated
        if self.format == OutputFormat.IDS:
            assert all(token in (EOS_ID, self.open, self.close) or token >= self.sid_start for token in generated)
            assert len(self.emitted_items(generated)) <= 1


def build_constraint(catalog: Catalog, batch_requests: list[Request], allowed_rows: np.ndarray | None,
                     beam_size: int) -> SidConstraint:
    tables = SidTables.from_trie(catalog.trie, catalog.layout)
    requests_on_device = sid_requests(
        catalog.trie, catalog.layout, tables,
        entity_types=[r.entity_types for r in batch_requests],
        output_formats=[r.output_format for r in batch_requests], beam_size=beam_size,
        excluded_rows=[r.excluded_rows for r in batch_requests], max_excluded=MAX_EXCLUDED,
        allowed_rows=allowed_rows)
    return fixed_shape_constraint(SidConstraint.create(tables, requests_on_device, catalog.layout, EOS_ID))
