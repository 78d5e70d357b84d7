"""Masked next-token cross-entropy, the training objective of every stage."""

from __future__ import annotations

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


def history_unlikelihood(logits: jax.Array, targets: jax.Array, weights: jax.Array, segment_ids: jax.Array,
                         code_levels: np.ndarray, from_level: int) -> jax.Array:
    """Sum of `-log(1 - p(token))` over the SID codes that would name an item already in the sequence.

    Unlikelihood training (Welleck et al., 2019) against repeats, at the level of items: where
    `targets[b, i]` is an item's code at level k >= `from_level`, every earlier item of the same
    segment whose first k codes equal the target item's first k codes has its level-k code
    penalised at position i (unless it is the target's own code). From the last level, that
    penalised code names exactly the earlier item; coarser levels would push away whole subtrees
    of similar items. `code_levels` `[vocab]` (a host array) is each token's SID level (-1: not a SID code);
    `logits` `[batch, len, vocab]`, `targets`, `weights`, `segment_ids` `[batch, len]`; positions
    with weight 0 are not penalised. The caller shifts, as for `masked_cross_entropy`.
    """
    length = targets.shape[1]
    level = jnp.asarray(code_levels, jnp.int32)[targets]  # [batch, len]
    pairs = ((level[:, :, None] == level[:, None, :]) & (level[:, :, None] >= from_level)  # [batch, len(i), len(m)]
             & (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, :, None] > 0)
             & (targets[:, :, None] != targets[:, None, :]) & (weights[:, :, None] > 0)
             & (jnp.arange(length)[None, :, None] > jnp.arange(length)[None, None, :]))
    for distance in range(1, int(code_levels.max()) + 1):  # the item prefixes agree on their first `level` codes
        before = jnp.pad(targets, ((0, 0), (distance, 0)), constant_values=-1)[:, :length]  # [batch, len]
        pairs &= (level[:, :, None] < distance) | (before[:, :, None] == before[:, None, :])
    logits = logits.astype(jnp.float32)
    candidates = jnp.broadcast_to(targets[:, None, :], pairs.shape)  # [batch, len(i), len(m)] token ids
    candidate_logits = jnp.take_along_axis(logits, candidates, axis=2)  # [batch, len(i), len(m)]
    log_normaliser = jax.nn.logsumexp(logits, axis=-1)  # [batch, len]
    candidate_log_probs = candidate_logits - log_normaliser[:, :, None]  # [batch, len(i), len(m)]
    penalty = -jnp.log(jnp.clip(-jnp.expm1(candidate_log_probs), 1e-6, None))  # -log(1 - p)
    return jnp.sum(jnp.where(pairs, penalty, 0.0))
