"""The history unlikelihood term: exactly the codes that would name an earlier item of the same
segment, from the chosen level on, against a hand enumeration; and a training run that uses it."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.model.loss import history_unlikelihood
from neo_jax.vocab import EntityType, VocabLayout

OPEN, CLOSE = 1, 2
CODE_LEVELS = np.array([-1] * 4 + [0] * 4 + [1] * 4 + [2] * 4, np.int32)  # ids 4-7 level 0, 8-11 level 1, 12-15 level 2
A, B, C = (4, 8, 12), (5, 9, 13), (4, 8, 14)  # C shares A's first two codes; B shares nothing


def sid(codes):
    return [OPEN, *codes, CLOSE]


# targets of one row: A B C in segment 1, then A' = A's codes again in segment 2 (another sequence)
TARGETS = np.array([sid(A) + sid(B) + sid(C) + sid(A)], np.int32)  # [1, 20]
SEGMENTS = np.array([[1] * 15 + [2] * 5], np.int32)


def penalty(log_probs, position, token):
    return -np.log1p(-np.exp(log_probs[0, position, token]))


@pytest.mark.parametrize("from_level, expected_pairs", [
    (2, [(13, 12)]),  # at C's last code (position 13): A's last code, the only earlier item with C's prefix
    (1, [(13, 12)]),  # at C's second code, A's second code is C's own: nothing more
    (0, [(6, 4), (11, 5), (13, 12)]),  # first codes: at B, A's 4; at C, B's 5 (A's 4 is C's own)
])
def test_penalises_exactly_the_codes_of_earlier_items_with_the_same_prefix(from_level, expected_pairs):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, TARGETS.shape[1], 16)).astype(np.float32)  # [1, len, vocab]
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    weights = np.ones(TARGETS.shape, np.float32)
    got = history_unlikelihood(jnp.asarray(logits), jnp.asarray(TARGETS), jnp.asarray(weights),
                               jnp.asarray(SEGMENTS), CODE_LEVELS, from_level)
    expected = sum(penalty(log_probs, i, t) for i, t in expected_pairs)  # segment 2's A repeats nothing
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_positions_outside_the_loss_are_not_penalised():
    logits = jnp.zeros((1, TARGETS.shape[1], 16))
    weights = np.ones(TARGETS.shape, np.float32)
    weights[0, 13] = 0.0  # C's last code is prompt, not completion
    assert float(history_unlikelihood(logits, jnp.asarray(TARGETS), jnp.asarray(weights), jnp.asarray(SEGMENTS),
                                      CODE_LEVELS, 2)) == 0.0


def test_code_level_table_follows_the_layout():
    layout = VocabLayout(text_size=5, entity_types=(EntityType("product", (3, 2)), EntityType("brand", (2,))),
                         pad_multiple=8)
    table = layout.code_level_table()
    assert table.shape == (layout.padded_size,)
    for token in range(layout.padded_size):
        expected = (layout.decode_sid_token(token)[1] if layout.sid_start <= token < layout.sid_end else -1)
        assert table[token] == expected


def test_a_training_run_with_unlikelihood_logs_it(tmp_path):
    from neo_jax.train.trainer import train
    from train_fixtures import tiny_config, write_catalog_dataset

    records, _ = write_catalog_dataset(tmp_path)
    result = train(tiny_config(tmp_path, "run", ("steps=3", "seq_len=128", "unlikelihood=1.0",
                                                 "unlikelihood_from_level=0", "log_every=1")))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    penalties = [m["unlikelihood"] for m in logged if "unlikelihood" in m]
    assert len(penalties) == 3 and all(np.isfinite(p) and p >= 0 for p in penalties) and result.final_dir


def test_avoided_spans_penalise_their_codes_from_the_level_on():
    from neo_jax.model.loss import avoided_unlikelihood

    rng = np.random.default_rng(1)
    targets = np.array([sid(A) + sid(B)], np.int32)  # [1, 10]: B is the avoided span
    avoided = np.array([[0] * 5 + [1] * 5], np.float32)
    logits = rng.normal(size=(1, 10, 16)).astype(np.float32)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for from_level, positions in [(0, (6, 7, 8)), (1, (7, 8)), (2, (8,))]:  # B's codes sit at 6, 7, 8
        got = avoided_unlikelihood(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(avoided), CODE_LEVELS,
                                   from_level)
        assert float(got) == pytest.approx(sum(penalty(log_probs, i, targets[0, i]) for i in positions), rel=1e-5)


@pytest.mark.parametrize("chunk", [0, 4])
def test_a_negative_loss_mask_is_penalised_not_learned(chunk):
    from neo_jax.model.loss import HistoryPenalty, avoided_unlikelihood, completion_loss_sums, masked_cross_entropy

    rng = np.random.default_rng(2)
    targets = jnp.asarray(TARGETS[:, :15])  # A B C, one segment
    segments = jnp.ones_like(targets)
    mask = np.ones(targets.shape, np.float32)
    mask[0, 10:] = -1.0  # C is the avoided span
    hidden = jnp.asarray(rng.normal(size=(1, 15, 16)).astype(np.float32))
    logits_of = lambda h: h * 2.0  # the "head": hidden states as logits
    loss, weight, repeats = completion_loss_sums(hidden, logits_of, targets, jnp.asarray(mask), segments, chunk,
                                                 HistoryPenalty(CODE_LEVELS, 1, avoided_from_level=2))
    learned = np.where(mask > 0, mask, 0.0)
    mean, total = masked_cross_entropy(logits_of(hidden), targets, jnp.asarray(learned))
    assert float(weight) == 10.0 and float(loss) == pytest.approx(float(mean * total), rel=1e-5)
    expected = (history_unlikelihood(logits_of(hidden), targets, jnp.asarray(learned), segments, CODE_LEVELS, 1)
                + avoided_unlikelihood(logits_of(hidden), targets, jnp.asarray(np.maximum(-mask, 0)), CODE_LEVELS, 2))
    assert float(repeats) == pytest.approx(float(expected), rel=1e-5) and float(repeats) > 0
