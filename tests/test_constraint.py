"""The SID constraint's masks and transitions against the plain-Python reference rules."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.catalog.table import build_trie
from neo_jax.decode import constraint as constraint_module
from neo_jax.decode.constraint import ItemSubsets, SidConstraint, SidState, Unconstrained, sid_requests
from neo_jax.decode.sid_tables import SidTables
from neo_jax.errors import UserError
from neo_jax.vocab import EntityType, VocabLayout
from sid_fixtures import EOS_ID, ReferenceRules, allowed_rows_masks, build_constraint, catalogs, requests


@functools.partial(jax.jit, static_argnames="vocab_size")
def allowed_tokens(constraint, state, vocab_size):
    return constraint.allowed(state, vocab_size)


@jax.jit
def advance(constraint, state, tokens):
    return constraint.advance(state, tokens)


def walk_request(constraint: SidConstraint, row: int, rules: ReferenceRules, vocab_size: int) -> set[tuple]:
    """Follow every allowed token of request `row` through its spans; check each mask on the way.

    Returns the complete SIDs reached. Outside a span only `[SID]` is followed (text is a loop).
    """
    batch = constraint.requests.output_format.shape[0]
    reached = set()

    def visit(generated: tuple[int, ...], state: SidState) -> None:
        mask = allowed_tokens(constraint, state, vocab_size)  # [batch, 1, vocab]
        allowed = set(np.flatnonzero(np.asarray(mask[row, 0])).tolist())
        assert allowed == rules.next_tokens(generated), generated
        in_span, prefix, closed = rules.parse(generated)
        if closed:  # the mask after an item was checked; record it and stop
            reached.add(rules.emitted_items(generated)[0])
            return
        for token in sorted(allowed if in_span else allowed & {rules.open}):
            tokens = jnp.full((batch, 1), token, jnp.int32)  # the other rows' states are not read
            visit(generated + (token,), advance(constraint, state, tokens))

    visit((), constraint.init_state(batch, 1))
    return reached


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.data())
def test_masks_follow_the_rules_on_every_reachable_path(data):
    """Exactly the allowed items are reachable, every step's mask equals the reference, no dead ends."""
    catalog = data.draw(catalogs())
    batch_requests = data.draw(st.lists(requests(catalog, formats=("mixed", "text")), min_size=2, max_size=2))
    allowed_rows = data.draw(allowed_rows_masks(catalog))
    constraint = build_constraint(catalog, batch_requests, allowed_rows, beam_size=1)
    for row, request in enumerate(batch_requests):
        rules = ReferenceRules(catalog, request, allowed_rows)
        reached = walk_request(constraint, row, rules, catalog.layout.padded_size)
        assert reached == (set() if request.output_format == "text" else set(rules.items))


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.data())
def test_id_mode_names_exactly_one_item_then_ends(data):
    catalog = data.draw(catalogs())
    request = data.draw(requests(catalog, formats=("ids",)))
    rules = ReferenceRules(catalog, request, None)
    if not rules.items:
        with pytest.raises(UserError, match="beam size 1 is larger than the 0 catalog item"):
            build_constraint(catalog, [request], None, beam_size=1)
        return
    constraint = build_constraint(catalog, [request], None, beam_size=1)
    assert walk_request(constraint, 0, rules, catalog.layout.padded_size) == set(rules.items)


def small_catalog():
    layout = VocabLayout(6, (EntityType("song", (3, 2)), EntityType("artist", (2,))), pad_multiple=8)
    codes = np.array([[0, 0], [0, 1], [2, 1], [1, -1], [0, -1]], np.int32)  # rows 3, 4 are artists
    trie = build_trie(codes, np.array([0, 0, 0, 1, 1]), (2, 1))
    return layout, trie, SidTables.from_trie(trie, layout)


def test_padding_rows_and_sid_codes_are_never_allowed_outside_a_span():
    layout, trie, tables = small_catalog()
    requests_on_device = sid_requests(trie, layout, tables, entity_types=[None], output_formats=["mixed"],
                                      beam_size=1)
    constraint = SidConstraint.create(tables, requests_on_device, layout, EOS_ID)
    vocab = layout.padded_size + 8  # a model head wider than the layout
    mask = allowed_tokens(constraint, constraint.init_state(1, 2), vocab)  # [1, 2, vocab]
    expected = np.zeros(vocab, bool)
    expected[: layout.text_size] = True
    expected[layout.sid_open_id] = True
    assert np.array_equal(np.asarray(mask[0, 0]), expected) and np.array_equal(np.asarray(mask[0, 1]), expected)


def test_unconstrained_masks_only_padding_rows():
    mask = Unconstrained(vocab_limit=13).allowed((), 16)
    assert np.array_equal(np.asarray(mask), np.arange(16) < 13)


