"""Item identity: which item each `[/SID]` closes, on the host and in decoding, and what the model does with it."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from neo_jax.catalog.item_ids import ItemIds, table_rows
from neo_jax.decode.constraint import SidConstraint, sid_requests
from neo_jax.decode.generate import DecodeSettings, decode, pack_prompts, resolve
from neo_jax.decode.sid_tables import SidTables
from neo_jax.errors import UserError
from neo_jax.model.decoder import Decoder
from sid_fixtures import EOS_ID, LAYOUT
from test_generate import CONFIG, full_catalog

OPEN, CLOSE = LAYOUT.sid_open_id, LAYOUT.sid_close_id
ITEM_CONFIG = dataclasses.replace(CONFIG, num_item_ids=table_rows(full_catalog().n_items))


def test_each_close_names_the_item_its_span_spells_and_nothing_else_does():
    catalog = full_catalog()
    item_ids = ItemIds.build(catalog.trie, LAYOUT)
    a, b = 5, 17  # catalog rows: a type-1 item (2 codes) and a type-2 item (3 codes)
    row = [2, OPEN, *catalog.item_tokens[a], CLOSE, 3,  # an item
           OPEN, *catalog.item_tokens[b][:2], CLOSE,  # a prefix no item has
           CLOSE, 4,  # a stray close
           OPEN, *catalog.item_tokens[b], CLOSE, OPEN, *catalog.item_tokens[a]]  # an item, then an open span
    expected = np.zeros(len(row), np.int32)
    expected[1 + len(catalog.item_tokens[a]) + 1] = a + 1
    expected[len(row) - len(catalog.item_tokens[a]) - 2] = b + 1
    tokens = np.array([row, [0] * len(row)], np.int32)  # [2, len]: the second row is padding
    ids = item_ids(tokens)
    assert ids.shape == tokens.shape and ids.dtype == np.int32
    np.testing.assert_array_equal(ids[0], expected)
    np.testing.assert_array_equal(ids[1], 0)
    np.testing.assert_array_equal(item_ids(tokens[None]), ids[None])  # any leading shape


def test_a_new_table_leaves_the_model_unchanged_and_a_trained_one_changes_only_what_follows_its_close():
    catalog = full_catalog()
    item = 7
    row = [2, 3, OPEN, *catalog.item_tokens[item], CLOSE, 4, 5]
    close = row.index(CLOSE)
    tokens = np.array([row], np.int32)
    positions = np.arange(len(row), dtype=np.int32)[None]
    ids = ItemIds.build(catalog.trie, LAYOUT)(tokens)
    assert ids[0, close] == item + 1
    plain = Decoder(CONFIG, nnx.Rngs(0))
    with_table = Decoder(ITEM_CONFIG, nnx.Rngs(0))
    assert not np.any(np.asarray(with_table.item_embed[...]))
    before = np.asarray(plain(tokens, positions)[0])
    np.testing.assert_array_equal(np.asarray(with_table(tokens, positions, item_ids=ids)[0]), before)
    with_table.item_embed[...] = with_table.item_embed[...].at[item + 1].set(1.0)
    after = np.asarray(with_table(tokens, positions, item_ids=ids)[0])
    np.testing.assert_array_equal(after[0, :close], before[0, :close])  # causal: nothing before the close moves
    assert not np.allclose(after[0, close:], before[0, close:])


def test_a_model_with_another_catalogs_table_is_refused():
    item_ids = ItemIds.build(full_catalog().trie, LAYOUT)
    item_ids.check_model(ITEM_CONFIG.num_item_ids, "the model")
    with pytest.raises(UserError, match="item-identity rows"):
        item_ids.check_model(ITEM_CONFIG.num_item_ids + 128, "the model")


forward = nnx.jit(lambda model, tokens, positions, ids: model(tokens, positions, item_ids=ids)[0])


@pytest.mark.parametrize("settings", [DecodeSettings("beam", max_new_tokens=12, beam_size=4),
                                      DecodeSettings("sample", max_new_tokens=12, beam_size=4, top_k=8)])
def test_decoding_feeds_each_generated_and_prompt_close_its_item(random_decoder, settings):
    """Mixed-format beams that close items score exactly their full pass with the host's item ids over
    prompt and continuation: the constraint names the items the beams close, the prompt's last close
    (fed at the first step) included; without the ids the scores differ, so the ids are used."""
    catalog = full_catalog()
    model = random_decoder(ITEM_CONFIG, seed=5)
    item_ids = ItemIds.build(catalog.trie, LAYOUT)
    tables = SidTables.from_trie(catalog.trie, LAYOUT)
    prompts = [(2, OPEN, *catalog.item_tokens[3], CLOSE), (4, OPEN, *catalog.item_tokens[11], CLOSE, 3)]
    requests = sid_requests(catalog.trie, LAYOUT, tables, entity_types=[None, None],
                            output_formats=["mixed", "mixed"], beam_size=settings.beam_size)
    constraint = SidConstraint.create(tables, requests, LAYOUT, EOS_ID)
    packed = pack_prompts(prompts, max_context=ITEM_CONFIG.max_position_embeddings,
                          max_new_tokens=settings.max_new_tokens, vocab_limit=LAYOUT.size)
    result = decode(model, packed, constraint, settings, EOS_ID, item_ids=item_ids(packed.tokens))
    closes_fed, used = 0, False
    for prompt, beams in zip(prompts, resolve(result, LAYOUT, catalog.trie)):
        for beam in beams:
            sequence = np.array([prompt + beam.tokens], np.int32)  # [1, len]
            positions = np.arange(sequence.shape[1], dtype=np.int32)[None]
            ids = item_ids(sequence)
            log_probs = np.asarray(jax.nn.log_softmax(forward(model, sequence, positions, ids)[0], axis=-1))
            blind = np.asarray(jax.nn.log_softmax(forward(model, sequence, positions, 0 * ids)[0], axis=-1))
            steps = [(len(prompt) - 1 + i, t) for i, t in enumerate(beam.tokens)]
            assert beam.log_prob == pytest.approx(sum(log_probs[p, t] for p, t in steps), abs=1e-4)
            closes_fed += int(np.count_nonzero(ids[0, len(prompt) - 1:-1]))
            used |= abs(beam.log_prob - sum(blind[p, t] for p, t in steps)) > 1e-3
    assert closes_fed > 0 and used


def test_item_id_dropout_drops_about_its_share_of_ids_and_only_ids():
    from neo_jax.train.step import drop_item_ids

    ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, 50, (64, 256)), jax.numpy.int32)  # [batch, len]
    dropped = np.asarray(drop_item_ids(ids, jax.random.key(1), 0.5))
    was = np.asarray(ids) > 0
    gone = was & (dropped == 0)
    assert abs(gone.sum() / was.sum() - 0.5) < 0.02  # about half the ids
    assert np.all((dropped == np.asarray(ids)) | (dropped == 0))  # an id is kept or zeroed, never changed
    np.testing.assert_array_equal(dropped, np.asarray(drop_item_ids(ids, jax.random.key(1), 0.5)))  # seeded
