"""Dual semantic-collaborative vectors for items and users, the input of their SIDs (Align3GR's token level).

Each item's input is its semantic vector (the text encoder's, or the catalog's own embeddings) beside
its collaborative one (co-occurrence or BPR, from the training part of each history only), each unit
length (`fuse_embeddings`). A user's input is an attention pooling of the inputs of their newest
`max_items` training items: a learned query scores each item, a softmax over the real items weighs them.

One fusion network per side (two layers, GELU) maps an input to a unit vector of width `dim`, and a
linear decoder per side maps it back. The four networks and the query train together, by Adam, on

    alignment + reconstruction_weight * (items' reconstruction + users' reconstruction)

where alignment is a sampled softmax over the batch: a pair is a user's training items before position
t (pooled) and the item at t; the pair's user vector scores every item vector of the batch over a
temperature, and the cross-entropy picks out its own item against the batch's other items, less those
the user has in their training part (in-batch negatives that exclude the user's own items). The
reconstruction terms are the mean squared error of each side's decoder, so the fused vectors keep what
their inputs carried. Items and users are then quantised from their fused vectors, each side its own
entity type with its own codebooks (`neo_jax.catalog.sids.assign_sids`).

`summary` reports the losses over the first and last tenth of training and a check of the alignment:
Recall@10 of each validation user's held-out item ranked over all items by user . item, with the fused
vectors and with the inputs (the users' pooled inputs against the items', uniform weights), over the
same users.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse

from neo_jax.errors import UserError


POOL_USERS = 4096  # users pooled at a time after training (their history inputs are [users, max_items, width])


@dataclasses.dataclass(frozen=True)
class UserSidConfig:
    """`sids build`'s `users:` section: users as their own entity type, with dual SIDs for both sides."""

    enabled: bool = False
    entity_type: str = "user"
    codebook_sizes: tuple[int, ...] = (256, 256, 256)
    dim: int = 64  # width of the fused vectors
    hidden: int = 256  # of each fusion network's hidden layer
    max_items: int = 50  # newest training items pooled per user
    steps: int = 2000
    batch_size: int = 512  # (user, next item) pairs a step; the batch's items are each other's negatives
    learning_rate: float = 1e-3
    temperature: float = 0.1
    reconstruction_weight: float = 1.0

    def check(self) -> None:
        if self.dim < 1 or self.hidden < 1 or self.max_items < 1 or self.steps < 1 or self.batch_size < 2:
            raise UserError("users: dim, hidden, max_items and steps must be positive and batch_size at least 2, "
                            f"got {self.dim}, {self.hidden}, {self.max_items}, {self.steps}, {self.batch_size}")
        if self.temperature <= 0 or self.learning_rate <= 0 or self.reconstruction_weight < 0:
            raise UserError("users: temperature and learning_rate must be positive, reconstruction_weight "
                            "non-negative")
        if not self.codebook_sizes or min(self.codebook_sizes) < 1:
            raise UserError(f"users.codebook_sizes must be a non-empty list of integers >= 1, "
                            f"got {list(self.codebook_sizes)}")


@dataclasses.dataclass(frozen=True)
class DualVectors:
    items: np.ndarray  # [n_items, dim] float32, unit rows
    users: np.ndarray  # [n_users, dim] float32, unit rows
    summary: dict


def _dense(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, jax.Array]:
    return {"w": jax.random.normal(key, (fan_in, fan_out)) / np.sqrt(fan_in), "b": jnp.zeros(fan_out)}


def _init(key: jax.Array, inputs: int, config: UserSidConfig) -> dict:
    keys = jax.random.split(key, 7)
    def side(k1, k2, k3):
        return {"hidden": _dense(k1, inputs, config.hidden), "out": _dense(k2, config.hidden, config.dim),
                "decoder": _dense(k3, config.dim, inputs)}
    return {"items": side(*keys[:3]), "users": side(*keys[3:6]), "query": jnp.zeros(inputs)}


