"""Decoding loops against plain-Python references, with a tiny random causal-attention model.

The model (one attention layer, written here) has a real KV cache indexed by position, so a
beam search that gathered the cache wrongly would score beams with another beam's history.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neo_jax.decode.beam_search import beam_search, brevity_penalty
from neo_jax.decode.constraint import Unconstrained
from neo_jax.decode.sampling import filter_top_k, filter_top_p, greedy, sample
from neo_jax.decode.state import is_alive
from neo_jax.errors import UserError
from sid_fixtures import (EOS_ID, LAYOUT, TEXT_SIZE, ReferenceRules, allowed_rows_masks, build_constraint, catalogs,
                          item_masks, requests)

DIM = 16
CONTEXT = 16


def init_params(seed: int, vocab: int, layout) -> dict:
    keys = jax.random.split(jax.random.key(seed), 7)
    bias = 0.5 * jax.random.normal(keys[6], (vocab,))
    bias = bias.at[layout.sid_open_id].add(2.0).at[EOS_ID].add(1.0)  # spans and endings happen often
    return dict(
        embed=jax.random.normal(keys[0], (vocab, DIM)),
        pos=0.5 * jax.random.normal(keys[1], (CONTEXT, DIM)),
        wq=jax.random.normal(keys[2], (DIM, DIM)) / math.sqrt(DIM),
        wk=jax.random.normal(keys[3], (DIM, DIM)) / math.sqrt(DIM),
        wv=jax.random.normal(keys[4], (DIM, DIM)) / math.sqrt(DIM),
        head=2.0 * jax.random.normal(keys[5], (DIM, vocab)) / math.sqrt(DIM),
        bias=bias,
    )


def tokens_to_logits(params: dict, tokens: jax.Array, cache: dict, positions: jax.Array, item_ids: jax.Array):
    """One incremental step: tokens `[n, 1]`, cache `k`/`v` `[n, CONTEXT, DIM]`, positions `[n, 1]`
    (this model has no item identity: `item_ids` `[n, 1]` go unused)."""
    at = positions[:, 0]  # [n]
    x = params["embed"][tokens[:, 0]] + params["pos"][at]  # [n, DIM]
    rows = jnp.arange(x.shape[0])  # [n]
    k = cache["k"].at[rows, at].set(x @ params["wk"])  # [n, CONTEXT, DIM]
    v = cache["v"].at[rows, at].set(x @ params["wv"])  # [n, CONTEXT, DIM]
    scores = jnp.einsum("nd,nld->nl", x @ params["wq"], k) / math.sqrt(DIM)  # [n, CONTEXT]
    scores = jnp.where(jnp.arange(CONTEXT)[None, :] <= positions, scores, -jnp.inf)
    h = x + jnp.einsum("nl,nld->nd", jax.nn.softmax(scores, axis=-1), v)  # [n, DIM]
    return jnp.tanh(h) @ params["head"] + params["bias"], dict(k=k, v=v)  # [n, vocab]


def full_forward(params: dict, tokens: jax.Array):
    """The non-incremental pass over whole sequences `[n, CONTEXT]`: logits `[n, CONTEXT, vocab]`, and K/V."""
    x = params["embed"][tokens] + params["pos"][None]  # [n, CONTEXT, DIM]
    k, v = x @ params["wk"], x @ params["wv"]  # [n, CONTEXT, DIM]
    scores = jnp.einsum("nqd,nld->nql", x @ params["wq"], k) / math.sqrt(DIM)  # [n, CONTEXT, CONTEXT]
    causal = jnp.tril(jnp.ones((CONTEXT, CONTEXT), bool))
    scores = jnp.where(causal[None], scores, -jnp.inf)
    h = x + jnp.einsum("nql,nld->nqd", jax.nn.softmax(scores, axis=-1), v)  # [n, CONTEXT, DIM]
    return jnp.tanh(h) @ params["head"] + params["bias"], dict(k=k, v=v)


@jax.jit
def full_log_probs(params: dict, tokens: jax.Array) -> jax.Array:
    """`[n, CONTEXT]` -> `[n, CONTEXT, vocab]` next-token log-probabilities."""
    return jax.nn.log_softmax(full_forward(params, tokens)[0], axis=-1)


def padded(sequences: list[tuple[int, ...]]) -> np.ndarray:
    out = np.zeros((len(sequences), CONTEXT), np.int32)
    for i, seq in enumerate(sequences):
        out[i, : len(seq)] = seq
    return out


def sequence_log_prob(params: dict, prompt: tuple[int, ...], continuation: tuple[int, ...]) -> float:
    """Log-probability of `continuation` after `prompt` by one full forward pass."""
    log_probs = np.asarray(full_log_probs(params, padded([prompt + continuation])))[0]  # [CONTEXT, vocab]
    return float(sum(log_probs[len(prompt) - 1 + i, t] for i, t in enumerate(continuation)))


def prefill(params: dict, prompts: list[tuple[int, ...]]):
    """Cache holding each prompt (its last token is rewritten by the first decode step), last tokens, lengths."""
    _, cache = full_forward(params, jnp.asarray(padded(prompts)))
    last = jnp.array([p[-1] for p in prompts], jnp.int32)  # [batch]
    lengths = jnp.array([len(p) for p in prompts], jnp.int32)  # [batch]
    return cache, last, lengths


@functools.partial(jax.jit, static_argnames=("beam_size", "max_new_tokens", "alpha"))
def run_beam_search(params, cache, last, lengths, constraint, beam_size, max_new_tokens, alpha):
    return beam_search(functools.partial(tokens_to_logits, params), cache, last, lengths, constraint=constraint,
                       beam_size=beam_size, max_new_tokens=max_new_tokens, eos_id=EOS_ID, alpha=alpha)


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "num_samples", "temperature", "top_k", "top_p"))
def run_sample(params, cache, last, lengths, rng, constraint, max_new_tokens, num_samples=1, temperature=1.0,
               top_k=0, top_p=1.0):
    return sample(functools.partial(tokens_to_logits, params), cache, last, lengths, rng, constraint=constraint,
                  max_new_tokens=max_new_tokens, eos_id=EOS_ID, num_samples=num_samples, temperature=temperature,
                  top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def run_greedy(params, cache, last, lengths, constraint, max_new_tokens):
    return greedy(functools.partial(tokens_to_logits, params), cache, last, lengths, constraint=constraint,
                  max_new_tokens=max_new_tokens, eos_id=EOS_ID)


def reference_beam_search(params, prompt, next_tokens, beams: int, max_new_tokens: int, alpha: float):
    """Plain beam search over full forward passes: (finished [(score, log_prob, tokens)], live [(tokens, log_prob)])."""
    live, finished = [((), 0.0)], []
    for step in range(max_new_tokens):
        rows = [prompt + tokens for tokens, _ in live] + [prompt] * (beams - len(live))  # one compiled shape
        log_probs = np.asarray(full_log_probs(params, padded(rows)))
        candidates = [(lp + float(log_probs[i, len(prompt) + len(tokens) - 1, t]), tokens + (t,))
                      for i, (tokens, lp) in enumerate(live) for t in next_tokens(tokens)]
        top = sorted(candidates, key=lambda c: -c[0])[: 2 * beams]
        penalty = float(brevity_penalty(alpha, step + 1))
        finished += [(lp / penalty, lp, tokens) for lp, tokens in top[:beams] if tokens[-1] == EOS_ID]
        finished = sorted(finished, key=lambda f: -f[0])[:beams]
        live = [(tokens, lp) for lp, tokens in top if tokens[-1] != EOS_ID][:beams]
    return finished, live


def beam_rows(result, b: int):
    """The alive beams of request b as (tokens, log_prob, score, finished)."""
    rows = []
    for k in range(result.tokens.shape[1]):
        if bool(result.finished[b, k]) or bool(is_alive(result.scores[b, k])):
            length = int(result.lengths[b, k])
            rows.append((tuple(np.asarray(result.tokens[b, k, :length]).tolist()), float(result.log_probs[b, k]),
                         float(result.scores[b, k]), bool(result.finished[b, k])))
    return rows


def random_prompts(data, batch: int) -> list[tuple[int, ...]]:
    text = st.integers(2, TEXT_SIZE - 1)  # no EOS inside prompts
    return [tuple(data.draw(st.lists(text, min_size=1, max_size=3))) for _ in range(batch)]


def check_against_reference(params, prompts, result, next_tokens, beams, max_new_tokens, alpha) -> None:
    """The search's beams are the reference's, with the same scores; each log-probability is a full pass's."""
    for b, prompt in enumerate(prompts):
        finished, live = reference_beam_search(params, prompt, next_tokens[b], beams, max_new_tokens, alpha)
        got = beam_rows(result, b)
        if finished:
            assert [g[0] for g in got] == [f[2] for f in finished]
            assert all(g[3] for g in got)
            np.testing.assert_allclose([g[2] for g in got], [f[0] for f in finished], atol=1e-4, rtol=1e-5)
        else:
            assert [g[0] for g in got] == [tokens for tokens, _ in live]
            assert not any(g[3] for g in got)
        for tokens, log_prob, _, _ in got:
            assert log_prob == pytest.approx(sequence_log_prob(params, prompt, tokens), abs=1e-4)


