"""SASRec (Kang & McAuley, 2018) in flax NNX, trained with full-softmax cross-entropy.

Items are fed as tokens `row + 1` (0 is padding); sequences are left-padded, so the last
position always holds the newest item. A position embedding counts the real items before
each one (the first real item is position 0), so the amount of padding never changes a
result. `blocks` pre-norm causal self-attention blocks (layer norm, attention, dropout,
position-wise feed-forward) end in a layer norm; an item's score is the hidden state's dot
product with the item's input embedding (tied weights).

Training predicts the next item at every position of a sequence with a softmax over the
whole catalog (the "well-tuned" cross-entropy SASRec, which beats the original binary loss
with one sampled negative by a wide margin).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from neo_jax.config import ConfigError

PADDING = 0  # token of an empty slot; item `row` is token `row + 1`

Params = nnx.State


@dataclasses.dataclass(frozen=True)
class SasRecConfig:
    max_len: int = 50  # newest items of a history the model reads
    hidden: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.5

    def __post_init__(self):
        for name in ("max_len", "hidden", "blocks", "heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise ConfigError(f"model.hidden ({self.hidden}) must be a multiple of model.heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")


class SelfAttentionBlock(nnx.Module):
    """`x + drop(attend(norm(x)))`, then `x + drop(ffn(norm(x)))`."""

    def __init__(self, config: SasRecConfig, rngs: nnx.Rngs):
        self.attention_norm = nnx.LayerNorm(config.hidden, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=config.heads, in_features=config.hidden,
                                                dropout_rate=config.dropout, decode=False, keep_rngs=False,
                                                rngs=rngs)
        self.feed_forward_norm = nnx.LayerNorm(config.hidden, rngs=rngs)
        self.feed_forward_in = nnx.Linear(config.hidden, config.hidden, rngs=rngs)
        self.feed_forward_out = nnx.Linear(config.hidden, config.hidden, rngs=rngs)
        self.dropout = nnx.Dropout(config.dropout)

    def __call__(self, x: jax.Array, mask: jax.Array, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        """`x` `[batch, len, hidden]`, `mask` `[batch, 1, len, len]` (query may see key) -> `[batch, len, hidden]`."""
        attended = self.attention(self.attention_norm(x), mask=mask, deterministic=deterministic, rngs=rngs)
        x = x + self.dropout(attended, deterministic=deterministic, rngs=rngs)
        inner = jax.nn.gelu(self.feed_forward_in(self.feed_forward_norm(x)))  # [batch, len, hidden]
        inner = self.dropout(inner, deterministic=deterministic, rngs=rngs)
        return x + self.dropout(self.feed_forward_out(inner), deterministic=deterministic, rngs=rngs)


class SasRec(nnx.Module):
    def __init__(self, num_items: int, config: SasRecConfig, rngs: nnx.Rngs):
        self.num_items = num_items
        self.hidden = config.hidden
        self.item_embedding = nnx.Embed(num_items + 1, config.hidden, rngs=rngs)  # row 0: padding
        self.position_embedding = nnx.Embed(config.max_len, config.hidden, rngs=rngs)
        self.embedding_dropout = nnx.Dropout(config.dropout)
        self.blocks = nnx.List([SelfAttentionBlock(config, rngs) for _ in range(config.blocks)])
        self.final_norm = nnx.LayerNorm(config.hidden, rngs=rngs)

    def __call__(self, tokens: jax.Array, deterministic: bool = True, rngs: nnx.Rngs | None = None) -> jax.Array:
        """Hidden states `[batch, len, hidden]` of left-padded `tokens` `[batch, len]`; position t sees
        only the real items at positions <= t. Padding positions hold zeros."""
        real = tokens != PADDING  # [batch, len]
        positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)  # [batch, len] real items before
        x = self.item_embedding(tokens) * jnp.sqrt(float(self.hidden)) + self.position_embedding(positions)
        x = self.embedding_dropout(x, deterministic=deterministic, rngs=rngs)  # [batch, len, hidden]
        mask = nnx.combine_masks(nnx.make_causal_mask(tokens),  # [batch, 1, len, len]
                                 nnx.make_attention_mask(jnp.ones_like(real), real))
        for block in self.blocks:
            x = block(x, mask, deterministic, rngs)
        return self.final_norm(x) * real[..., None]

    def item_scores(self, hidden: jax.Array) -> jax.Array:
        """`[..., hidden]` -> `[..., num_items]`: score of every catalog row."""
        return hidden @ self.item_embedding.embedding[1:].T


def item_tokens(rows: jax.Array) -> jax.Array:
    """Catalog rows (-1 for an empty slot) -> model tokens (0 for an empty slot)."""
    return jnp.where(rows >= 0, rows + 1, PADDING)


def next_item_loss(model: SasRec, inputs: jax.Array, targets: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    """Mean softmax cross-entropy over the whole catalog of every real target.

    `inputs` `[batch, len]` left-padded catalog rows (-1 padding); `targets` `[batch, len]` the
    catalog row that follows each position, -1 where there is none. Dropout is on when `rngs` is given."""
    hidden = model(item_tokens(inputs), deterministic=rngs is None, rngs=rngs)  # [batch, len, hidden]
    logits = model.item_scores(hidden)  # [batch, len, num_items]
    real = targets >= 0  # [batch, len]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(targets, 0))  # [batch, len]
    return jnp.sum(jnp.where(real, losses, 0.0)) / jnp.maximum(jnp.sum(real), 1)


TrainStep = Callable[[Params, optax.OptState, jax.Array, jax.Array, jax.Array],
                     tuple[Params, optax.OptState, jax.Array]]


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation) -> TrainStep:
    """`step(params, opt_state, inputs, targets, key) -> (params, opt_state, loss)`, jitted, with the
    arguments of `next_item_loss`; `key` drives dropout."""

    def loss_of(params: Params, inputs: jax.Array, targets: jax.Array, key: jax.Array) -> jax.Array:
        return next_item_loss(nnx.merge(graphdef, params), inputs, targets, nnx.Rngs(dropout=key))

    @jax.jit
    def step(params, opt_state, inputs, targets, key):
        loss, grads = jax.value_and_grad(loss_of)(params, inputs, targets, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def top_items(scores: jax.Array, excluded: jax.Array, k: int) -> jax.Array:
    """`[batch, k]` catalog rows of the highest `scores` `[batch, num_items]`, never a row of `excluded`
    `[batch, max_excluded]` (padded with any value outside `0 .. num_items-1`, e.g. -1)."""
    num_items = scores.shape[-1]
    excluded = jnp.where(excluded < 0, num_items, excluded)  # [batch, max_excluded] padding out of range
    masked = jax.vmap(lambda row, drop: row.at[drop].set(-jnp.inf, mode="drop"))(scores, excluded)
    return jax.lax.top_k(masked, k)[1]


def make_recommender(graphdef: nnx.GraphDef, k: int) -> Callable[[Params, jax.Array, jax.Array], jax.Array]:
    """`recommend(params, history [batch, max_len], excluded [batch, m]) -> [batch, k]` catalog rows ranked
    by the model's scores after the newest history item (`history`: left-padded catalog rows, -1 padding);
    jitted."""

    @jax.jit
    def recommend(params, history, excluded):
        model = nnx.merge(graphdef, params)
        scores = model.item_scores(model(item_tokens(history))[:, -1])  # [batch, num_items]
        return top_items(scores, excluded, k)

    return recommend
