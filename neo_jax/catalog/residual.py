"""Residual quantisation: level l quantises what levels 0..l-1 left unexplained.

`fit_residual_kmeans` fits one k-means codebook per level on the residuals of the
previous levels; `residual_encode` maps vectors to codes with given codebooks (shared
with the RQ-VAE, whose codebooks quantise its latent space the same way).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from neo_jax.catalog.kmeans import kmeans, nearest


class ResidualCodes(NamedTuple):
    codes: jax.Array  # [n, levels] int32
    last_residual: jax.Array  # [n, dim] the residual the last level quantised


def residual_encode(vectors: jax.Array, codebooks: Sequence[jax.Array]) -> ResidualCodes:
    """Codes of `vectors` `[n, dim]` under per-level `codebooks` (each `[k_l, dim]`), greedy per level."""
    residual = vectors.astype(jnp.float32)  # [n, dim]
    codes = []
    for codebook in codebooks[:-1]:
        level_codes, _ = nearest(residual, codebook)  # [n]
        codes.append(level_codes)
        residual = residual - codebook[level_codes]
    last_codes, _ = nearest(residual, codebooks[-1])
    return ResidualCodes(jnp.stack([*codes, last_codes], axis=1), residual)


def fit_residual_kmeans(vectors: jax.Array, codebook_sizes: Sequence[int], key: jax.Array,
                        max_iters: int = 50) -> list[jax.Array]:
    """One k-means codebook per level, `[min(k_l, n), dim]` each, fitted on the level's residuals."""
    residual = jnp.asarray(vectors, jnp.float32)  # [n, dim]
    codebooks = []
    for level, size in enumerate(codebook_sizes):
        fitted = kmeans(residual, jax.random.fold_in(key, level), k=min(int(size), residual.shape[0]),
                        max_iters=max_iters)
        codebooks.append(fitted.centroids)
        residual = residual - fitted.centroids[fitted.assignments]
    return codebooks