@settings(max_examples=8, deadline=None, derandomize=True)
@given(st.data())
def test_constrained_beam_search_equals_a_plain_beam_search_over_the_reference_rules(data):
    """Random catalogs, requests (types, formats, exclusions, in-stock mask) and models: the jitted
    search finds the reference's beams, and every emitted SID is an allowed catalog item."""
    catalog = data.draw(catalogs())
    batch_requests = data.draw(st.lists(requests(catalog), min_size=2, max_size=2))
    # Two compiled variants: no length penalty and no in-stock mask, or both.
    restricted = data.draw(st.booleans())
    allowed_rows = data.draw(item_masks(catalog)) if restricted else None
    alpha = 0.8 if restricted else 0.0
    beams, max_new_tokens = 3, 7
    rules = [ReferenceRules(catalog, r, allowed_rows) for r in batch_requests]
    if any(r.output_format == "ids" and len(rule.items) < beams for r, rule in zip(batch_requests, rules)):
        with pytest.raises(UserError, match="larger than the"):
            build_constraint(catalog, batch_requests, allowed_rows, beams)
        return
    constraint = build_constraint(catalog, batch_requests, allowed_rows, beams)
    params = init_params(data.draw(st.integers(0, 2**16)), LAYOUT.padded_size, LAYOUT)
    prompts = random_prompts(data, 2)
    result = run_beam_search(params, *prefill(params, prompts), constraint, beams, max_new_tokens, alpha)
    check_against_reference(params, prompts, result, [rule.next_tokens for rule in rules], beams,
                            max_new_tokens, alpha)
    for b, rule in enumerate(rules):
        for tokens, *_ in beam_rows(result, b):
            rule.check(tokens)


