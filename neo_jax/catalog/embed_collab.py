"""Collaborative item embeddings learned from interactions, and their fusion with text embeddings.

Two methods (`CollabConfig.method`):
- `bpr`, user-item: `collaborative_embeddings` fits a matrix factorisation with the BPR loss
  (Rendle et al. 2009): a user's score of an item is the dot product of their factors, trained
  so each observed (user, item) outscores a uniformly sampled item, with L2 regularisation, by
  Adam (optax) in one jitted `lax.scan`; the item factors are the embeddings.
- `cooccurrence`, item-item: `cooccurrence_embeddings` counts how often two items stand within
  `context` positions of each other in a history (weight 1/distance, both directions), turns
  the counts into positive pointwise mutual information and keeps the top `dim` singular
  directions (`U * sqrt(S)`, as word vectors from PPMI-SVD), so items that follow the same
  items land close together: the next-item signal a SID prefix should share.
An item nobody interacted with gets a zero vector (it carries no collaborative signal).

`fuse_embeddings` joins several embeddings of the same items: each part is
L2-normalised and scaled by the square root of its weight, then the parts are
concatenated, so the dot product of two fused vectors is the weighted sum of the
parts' cosine similarities.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.sparse
import scipy.sparse.linalg

from neo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class CollabConfig:
    method: Literal["bpr", "cooccurrence"] = "bpr"
    dim: int = 64
    context: int = 3  # cooccurrence: items up to this many positions apart count
    epochs: int = 20  # passes over the events (in sampled batches)
    batch_size: int = 4096
    learning_rate: float = 0.01
    l2: float = 1e-4  # weight decay of the factors in the batch


def bpr_loss(factors: dict[str, jax.Array], users, positives, negatives, l2: float) -> jax.Array:
    """Mean BPR loss of `[batch]` (user, positive item, negative item) triples."""
    user = factors["users"][users]  # [batch, dim]
    pos, neg = factors["items"][positives], factors["items"][negatives]  # [batch, dim]
    margin = jnp.sum(user * (pos - neg), -1)  # [batch]
    penalty = l2 * jnp.mean(jnp.sum(user**2 + pos**2 + neg**2, -1))
    return -jnp.mean(jax.nn.log_sigmoid(margin)) + penalty


@functools.partial(jax.jit, static_argnames=("n_users", "n_items", "steps", "config"))
def _fit_bpr(users, items, key, n_users: int, n_items: int, steps: int, config: CollabConfig):
    init_key, train_key = jax.random.split(key)
    user_key, item_key = jax.random.split(init_key)
    scale = 1.0 / jnp.sqrt(config.dim)
    factors = {"users": jax.random.normal(user_key, (n_users, config.dim)) * scale,  # [n_users, dim]
               "items": jax.random.normal(item_key, (n_items, config.dim)) * scale}  # [n_items, dim]
    optimizer = optax.adam(config.learning_rate)

    def step(carry, step_key):
        factors, opt_state = carry
        event_key, negative_key = jax.random.split(step_key)
        events = jax.random.randint(event_key, (config.batch_size,), 0, users.shape[0])  # [batch]
        negatives = jax.random.randint(negative_key, (config.batch_size,), 0, n_items)  # [batch]
        loss, grads = jax.value_and_grad(bpr_loss)(factors, users[events], items[events], negatives, config.l2)
        updates, opt_state = optimizer.update(grads, opt_state, factors)
        return (optax.apply_updates(factors, updates), opt_state), loss

    (factors, _), losses = jax.lax.scan(step, (factors, optimizer.init(factors)), jax.random.split(train_key, steps))
    return factors["items"], losses


def collaborative_embeddings(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, seed: int,
                             config: CollabConfig = CollabConfig()) -> tuple[np.ndarray, np.ndarray]:
    """`(item embeddings [n_items, dim] float32, loss per training step)` from positive events.

    `users` and `items` `[n_events]` index the users and the catalog rows of the events.
    """
    if users.size == 0:
        raise UserError("collaborative embeddings need interactions, and there are none")
    if min(config.dim, config.epochs, config.batch_size) < 1:
        raise UserError(f"collaborative embeddings: dim, epochs and batch_size must be positive, got {config}")
    steps = max(1, config.epochs * users.size // config.batch_size)
    item_factors, losses = _fit_bpr(jnp.asarray(users, jnp.int32), jnp.asarray(items, jnp.int32),
                                    jax.random.key(seed), n_users=n_users, n_items=n_items, steps=steps,
                                    config=config)
    seen = np.bincount(items, minlength=n_items) > 0  # [n_items]
    return np.where(seen[:, None], np.asarray(item_factors), 0.0).astype(np.float32), np.asarray(losses)


def cooccurrence_embeddings(sequences: Sequence[np.ndarray], n_items: int, seed: int,
                            config: CollabConfig = CollabConfig()) -> np.ndarray:
    """`[n_items, dim]` float32 PPMI-SVD embeddings of the items' co-occurrence in `sequences`
    (catalog rows in time order, one array a user)."""
    if config.dim < 1 or config.context < 1:
        raise UserError(f"co-occurrence embeddings: dim and context must be positive, got {config}")
    if config.dim >= n_items:
        raise UserError(f"co-occurrence embeddings: dim {config.dim} must be below the {n_items} items")
    rows, cols, weights = [], [], []
    for seq in sequences:
        seq = np.asarray(seq, np.int64)
        for distance in range(1, min(config.context, len(seq) - 1) + 1):
            rows += [seq[:-distance], seq[distance:]]
            cols += [seq[distance:], seq[:-distance]]
            weights += [np.full(2 * (len(seq) - distance), 1.0 / distance)]
    if not rows:
        raise UserError("co-occurrence embeddings need histories of at least two items, and there are none")
    counts = scipy.sparse.coo_matrix((np.concatenate(weights), (np.concatenate(rows), np.concatenate(cols))),
                                     shape=(n_items, n_items)).tocsr()  # [n_items, n_items], duplicates summed
    counts.setdiag(0)
    counts.eliminate_zeros()
    totals = np.asarray(counts.sum(axis=1)).ravel()  # [n_items]
    coo = counts.tocoo()
    pmi = np.log(coo.data * totals.sum() / (totals[coo.row] * totals[coo.col]))
    keep = pmi > 0
    ppmi = scipy.sparse.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=(n_items, n_items))
    start = np.random.default_rng(seed).standard_normal(n_items)  # ARPACK's start vector, seeded
    left, singular, _ = scipy.sparse.linalg.svds(ppmi, k=config.dim, v0=start)
    embeddings = left * np.sqrt(singular)  # [n_items, dim]
    return np.where((totals > 0)[:, None], embeddings, 0.0).astype(np.float32)


def fuse_embeddings(parts: Sequence[tuple[np.ndarray, float]]) -> np.ndarray:
    """`[n, sum of widths]`: each `(embeddings [n, dim_i], weight)` L2-normalised and scaled by sqrt(weight)."""
    if not parts or any(weight < 0 for _, weight in parts) or sum(w for _, w in parts) <= 0:
        raise UserError(f"fusion weights must be non-negative with a positive sum, got {[w for _, w in parts]}")
    scaled = []
    for embeddings, weight in parts:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)  # [n, 1]
        scaled.append(np.sqrt(weight) * embeddings / np.maximum(norms, 1e-12))
    return np.concatenate(scaled, axis=1).astype(np.float32)