def test_excluding_every_item_of_a_type_closes_that_branch():
    layout, trie, tables = small_catalog()
    requests_on_device = sid_requests(trie, layout, tables, entity_types=[None, ["artist"]],
                                      output_formats=["mixed", "mixed"], beam_size=1,
                                      excluded_rows=[[3, 4, 3], [3]], allowed_rows=np.array([1, 1, 1, 1, 0], bool))
    assert np.asarray(requests_on_device.has_items).tolist() == [True, False]
    constraint = SidConstraint.create(tables, requests_on_device, layout, EOS_ID)
    state = SidState(in_span=jnp.ones((2, 1), bool), node=jnp.zeros((2, 1), jnp.int32))  # right after [SID]
    mask = allowed_tokens(constraint, state, layout.padded_size)
    allowed = np.flatnonzero(np.asarray(mask[0, 0]))
    assert allowed.tolist() == [layout.sid_token("song", 0, 0), layout.sid_token("song", 0, 2)]
    outside = allowed_tokens(constraint, constraint.init_state(2, 1), layout.padded_size)
    assert not bool(outside[1, 0, layout.sid_open_id])  # no artist left: `[SID]` would be a dead end


def test_item_subsets_build_once_per_content_and_digest_a_read_only_mask_once(monkeypatch):
    layout, trie, tables = small_catalog()
    subsets = ItemSubsets(trie, tables)
    digests = []
    real_sha1 = constraint_module.hashlib.sha1
    monkeypatch.setattr(constraint_module.hashlib, "sha1", lambda data: digests.append(1) or real_sha1(data))
    stock = np.array([1, 1, 0, 1, 1], bool)
    first = subsets.get(stock)
    assert subsets.get(stock.copy()) is first and subsets.built == 1  # same content, another array
    assert first.items_per_type.tolist() == np.bincount(trie.item_types[stock], minlength=2).tolist()
    stock[0] = False  # a writable mask changed in place is a new subset
    assert subsets.get(stock) is not first and subsets.built == 2
    read_only = np.array([1, 0, 1, 1, 1], bool)
    read_only.flags.writeable = False
    digests.clear()
    third = subsets.get(read_only)
    assert subsets.get(read_only) is third and subsets.get(read_only) is third and len(digests) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(entity_types=[["album"]]), "request 0: unknown entity type 'album'"),
    (dict(entity_types=[[]]), "request 0: the list of entity types is empty"),
    (dict(output_formats=["json"]), "unknown output format 'json'"),
    (dict(excluded_rows=[[7]]), "request 0: excluded item row 7 is outside the catalog"),
    (dict(entity_types=[["artist"]], beam_size=3), "beam size 3 is larger than the 2 catalog item"),
    (dict(entity_types=[["artist"]], beam_size=2, excluded_rows=[[4, 4]]),
     "beam size 2 is larger than the 1 catalog item"),
    (dict(beam_size=5, allowed_rows=np.array([1, 1, 0, 1, 1], bool)), "beam size 5 is larger than the 4 catalog"),
    (dict(allowed_rows=np.ones(3, bool)), "allowed-items mask must be bool \\[5\\]"),
])
def test_bad_requests_get_a_clear_error(kwargs, message):
    layout, trie, tables = small_catalog()
    args = dict(entity_types=[None], output_formats=["ids"], beam_size=1) | kwargs
    with pytest.raises(UserError, match=message):
        sid_requests(trie, layout, tables, **args)


def test_eos_must_be_a_text_token():
    layout, trie, tables = small_catalog()
    requests_on_device = sid_requests(trie, layout, tables, entity_types=[None], output_formats=["ids"],
                                      beam_size=1)
    with pytest.raises(UserError, match="EOS id 7 is not a text token"):
        SidConstraint.create(tables, requests_on_device, layout, eos_id=7)


def test_exclusions_close_leaves_and_emptied_subtrees():
    """Request 0 excludes song [0, 0] (twice): below song code 0 only code 1 is left. Request 1
    excludes songs [0, 0] and [0, 1]: song code 0 holds nothing, so after `[SID]` only song code 2
    is allowed."""
    layout, trie, tables = small_catalog()
    requests_on_device = sid_requests(trie, layout, tables, entity_types=[["song"], ["song"]],
                                      output_formats=["mixed", "mixed"], beam_size=1, excluded_rows=[[0, 0], [1, 0]])
    constraint = SidConstraint.create(tables, requests_on_device, layout, EOS_ID)
    opened = advance(constraint, constraint.init_state(2, 1), jnp.full((2, 1), layout.sid_open_id))
    at_root = np.asarray(allowed_tokens(constraint, opened, layout.padded_size))  # [2, 1, vocab]
    assert np.flatnonzero(at_root[1, 0]).tolist() == [layout.sid_token("song", 0, 2)]
    assert np.flatnonzero(at_root[0, 0]).tolist() == [layout.sid_token("song", 0, 0), layout.sid_token("song", 0, 2)]
    below = advance(constraint, opened, jnp.full((2, 1), layout.sid_token("song", 0, 0)))
    mask = np.asarray(allowed_tokens(constraint, below, layout.padded_size))  # [2, 1, vocab]
    assert np.flatnonzero(mask[0, 0]).tolist() == [layout.sid_token("song", 1, 1)]