@pytest.mark.parametrize("seed, alpha", [(0, 0.0), (1, 0.0), (2, 0.6)])
def test_unconstrained_beam_search_equals_a_plain_beam_search(seed, alpha):
    params = init_params(seed, LAYOUT.padded_size, LAYOUT)
    prompts = [(2, 3, 4), (5,)]
    result = run_beam_search(params, *prefill(params, prompts), Unconstrained(LAYOUT.size), 3, 7, alpha)
    every_real_token = [lambda _: range(LAYOUT.size)] * 2
    check_against_reference(params, prompts, result, every_real_token, 3, 7, alpha)
    assert int(result.tokens.max()) < LAYOUT.size  # padding rows are never emitted


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.data())
def test_beam_size_one_equals_greedy(data):
    catalog = data.draw(catalogs())
    batch_requests = data.draw(st.lists(requests(catalog, formats=("mixed", "text")), min_size=2, max_size=2))
    constraint = build_constraint(catalog, batch_requests, None, beam_size=1)
    params = init_params(data.draw(st.integers(0, 2**16)), LAYOUT.padded_size, LAYOUT)
    prefilled = prefill(params, random_prompts(data, 2))
    beam = run_beam_search(params, *prefilled, constraint, 1, 8, 0.0)
    best = run_greedy(params, *prefilled, constraint, 8)
    np.testing.assert_array_equal(beam.tokens, best.tokens)
    np.testing.assert_array_equal(beam.lengths, best.lengths)
    np.testing.assert_array_equal(beam.finished, best.finished)
    np.testing.assert_allclose(beam.log_probs, best.log_probs, atol=1e-5)


