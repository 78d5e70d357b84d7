"""Masked next-token cross-entropy, the training objective of every stage."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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