def _fuse(side: dict, x: jax.Array) -> jax.Array:
    """`[..., inputs]` -> unit `[..., dim]`."""
    hidden = jax.nn.gelu(x @ side["hidden"]["w"] + side["hidden"]["b"])
    z = hidden @ side["out"]["w"] + side["out"]["b"]
    return z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)


def _reconstruction(side: dict, z: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.sum((z @ side["decoder"]["w"] + side["decoder"]["b"] - x) ** 2, axis=-1))


def _pool(query: jax.Array, inputs: jax.Array, histories: jax.Array) -> jax.Array:
    """Attention pooling of each user's items: `histories` `[batch, max_items]` item rows into
    `inputs` `[items, width]`, -1 padding -> `[batch, width]` (zeros for a user with no items)."""
    real = histories >= 0  # [batch, max_items]
    rows = inputs[jnp.maximum(histories, 0)]  # [batch, max_items, width]
    scores = jnp.where(real, rows @ query, -1e30)  # [batch, max_items]
    weights = jnp.where(real, jax.nn.softmax(scores, axis=-1), 0.0)  # [batch, max_items]
    return jnp.einsum("bm,bmd->bd", weights, rows)


def _loss(params: dict, inputs: jax.Array, histories: jax.Array, positives: jax.Array, owned: jax.Array,
          config: UserSidConfig) -> tuple[jax.Array, dict]:
    """`histories` `[batch, max_items]` item rows (-1 padding), `positives` `[batch]`, `owned` `[batch, batch]`:
    the item of pair j is one of pair i's user's training items (and j != i)."""
    pooled = _pool(params["query"], inputs, histories)  # [batch, inputs]
    item_inputs = inputs[positives]  # [batch, inputs]
    users, items = _fuse(params["users"], pooled), _fuse(params["items"], item_inputs)  # [batch, dim] each
    logits = jnp.where(owned, -1e9, users @ items.T / config.temperature)  # [batch, batch]
    alignment = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, jnp.arange(logits.shape[0])))
    reconstruction = (_reconstruction(params["items"], items, item_inputs)
                      + _reconstruction(params["users"], users, pooled))
    total = alignment + config.reconstruction_weight * reconstruction
    return total, {"alignment": alignment, "reconstruction": reconstruction}


def _padded_histories(sequences: list[np.ndarray], ends: np.ndarray, users: np.ndarray, width: int) -> np.ndarray:
    """`[pairs, width]` the newest `width` items of `sequences[user][:end]`, right-aligned, -1 padding."""
    out = np.full((users.size, width), -1, np.int32)
    for i, (user, end) in enumerate(zip(users.tolist(), ends.tolist())):
        items = sequences[user][max(0, end - width):end]
        out[i, width - len(items):] = items
    return out


def _recall_at_10(user_vectors: np.ndarray, item_vectors: np.ndarray, targets: np.ndarray,
                  chunk: int = 1024) -> float:
    """The share of users whose target has fewer than 10 items scored above it (`user . item`)."""
    hits = 0
    for start in range(0, targets.size, chunk):
        scores = user_vectors[start:start + chunk] @ item_vectors.T  # [chunk, items]
        target_scores = scores[np.arange(scores.shape[0]), targets[start:start + chunk]]  # [chunk]
        hits += int(np.sum(np.sum(scores > target_scores[:, None], axis=1) < 10))
    return hits / targets.size


