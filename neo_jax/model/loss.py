"""Masked next-token cross-entropy, the training objective of every stage, and the unlikelihood terms
against repeats: the history term (codes naming an earlier item of the sequence, where the target
shares their prefix) and the avoided-span term (the codes of an item written after a window as an
avoided continuation, `neo_jax.tasks.builders.TaskConfig.avoid_repeats`)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


def masked_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Weighted mean of `-log p(targets)` and the total weight.

    `logits` `[batch, len, vocab]`; `targets` `[batch, len]` int32, where `targets[b, i]` is
    the token that should follow input token `i` (the caller shifts); `weights`
    `[batch, len]` (0 for prompt, padding and segment-boundary positions). A batch with
    zero total weight gives loss 0.
    """
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)  # [batch, len]
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    return jnp.sum(nll * weights) / jnp.maximum(total, 1.0), total


def _unlikely(log_probs: jax.Array) -> jax.Array:
    """`-log(1 - p)` of log-probabilities, clipped where p is near 1."""
    return -jnp.log(jnp.clip(-jnp.expm1(log_probs), 1e-6, None))


def history_unlikelihood(logits: jax.Array, targets: jax.Array, weights: jax.Array, segment_ids: jax.Array,
                         code_levels: np.ndarray, from_level: int, start: jax.Array | int = 0,
                         log_normaliser: jax.Array | None = None) -> jax.Array:
    """Sum of `-log(1 - p(token))` over the SID codes that would name an item already in the sequence.

    Unlikelihood training (Welleck et al., 2019) against repeats, at the level of items: where
    `targets[b, i]` is an item's code at level k >= `from_level`, every earlier item of the same
    segment whose first k codes equal the target item's first k codes has its level-k code
    penalised at position i (unless it is the target's own code). From the last level, that
    penalised code names exactly the earlier item; coarser levels would push away whole subtrees
    of similar items. `code_levels` `[vocab]` (a host array) is each token's SID level (-1: not a SID code);
    `targets`, `weights`, `segment_ids` `[batch, len]`; `logits` `[batch, chunk, vocab]` are those of
    positions `start .. start + chunk - 1` (all of them by default), `log_normaliser` `[batch,
    chunk]` their logsumexp where the caller has it; positions whose weight is not positive are not
    penalised. The caller shifts, as for `masked_cross_entropy`.
    """
    length, chunk = targets.shape[1], logits.shape[1]
    rows = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # the query positions i
    level = jnp.asarray(code_levels, jnp.int32)[targets]  # [batch, len]
    query_level, query_targets = rows(level), rows(targets)  # [batch, chunk]
    query_segments = rows(segment_ids)
    pairs = ((query_level[:, :, None] == level[:, None, :]) & (query_level[:, :, None] >= from_level)
             & (query_segments[:, :, None] == segment_ids[:, None, :]) & (query_segments[:, :, None] > 0)
             & (query_targets[:, :, None] != targets[:, None, :]) & (rows(weights)[:, :, None] > 0)
             & ((start + jnp.arange(chunk))[None, :, None] > jnp.arange(length)[None, None, :]))  # [batch, chunk, len]
    for distance in range(1, int(code_levels.max()) + 1):  # the item prefixes agree on their first `level` codes
        before = jnp.pad(targets, ((0, 0), (distance, 0)), constant_values=-1)[:, :length]  # [batch, len]
        pairs &= (query_level[:, :, None] < distance) | (rows(before)[:, :, None] == before[:, None, :])
    logits = logits.astype(jnp.float32)
    candidates = jnp.broadcast_to(targets[:, None, :], pairs.shape)  # [batch, chunk, len] token ids
    candidate_logits = jnp.take_along_axis(logits, candidates, axis=2)  # [batch, chunk, len]
    if log_normaliser is None:
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)  # [batch, chunk]
    candidate_log_probs = candidate_logits - log_normaliser[:, :, None]  # [batch, chunk, len]
    return jnp.sum(jnp.where(pairs, _unlikely(candidate_log_probs), 0.0))


