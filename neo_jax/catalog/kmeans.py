"""k-means in JAX: k-means++ seeding, then Lloyd iterations in one jitted `lax.while_loop`.

Distances are computed in row batches (`lax.map(..., batch_size=...)`) so a large catalog
never materialises the whole `[n, k]` distance matrix. Same inputs and key, same result.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

ASSIGN_BATCH = 4096  # rows per batch of the distance computation


class KMeansResult(NamedTuple):
    centroids: jax.Array  # [k, dim] float32
    assignments: jax.Array  # [n] int32, index of each point's nearest centroid
    sq_distances: jax.Array  # [n] float32, squared distance to that centroid


def pairwise_sq_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """`[n, k]` squared Euclidean distances of `points` `[n, dim]` to `centroids` `[k, dim]`."""
    cross = points @ centroids.T  # [n, k]
    return jnp.maximum(jnp.sum(points**2, -1, keepdims=True) - 2 * cross + jnp.sum(centroids**2, -1)[None, :], 0.0)


def nearest(points: jax.Array, centroids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(codes [n] int32, squared distances [n])` of each point's nearest centroid, in row batches."""

    def one_row(point):  # [dim] -> (code, sq distance)
        distances = pairwise_sq_distances(point[None, :], centroids)[0]  # [k]
        code = jnp.argmin(distances).astype(jnp.int32)
        return code, distances[code]

    return jax.lax.map(one_row, points, batch_size=ASSIGN_BATCH)


def kmeans_plus_plus(points: jax.Array, key: jax.Array, k: int) -> jax.Array:
    """`[k, dim]` seeds by greedy k-means++ (as scikit-learn): each step draws `2 + ln k` candidate
    points with probability proportional to their squared distance to the nearest seed so far
    (uniformly for the first seed, or when every point is already a seed) and keeps the one
    that lowers the total squared distance most. Draws by inverse CDF from uniforms made up front."""
    n = points.shape[0]
    trials = 2 + int(math.log(k))
    uniforms = jax.random.uniform(key, (k, trials))  # [k, trials]

    def add_seed(i, carry):
        seeds, min_sq = carry  # [k, dim], [n]
        weights = jnp.where(jnp.sum(min_sq) > 0, min_sq, jnp.ones_like(min_sq))  # [n]
        cdf = jnp.cumsum(weights)  # [n]
        candidates = jnp.sum(cdf[None, :] <= uniforms[i][:, None] * cdf[-1], axis=1)  # [trials] inverse CDF
        candidates = jnp.minimum(candidates, n - 1)
        sq_to_candidates = pairwise_sq_distances(points, points[candidates]).T  # [trials, n]
        new_min_sq = jnp.where(i == 0, sq_to_candidates, jnp.minimum(min_sq[None, :], sq_to_candidates))
        best = jnp.argmin(jnp.sum(new_min_sq, axis=1))
        return seeds.at[i].set(points[candidates[best]]), new_min_sq[best]

    seeds = jnp.zeros((k, points.shape[1]), points.dtype)
    seeds, _ = jax.lax.fori_loop(0, k, add_seed, (seeds, jnp.zeros(n, points.dtype)))
    return seeds


@functools.partial(jax.jit, static_argnames=("k", "max_iters"))
def kmeans(points: jax.Array, key: jax.Array, k: int, max_iters: int = 50) -> KMeansResult:
    """Cluster `points` `[n, dim]` into `k` clusters; stops early when no assignment changes.

    An empty cluster keeps its previous centroid. With fewer distinct points than `k`,
    some centroids repeat and stay unused.
    """
    points = points.astype(jnp.float32)
    centroids = kmeans_plus_plus(points, key, k)  # [k, dim]
    codes, sq_distances = nearest(points, centroids)  # [n], [n]

    def update(centroids, codes):
        sums = jax.ops.segment_sum(points, codes, num_segments=k)  # [k, dim]
        counts = jax.ops.segment_sum(jnp.ones_like(codes, jnp.float32), codes, num_segments=k)  # [k]
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

    def step(state):
        centroids, codes, _, iteration, _ = state
        centroids = update(centroids, codes)
        new_codes, sq_distances = nearest(points, centroids)
        return centroids, new_codes, sq_distances, iteration + 1, jnp.any(new_codes != codes)

    def not_done(state):
        *_, iteration, changed = state
        return changed & (iteration < max_iters)

    init = (centroids, codes, sq_distances, 0, jnp.array(True))
    centroids, codes, sq_distances, _, _ = jax.lax.while_loop(not_done, step, init)
    return KMeansResult(centroids, codes, sq_distances)
