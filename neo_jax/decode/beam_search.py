"""Beam search as one `lax.while_loop` over a state dataclass, in the style of t5x `decoding.py`.

Each step takes the top `2 * beams` candidates over every (beam, token) pair, so even when the
best `beams` candidates all end with EOS, `beams` live ones remain. An EOS candidate finishes a
sequence only if it ranks among the best `beams` (as in HF transformers), so one beam is greedy.
Finished sequences are ranked by log-probability over the length penalty
`((5 + length) / 6) ** alpha`. The loop stops when every request has `beams` finished sequences
and no live beam can beat the worst of them (its log-probability can only fall, and the penalty
is largest at `max_new_tokens`), or when no live beam is left. The constraint masks candidates
before the top-k, and a candidate it calls complete finishes as one ending with EOS does; its per-beam state is gathered with the beams and the KV cache. Call inside
`jax.jit`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax import lax

from neo_jax.decode.constraint import Constraint
from neo_jax.decode.state import (NEG_INF, DecodeResult, PyTree, TokensToLogits, expand_beams, gather_beams,
                                  gather_flat_beams, is_alive, next_token_log_probs)
from neo_jax.errors import UserError


@flax.struct.dataclass
class BeamState:
    step: jax.Array  # [] int32: tokens generated so far
    last_tokens: jax.Array  # [batch, beams] int32: the token each live beam feeds next
    live_tokens: jax.Array  # [batch, beams, max_new_tokens] int32
    live_log_probs: jax.Array  # [batch, beams] float32, best first
    live_cache: PyTree  # leaves [batch*beams, ...]
    live_constraint: PyTree  # leaves [batch, beams, ...]
    finished_tokens: jax.Array  # [batch, beams, max_new_tokens] int32
    finished_lengths: jax.Array  # [batch, beams] int32
    finished_log_probs: jax.Array  # [batch, beams] float32
    finished_scores: jax.Array  # [batch, beams] float32, best first; NEG_INF in empty slots
    finished_flags: jax.Array  # [batch, beams] bool: the slot holds a finished sequence


def brevity_penalty(alpha: float, length: jax.Array) -> jax.Array:
    """The length penalty of GNMT / t5x: a finished sequence scores `log_prob / penalty`."""
    return ((5.0 + length) / 6.0) ** alpha


def check_beam_settings(beam_size: int, max_new_tokens: int, alpha: float) -> None:
    if beam_size < 1:
        raise UserError(f"beam size must be >= 1, got {beam_size}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if alpha < 0:
        raise UserError(f"length penalty alpha must be >= 0, got {alpha}")


def beam_search(tokens_to_logits: TokensToLogits, cache: PyTree, last_prompt_token: jax.Array,
                prompt_lengths: jax.Array, *, constraint: Constraint, beam_size: int, max_new_tokens: int,
                eos_id: int, alpha: float = 0.0, last_prompt_item: jax.Array | None = None) -> DecodeResult:
    """The `beam_size` best continuations of each prompt, best first.

    `cache`: leaves `[batch, ...]` holding each prompt's first `prompt_lengths - 1` tokens;
    `last_prompt_token` `[batch]` int32; `prompt_lengths` `[batch]` int32; `last_prompt_item` `[batch]`
    int32 the item id of the last prompt token (`neo_jax.decode.state`; None: 0). A request with no
    finished sequence gets its live beams back (`finished` False).
    """
    check_beam_settings(beam_size, max_new_tokens, alpha)
    batch, beams = last_prompt_token.shape[0], beam_size
    if last_prompt_item is None:
        last_prompt_item = jnp.zeros((batch,), jnp.int32)
    shape = (batch, beams)
    first_beam_only = jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF).astype(jnp.float32)  # [beams]
    init = BeamState(
        step=jnp.zeros((), jnp.int32),
        last_tokens=jnp.broadcast_to(last_prompt_token.astype(jnp.int32)[:, None], shape),  # [batch, beams]
        live_tokens=jnp.zeros(shape + (max_new_tokens,), jnp.int32),  # [batch, beams, max_new_tokens]
        live_log_probs=jnp.broadcast_to(first_beam_only, shape),  # [batch, beams]
        live_cache=expand_beams(cache, beams),  # leaves [batch*beams, ...]
        live_constraint=constraint.init_state(batch, beams),
        finished_tokens=jnp.zeros(shape + (max_new_tokens,), jnp.int32),  # [batch, beams, max_new_tokens]
        finished_lengths=jnp.zeros(shape, jnp.int32),  # [batch, beams]
        finished_log_probs=jnp.full(shape, NEG_INF),  # [batch, beams]
        finished_scores=jnp.full(shape, NEG_INF),  # [batch, beams]
        finished_flags=jnp.zeros(shape, bool),  # [batch, beams]
    )

    def not_done(state: BeamState) -> jax.Array:
        best_live = state.live_log_probs[:, 0]  # [batch]
        best_possible = best_live / brevity_penalty(alpha, max_new_tokens)  # [batch]
        worst_finished = state.finished_scores[:, -1]  # [batch]
        settled = jnp.all(state.finished_flags, axis=1) & (worst_finished > best_possible)  # [batch]
        done = settled | ~is_alive(best_live)  # [batch]
        return (state.step < max_new_tokens) & ~jnp.all(done)

    def step(state: BeamState) -> BeamState:
        log_probs, allowed, new_cache = next_token_log_probs(
            tokens_to_logits, state.last_tokens, state.live_cache, prompt_lengths, state.step, constraint,
            state.live_constraint, last_prompt_item)  # log_probs, allowed: [batch, beams, vocab]
        vocab = log_probs.shape[-1]
        log_probs = jnp.where(allowed, log_probs, NEG_INF)  # [batch, beams, vocab]
        sequence_log_probs = state.live_log_probs[..., None] + log_probs  # [batch, beams, vocab]

        # The 2K best candidates over all (beam, token) pairs.
        top_log_probs, top_index = lax.top_k(sequence_log_probs.reshape(batch, beams * vocab), 2 * beams)
        parents = top_index // vocab  # [batch, 2*beams]
        top_tokens = top_index % vocab  # [batch, 2*beams]
        top_seqs = gather_beams(state.live_tokens, parents).at[:, :, state.step].set(top_tokens)
        top_constraint = constraint.advance(gather_beams(state.live_constraint, parents), top_tokens)
        # As in HF transformers, an EOS candidate counts only if it ranks among the best K, so that
        # one beam is greedy decoding; EOS candidates ranked lower are dropped.
        in_top_k = jnp.arange(2 * beams) < beams  # [2*beams]
        ends = (top_tokens == eos_id) | constraint.complete(top_constraint)  # [batch, 2*beams]
        newly_finished = ends & in_top_k & is_alive(top_log_probs)  # [batch, 2*beams]

        # Live: the K best candidates that did not end.
        live_log_probs, keep = lax.top_k(jnp.where(ends, NEG_INF, top_log_probs), beams)  # [batch, beams]
        live_parents = gather_beams(parents, keep)  # [batch, beams]

        # Finished: the K best of the old finished and the newly ended candidates.
        length = state.step + 1
        new_scores = jnp.where(newly_finished, top_log_probs / brevity_penalty(alpha, length), NEG_INF)
        pool_tokens = jnp.concatenate([state.finished_tokens, top_seqs], axis=1)  # [batch, 3*beams, max_new_tokens]
        pool_lengths = jnp.concatenate([state.finished_lengths, jnp.full(top_tokens.shape, length)], axis=1)
        pool_log_probs = jnp.concatenate(
            [state.finished_log_probs, jnp.where(newly_finished, top_log_probs, NEG_INF)], axis=1)  # [batch, 3*beams]
        pool_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)  # [batch, 3*beams]
        pool_flags = jnp.concatenate([state.finished_flags, newly_finished], axis=1)  # [batch, 3*beams]
        finished_scores, best = lax.top_k(pool_scores, beams)  # [batch, beams]
        finished_tokens, finished_lengths, finished_log_probs, finished_flags = gather_beams(
            (pool_tokens, pool_lengths, pool_log_probs, pool_flags), best)

        return BeamState(
            step=length,
            last_tokens=gather_beams(top_tokens, keep),  # [batch, beams]
            live_tokens=gather_beams(top_seqs, keep),  # [batch, beams, max_new_tokens]
            live_log_probs=live_log_probs,
            live_cache=gather_flat_beams(new_cache, live_parents, beams),  # leaves [batch*beams, ...]
            live_constraint=gather_beams(top_constraint, keep),
            finished_tokens=finished_tokens,
            finished_lengths=finished_lengths,
            finished_log_probs=finished_log_probs,
            finished_scores=finished_scores,
            finished_flags=finished_flags,
        )

    final = lax.while_loop(not_done, step, init)

    # A request with no finished sequence returns its live beams.
    any_finished = jnp.any(final.finished_flags, axis=1, keepdims=True)  # [batch, 1]
    live_scores = jnp.where(is_alive(final.live_log_probs),
                            final.live_log_probs / brevity_penalty(alpha, final.step), NEG_INF)  # [batch, beams]
    return DecodeResult(
        tokens=jnp.where(any_finished[..., None], final.finished_tokens, final.live_tokens),
        lengths=jnp.where(any_finished, final.finished_lengths, final.step),  # [batch, beams]
        log_probs=jnp.where(any_finished, final.finished_log_probs, final.live_log_probs),  # [batch, beams]
        scores=jnp.where(any_finished, final.finished_scores, live_scores),  # [batch, beams]
        finished=final.finished_flags,  # [batch, beams]
        steps=final.step,
    )
