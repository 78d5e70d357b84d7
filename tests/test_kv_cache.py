"""Cached incremental decoding and packed/padded attention agree with a plain full forward pass."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from neo_jax.model.config import Llama3RopeScaling, ModelConfig
from neo_jax.model.kv_cache import SharedPromptCache
from neo_jax.model.layers import Dropout

CONFIGS = {
    "qwen3_gqa": ModelConfig(architecture="Qwen3ForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=96,
                             num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32),
    "llama_mqa_llama3": ModelConfig(architecture="LlamaForCausalLM", vocab_size=300, hidden_size=64,
                                    intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                                    rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 16)),
}
PROMPT_LENGTHS = (7, 3, 5)
NEW_TOKENS = 4


forward = nnx.jit(lambda model, tokens, positions, segments, cache: model(tokens, positions, segments, cache))


def plain_forward(model, sequences):
    """Per sequence `[len_i]`, its logits `[len_i, vocab]` from a plain causal forward pass.

    The sequences are right padded into one batch with no segment ids: by causality a
    token never sees the pads after it, so this reference needs no masking at all.
    """
    length = max(len(s) for s in sequences)
    tokens = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    logits, _ = forward(model, tokens, positions, None, None)
    return [np.asarray(logits[row, : len(seq)]) for row, seq in enumerate(sequences)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_incremental_decoding_matches_full_forward(name, random_decoder):
    model = random_decoder(CONFIGS[name])
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 300, p + NEW_TOKENS) for p in PROMPT_LENGTHS]
    padded_len = max(PROMPT_LENGTHS)

    # left-padded prompt batch: pads get segment 0, positions count from each prompt's first token
    prompt = np.zeros((len(sequences), padded_len), np.int32)
    segments = np.zeros_like(prompt)
    positions = np.zeros_like(prompt)
    for row, (seq, p) in enumerate(zip(sequences, PROMPT_LENGTHS)):
        prompt[row, padded_len - p:] = seq[:p]
        segments[row, padded_len - p:] = 1
        positions[row, padded_len - p:] = np.arange(p)

    cache = model.init_cache(len(sequences), padded_len + NEW_TOKENS)
    prefill_logits, cache = forward(model, prompt, positions, segments, cache)
    step_logits = []
    for i in range(NEW_TOKENS):
        next_tokens = np.array([[seq[p + i]] for seq, p in zip(sequences, PROMPT_LENGTHS)], np.int32)
        next_positions = np.array([[p + i] for p in PROMPT_LENGTHS], np.int32)
        logits, cache = forward(model, next_tokens, next_positions, None, cache)
        step_logits.append(np.asarray(logits[:, 0]))
    assert np.all(np.asarray(cache.end) == padded_len + NEW_TOKENS)

    uncached_logits, _ = forward(model, prompt, positions, segments, None)
    references = plain_forward(model, sequences)  # per row [p + NEW_TOKENS, vocab]
    for row, (reference, p) in enumerate(zip(references, PROMPT_LENGTHS)):
        np.testing.assert_allclose(np.asarray(prefill_logits)[row, padded_len - p:], reference[:p], rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(uncached_logits)[row, padded_len - p:], reference[:p], rtol=0, atol=1e-5)
        for i in range(NEW_TOKENS):
            np.testing.assert_allclose(step_logits[i][row], reference[p + i], rtol=0, atol=1e-5)


def test_packed_sequences_never_attend_across_examples(random_decoder):
    model = random_decoder(CONFIGS["qwen3_gqa"], seed=2)
    first, second = np.arange(10, 15), np.arange(100, 108)
    packed = np.concatenate([first, second, [0, 0, 0]])[None].astype(np.int32)  # [1, 16] with 3 trailing pads
    segments = np.array([[1] * 5 + [2] * 8 + [0] * 3], np.int32)
    positions = np.array([list(range(5)) + list(range(8)) + [0] * 3], np.int32)
    logits, _ = forward(model, packed, positions, segments, None)
    first_alone, second_alone = plain_forward(model, [first, second])
    np.testing.assert_allclose(np.asarray(logits[0, :5]), first_alone, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits[0, 5:13]), second_alone, rtol=0, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(logits)))  # padding queries see no key, yet stay finite


def test_cache_leaves_are_batch_major_so_beams_can_be_gathered(random_decoder):
    model = random_decoder(CONFIGS["llama_mqa_llama3"], seed=3)
    cache = model.init_cache(batch=3, max_len=9)
    positions = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32), (3, 2))
    _, cache = forward(model, jnp.ones((3, 2), jnp.int32), positions, None, cache)
    reordered = jax.tree.map(lambda leaf: leaf[jnp.array([2, 2, 0])], cache)
    assert all(leaf.shape[0] == 3 for leaf in jax.tree.leaves(reordered))
    assert len(cache.keys) == model.config.num_layers
    assert cache.keys[0].shape == (3, 9, 1, 16)


def test_bfloat16_compute_tracks_float32(random_decoder):
    config = CONFIGS["qwen3_gqa"]
    model32 = random_decoder(config, seed=4)
    model16 = random_decoder(dataclasses.replace(config, dtype="bfloat16"), seed=4)  # same float32 params
    assert model16.init_cache(1, 4).keys[0].dtype == jnp.bfloat16
    assert model16.embed_tokens.get_value().dtype == jnp.float32
    sequence = np.arange(20, 32)
    (reference,), (low_precision,) = plain_forward(model32, [sequence]), plain_forward(model16, [sequence])
    assert low_precision.dtype == np.float32
    assert np.abs(low_precision - reference).max() < 0.05 * np.abs(reference).max()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_shared_prompt_cache_matches_a_cache_per_sequence(name, random_decoder):
    """Beams reading their request's prompt once score exactly as beams that each copy the prompt."""
    model = random_decoder(CONFIGS[name], seed=5)
    rng = np.random.default_rng(5)
    width, padded_len = 3, max(PROMPT_LENGTHS)
    prompt = np.zeros((len(PROMPT_LENGTHS), padded_len), np.int32)
    segments, positions = np.zeros_like(prompt), np.zeros_like(prompt)
    for row, p in enumerate(PROMPT_LENGTHS):
        prompt[row, padded_len - p:] = rng.integers(0, 300, p)
        segments[row, padded_len - p:] = 1
        positions[row, padded_len - p:] = np.arange(p)
    # [requests*width, NEW_TOKENS]: each sequence of a request continues differently
    continuations = rng.integers(0, 300, (len(PROMPT_LENGTHS) * width, NEW_TOKENS)).astype(np.int32)
    step_positions = np.repeat(np.array(PROMPT_LENGTHS, np.int32), width)[:, None]  # [requests*width, 1]

    per_sequence = model.init_cache(len(PROMPT_LENGTHS), padded_len + NEW_TOKENS)
    _, per_sequence = forward(model, prompt, positions, segments, per_sequence)
    per_sequence = jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), per_sequence)
    prompt_only = model.init_cache(len(PROMPT_LENGTHS), padded_len)
    _, prompt_only = forward(model, prompt, positions, segments, prompt_only)
    shared = SharedPromptCache.after_prefill(prompt_only, NEW_TOKENS).repeat_sequences(width)
    assert shared.width == width and shared.prompt.keys[0].shape[0] == len(PROMPT_LENGTHS)
    for i in range(NEW_TOKENS):
        expected, per_sequence = forward(model, continuations[:, i:i + 1], step_positions + i, None, per_sequence)
        got, shared = forward(model, continuations[:, i:i + 1], step_positions + i, None, shared)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=1e-5)
    # reordering sequences gathers only their own generated tokens
    rows = jnp.array([2, 0, 0, 3, 5, 4, 8, 8, 6])
    reordered = shared.take_sequences(rows)
    assert reordered.prompt is shared.prompt
    np.testing.assert_array_equal(np.asarray(reordered.generated.keys[0]), np.asarray(shared.generated.keys[0])[rows])