def dual_vectors(inputs: np.ndarray, train_sequences: list[np.ndarray], valid_targets: dict[int, int],
                 config: UserSidConfig, seed: int, log: Callable[[str], None] = lambda message: None) -> DualVectors:
    """Fused vectors of every item (`inputs` `[n_items, width]`) and every user (`train_sequences[u]`: their
    time-ordered training items), trained as the module docstring says; `valid_targets` (user -> held-out
    item) only scores the alignment check."""
    config.check()
    n_items, n_users = inputs.shape[0], len(train_sequences)
    pair_users = np.concatenate([np.full(max(len(s) - 1, 0), u, np.int64) for u, s in enumerate(train_sequences)])
    pair_ends = np.concatenate([np.arange(1, len(s), dtype=np.int64) for s in train_sequences])  # item index
    if pair_users.size < config.batch_size:
        raise UserError(f"users: {pair_users.size} (user, next item) training pairs, fewer than batch_size "
                        f"{config.batch_size}")
    lengths = np.array([len(s) for s in train_sequences])  # [n_users]
    ownership = scipy.sparse.csr_matrix(
        (np.ones(int(lengths.sum()), np.float32),
         (np.repeat(np.arange(n_users), lengths), np.concatenate([np.asarray(s, np.int64) for s in train_sequences]))),
        shape=(n_users, n_items))
    device_inputs = jnp.asarray(inputs, jnp.float32)
    params = _init(jax.random.key(seed), inputs.shape[1], config)
    tx = optax.adam(config.learning_rate)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, histories, positives, owned):
        (_, parts), grads = jax.value_and_grad(functools.partial(_loss, config=config), has_aux=True)(
            params, device_inputs, histories, positives, owned)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, parts

    rng = np.random.default_rng(seed)
    history = []
    for index in range(config.steps):
        pick = rng.choice(pair_users.size, config.batch_size, replace=False)  # [batch]
        users, ends = pair_users[pick], pair_ends[pick]
        positives = np.array([train_sequences[u][e] for u, e in zip(users.tolist(), ends.tolist())], np.int32)
        owned = ownership[users][:, positives].toarray() > 0  # [batch, batch]
        np.fill_diagonal(owned, False)
        params, opt_state, parts = step(params, opt_state,
                                        _padded_histories(train_sequences, ends, users, config.max_items),
                                        positives, owned)
        history.append({k: float(v) for k, v in parts.items()})
        if (index + 1) % max(1, config.steps // 10) == 0:
            log(f"users: fusion step {index + 1}/{config.steps}: alignment {history[-1]['alignment']:.4f}, "
                f"reconstruction {history[-1]['reconstruction']:.4f}")

    histories = _padded_histories(train_sequences, lengths, np.arange(n_users), config.max_items)  # [n_users, max]
    blocks = np.array_split(histories, max(1, -(-n_users // POOL_USERS)))
    pooled = np.concatenate([np.asarray(_pool(params["query"], device_inputs, block))
                             for block in blocks])  # [n_users, width], pooled in blocks
    user_vectors = np.asarray(_fuse(params["users"], jnp.asarray(pooled)), np.float32)
    item_vectors = np.asarray(_fuse(params["items"], device_inputs), np.float32)
    tenth = max(1, config.steps // 10)
    mean = lambda rows, key: round(float(np.mean([r[key] for r in rows])), 4)  # noqa: E731
    summary = {"steps": config.steps, "pairs": int(pair_users.size),
               "alignment_loss": [mean(history[:tenth], "alignment"), mean(history[-tenth:], "alignment")],
               "reconstruction_loss": [mean(history[:tenth], "reconstruction"),
                                       mean(history[-tenth:], "reconstruction")]}
    checked = np.array(sorted(u for u in valid_targets if lengths[u] > 0), np.int64)
    if checked.size:
        targets = np.array([valid_targets[u] for u in checked.tolist()], np.int64)
        uniform = np.stack([inputs[row[row >= 0]].sum(axis=0) for row in histories[checked]])  # [checked, width]
        summary["valid_users"] = int(checked.size)
        summary["valid_recall@10_fused"] = round(_recall_at_10(user_vectors[checked], item_vectors, targets), 4)
        summary["valid_recall@10_inputs"] = round(_recall_at_10(uniform, inputs, targets), 4)
    return DualVectors(item_vectors, user_vectors, summary)