def avoided_unlikelihood(logits: jax.Array, targets: jax.Array, avoided: jax.Array, code_levels: np.ndarray,
                         from_level: int, log_normaliser: jax.Array | None = None) -> jax.Array:
    """Sum of `-log(1 - p(target))` where `avoided` > 0 and the target is a SID code at level >= `from_level`.

    An avoided span is an item the sequence already holds, written after its last item (the loss
    mask marks its targets -1, `neo_jax.tasks.pipeline`): a beam search that takes such an item's
    first code reaches exactly that state, which the next-item targets never visit when they do
    not share the code. `logits` `[batch, len, vocab]`, `targets` and `avoided` `[batch, len]`,
    `log_normaliser` `[batch, len]` (the logits' logsumexp, computed here when not given),
    `code_levels` as for `history_unlikelihood`.
    """
    level = jnp.asarray(code_levels, jnp.int32)[targets]  # [batch, len]
    penalised = (avoided > 0) & (level >= from_level)  # [batch, len]
    logits = logits.astype(jnp.float32)
    if log_normaliser is None:
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)  # [batch, len]
    log_probs = jnp.take_along_axis(logits, targets[:, :, None], axis=2)[:, :, 0] - log_normaliser  # [batch, len]
    return jnp.sum(jnp.where(penalised, _unlikely(log_probs), 0.0))


@dataclasses.dataclass(frozen=True)
class HistoryPenalty:
    """Where the unlikelihood terms look: each token's SID level and the first penalised level of
    `history_unlikelihood` and of `avoided_unlikelihood`."""

    code_levels: np.ndarray  # [vocab] SID level of each token id, -1 elsewhere
    from_level: int
    avoided_from_level: int = 2


def completion_loss_sums(hidden: jax.Array, logits_of: Callable[[jax.Array], jax.Array], targets: jax.Array,
                         weights: jax.Array, segment_ids: jax.Array, chunk: int = 0,
                         penalty: HistoryPenalty | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(sum of weighted -log p(targets), total learned weight, sum of the unlikelihood penalties)` of a batch.

    `hidden` `[batch, len, embed]` are the final hidden states and `logits_of` the output head
    (`[batch, n, embed]` -> float32 `[batch, n, vocab]`). With `chunk` > 0 and shorter than the
    sequence, the head runs on `chunk` positions at a time inside `lax.scan` under
    `jax.checkpoint`: the float32 logits of one chunk exist at once, forward and backward, instead
    of `[batch, len, vocab]` (the sequence is padded to a multiple of `chunk` with weight 0). The
    sums are those of the whole computation up to float rounding. Without `penalty` its sum is 0.
    """
    batch, length = targets.shape
    weights = weights.astype(jnp.float32)
    learned, avoided = jnp.maximum(weights, 0.0), jnp.maximum(-weights, 0.0)  # [batch, len]

    def sums(hidden_rows, start):  # the positions start .. start + rows - 1
        rows = hidden_rows.shape[1]
        logits = logits_of(hidden_rows)  # [batch, rows, vocab]
        row = lambda x: jax.lax.dynamic_slice_in_dim(x, start, rows, axis=1)
        mean, total = masked_cross_entropy(logits, row(targets), row(learned))
        if penalty is None:
            return mean * total, jnp.zeros((), jnp.float32)
        log_normaliser = jax.nn.logsumexp(logits, axis=-1)  # [batch, rows]
        repeats = (history_unlikelihood(logits, targets, learned, segment_ids, penalty.code_levels,
                                        penalty.from_level, start, log_normaliser)
                   + avoided_unlikelihood(logits, row(targets), row(avoided), penalty.code_levels,
                                          penalty.avoided_from_level, log_normaliser))
        return mean * total, repeats

    if not 0 < chunk < length:
        loss, repeats = sums(hidden, 0)
        return loss, jnp.sum(learned), repeats
    padded = -(-length // chunk) * chunk
    pad = ((0, 0), (0, padded - length))
    targets, learned, avoided, segment_ids = (jnp.pad(x, pad) for x in (targets, learned, avoided, segment_ids))
    hidden = jnp.pad(hidden, pad + ((0, 0),))
    chunks = hidden.reshape(batch, padded // chunk, chunk, hidden.shape[-1]).swapaxes(0, 1)  # [n, batch, chunk, embed]
    chunk_sums = jax.checkpoint(sums)

    def step(total, indexed):
        index, hidden_rows = indexed
        loss, repeats = chunk_sums(hidden_rows, index * chunk)
        return (total[0] + loss, total[1] + repeats), None
    zero = jnp.zeros((), jnp.float32)
    (loss, repeats), _ = jax.lax.scan(step, (zero, zero), (jnp.arange(padded // chunk), chunks))
    return loss, jnp.sum(learned), repeats
