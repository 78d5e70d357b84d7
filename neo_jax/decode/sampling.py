"""Greedy decoding and sampling (temperature, top-k, top-p) as one `lax.while_loop`.

The constraint masks the model's log-probabilities before a token is chosen, so top-k and
top-p act among the allowed tokens. The recorded log-probability of a sequence is the model's
own (unmasked, untempered softmax), the number a full forward pass gives back.
Call these functions inside `jax.jit` (the model callback closes over traced parameters).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from neo_jax.decode.constraint import Constraint
from neo_jax.decode.state import (NEG_INF, DecodeResult, PyTree, TokensToLogits, expand_beams,
                                  next_token_log_probs)
from neo_jax.errors import UserError


@flax.struct.dataclass
class SamplingState:
    step: jax.Array  # [] int32: tokens generated so far
    last_tokens: jax.Array  # [batch, samples] int32: the token fed to the model next
    tokens: jax.Array  # [batch, samples, max_new_tokens] int32
    lengths: jax.Array  # [batch, samples] int32
    log_probs: jax.Array  # [batch, samples] float32
    ended: jax.Array  # [batch, samples] bool: took EOS or the constraint calls it complete
    cache: PyTree  # leaves [batch*samples, ...]
    constraint: PyTree  # leaves [batch, samples, ...]
    rng: jax.Array  # PRNG key


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
    """Keep the `k` largest logits of each row, set the rest to NEG_INF: `[..., vocab]`."""
    kth_largest = lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits >= kth_largest, logits, NEG_INF)  # [..., vocab]


def filter_top_p(logits: jax.Array, p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches `p`: `[..., vocab]`."""
    descending = -jnp.sort(-logits, axis=-1)  # [..., vocab]
    probs = jax.nn.softmax(descending, axis=-1)  # [..., vocab]
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # [..., vocab]
    smallest_kept = jnp.min(jnp.where(mass_before < p, descending, jnp.inf), axis=-1, keepdims=True)  # [..., 1]
    return jnp.where(logits >= smallest_kept, logits, NEG_INF)  # [..., vocab]


def choose_tokens(log_probs: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """One token per row from masked log-probabilities `[..., vocab]` -> `[...]` int32 (argmax at temperature 0)."""
    if temperature == 0.0:
        return jnp.argmax(log_probs, axis=-1).astype(jnp.int32)
    logits = log_probs / temperature  # [..., vocab]
    if top_k:
        logits = filter_top_k(logits, top_k)
    if top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_sampling_settings(temperature: float, top_k: int, top_p: float) -> None:
    if temperature < 0:
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")


def sample(tokens_to_logits: TokensToLogits, cache: PyTree, last_prompt_token: jax.Array,
           prompt_lengths: jax.Array, rng: jax.Array, *, constraint: Constraint, max_new_tokens: int, eos_id: int,
           num_samples: int = 1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           last_prompt_item: jax.Array | None = None) -> DecodeResult:
    """Draw `num_samples` continuations of each prompt.

    `cache`: leaves `[batch, ...]` holding each prompt's first `prompt_lengths - 1` tokens;
    `last_prompt_token` `[batch]` int32; `prompt_lengths` `[batch]` int32; `last_prompt_item` `[batch]`
    int32 the item id of the last prompt token (`neo_jax.decode.state`; None: 0).
    Returns a `DecodeResult` with a `samples` beam axis, in draw order.
    """
    check_sampling_settings(temperature, top_k, top_p)
    batch = last_prompt_token.shape[0]
    if last_prompt_item is None:
        last_prompt_item = jnp.zeros((batch,), jnp.int32)
    shape = (batch, num_samples)
    init = SamplingState(
        step=jnp.zeros((), jnp.int32),
        last_tokens=jnp.broadcast_to(last_prompt_token.astype(jnp.int32)[:, None], shape),  # [batch, samples]
        tokens=jnp.zeros(shape + (max_new_tokens,), jnp.int32),  # [batch, samples, max_new_tokens]
        lengths=jnp.zeros(shape, jnp.int32),  # [batch, samples]
        log_probs=jnp.zeros(shape, jnp.float32),  # [batch, samples]
        ended=jnp.zeros(shape, bool),  # [batch, samples]
        cache=expand_beams(cache, num_samples),  # leaves [batch*samples, ...]
        constraint=constraint.init_state(batch, num_samples),
        rng=rng,
    )

    def not_done(state: SamplingState) -> jax.Array:
        return (state.step < max_new_tokens) & ~jnp.all(state.ended)

    def step(state: SamplingState) -> SamplingState:
        log_probs, allowed, new_cache = next_token_log_probs(
            tokens_to_logits, state.last_tokens, state.cache, prompt_lengths, state.step, constraint,
            state.constraint, last_prompt_item)  # log_probs, allowed: [batch, samples, vocab]
        rng, key = jax.random.split(state.rng)
        chosen = choose_tokens(jnp.where(allowed, log_probs, NEG_INF), key, temperature, top_k, top_p)
        live = ~state.ended  # [batch, samples]
        chosen = jnp.where(live, chosen, 0)  # [batch, samples]
        chosen_log_probs = jnp.take_along_axis(log_probs, chosen[..., None], axis=-1)[..., 0]  # [batch, samples]
        constraint_state = constraint.advance(state.constraint, chosen)
        ends = (chosen == eos_id) | constraint.complete(constraint_state)  # [batch, samples]
        return SamplingState(
            step=state.step + 1,
            last_tokens=chosen,
            tokens=state.tokens.at[:, :, state.step].set(chosen),  # [batch, samples, max_new_tokens]
            lengths=state.lengths + live,  # [batch, samples]
            log_probs=state.log_probs + jnp.where(live, chosen_log_probs, 0.0),  # [batch, samples]
            ended=state.ended | (live & ends),  # [batch, samples]
            cache=new_cache,
            constraint=constraint_state,
            rng=rng,
        )

    final = lax.while_loop(not_done, step, init)
    return DecodeResult(tokens=final.tokens, lengths=final.lengths, log_probs=final.log_probs,
                        scores=final.log_probs, finished=final.ended, steps=final.step)


def greedy(tokens_to_logits: TokensToLogits, cache: PyTree, last_prompt_token: jax.Array,
           prompt_lengths: jax.Array, *, constraint: Constraint, max_new_tokens: int, eos_id: int) -> DecodeResult:
    """The most likely allowed token at every step (`sample` at temperature 0)."""
    return sample(tokens_to_logits, cache, last_prompt_token, prompt_lengths, jax.random.key(0),
                  constraint=constraint, max_new_tokens=max_new_tokens, eos_id=eos_id, temperature=0.0)