@settings(max_examples=5, deadline=None, derandomize=True)
@given(st.data())
def test_samples_obey_the_constraint_and_score_their_log_probability(data):
    catalog = data.draw(catalogs())
    batch_requests = data.draw(st.lists(requests(catalog, formats=("mixed", "text")), min_size=2, max_size=2))
    allowed_rows = data.draw(allowed_rows_masks(catalog))
    constraint = build_constraint(catalog, batch_requests, allowed_rows, beam_size=1)
    params = init_params(data.draw(st.integers(0, 2**16)), LAYOUT.padded_size, LAYOUT)
    prompts = random_prompts(data, 2)
    rng = jax.random.key(data.draw(st.integers(0, 2**16)))
    result = run_sample(params, *prefill(params, prompts), rng, constraint, 8, num_samples=4, top_k=6, top_p=0.95)
    for b, prompt in enumerate(prompts):
        rules = ReferenceRules(catalog, batch_requests[b], allowed_rows)
        for tokens, log_prob, _, finished in beam_rows(result, b):
            rules.check(tokens)
            assert finished == (tokens[-1] == EOS_ID) and EOS_ID not in tokens[:-1]
            assert log_prob == pytest.approx(sequence_log_prob(params, prompt, tokens), abs=1e-4)


@pytest.mark.parametrize("settings_kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(temperature=0.0)])
def test_sampling_collapses_to_greedy(settings_kwargs):
    params = init_params(3, LAYOUT.padded_size, LAYOUT)
    prefilled = prefill(params, [(2, 3), (4,)])
    constraint = Unconstrained(LAYOUT.size)
    sampled = run_sample(params, *prefilled, jax.random.key(7), constraint, 8, **settings_kwargs)
    best = run_greedy(params, *prefilled, constraint, 8)
    np.testing.assert_array_equal(sampled.tokens, best.tokens)


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))  # [1, 4]
    assert np.asarray(is_alive(filter_top_k(logits, 2))).tolist() == [[False, True, False, True]]
    assert np.asarray(is_alive(filter_top_p(logits, 0.5))).tolist() == [[False, True, False, True]]
    assert np.asarray(is_alive(filter_top_p(logits, 0.4))).tolist() == [[False, True, False, False]]
    assert np.asarray(is_alive(filter_top_p(logits, 1.0))).tolist() == [[True, True, True, True]]


@pytest.mark.parametrize("call, message", [
    (lambda run: run(beam_size=0), "beam size must be >= 1"),
    (lambda run: run(alpha=-1.0), "alpha must be >= 0"),
    (lambda run: run(max_new_tokens=0), "max_new_tokens must be >= 1"),
])
def test_bad_beam_settings_get_a_clear_error(call, message):
    def run(beam_size=2, alpha=0.0, max_new_tokens=4):
        beam_search(lambda *a: None, {}, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), constraint=Unconstrained(8),
                    beam_size=beam_size, max_new_tokens=max_new_tokens, eos_id=EOS_ID, alpha=alpha)

    with pytest.raises(UserError, match=message):
        call(run)


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(top_p=0.0), "top_p must be in \\(0, 1\\]"),
])
def test_bad_sampling_settings_get_a_clear_error(kwargs, message):
    with pytest.raises(UserError, match=message):
        sample(lambda *a: None, {}, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), jax.random.key(0),
               constraint=Unconstrained(8), max_new_tokens=4, eos_id=EOS_ID, **kwargs)