def test_dropout_is_seeded_by_its_key_and_off_without_one(random_decoder):
    model = random_decoder(CONFIGS["qwen3_gqa"], seed=6)
    tokens = np.arange(40, 56, dtype=np.int32)[None]  # [1, 16]
    positions = np.arange(16, dtype=np.int32)[None]
    run = nnx.jit(lambda model, dropout: model(tokens, positions, None, None, dropout)[0])
    plain = np.asarray(run(model, None))
    np.testing.assert_array_equal(np.asarray(run(model, Dropout(jax.random.key(0), rate=0.0))), plain)
    first = np.asarray(run(model, Dropout(jax.random.key(1), rate=0.3)))
    np.testing.assert_array_equal(np.asarray(run(model, Dropout(jax.random.key(1), rate=0.3))), first)
    other = np.asarray(run(model, Dropout(jax.random.key(2), rate=0.3)))
    assert not np.allclose(first, plain, atol=1e-3) and not np.allclose(first, other, atol=1e-3)


def test_dropout_keeps_values_in_expectation():
    x = jnp.ones((200, 500), jnp.float32)
    dropped = np.asarray(Dropout(jax.random.key(0), rate=0.25)(x, site=3))
    np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs(float((dropped == 0).mean()) - 0.25) < 0.01 and abs(float(dropped.mean()) - 1.0) < 0.02
