"""Mini-batch residual k-means (Sculley 2010), for catalogs too large to cluster in one piece.

Each level's codebook starts from k-means++ seeds on a seeded sample of `seed_rows` rows, then
`steps` mini-batches move it: a batch is the next `batch_size` rows of a seeded permutation of the
catalog, a new permutation each epoch (`epoch_batches`), and each centre moves to the running mean of
every row it has taken so far (the batched form of a per-centre rate of 1 / rows taken). Rows are
read from the embeddings by index, so the embeddings may be a memory-mapped `.npy` (only a batch
is ever read into memory), and their residuals under the earlier levels are computed on the fly
from those levels' codebooks. Codes are assigned `chunk_rows` rows at a time (`encode_in_chunks`),
so the whole matrix is never on the device at once. Same inputs and seed, same codebooks.

Tolerance, against Lloyd's iterations over every item (`residual_kmeans`), tested on a 100k-item
clustered catalog at 3 levels of 256 (`tests/test_sids.py`): the collision rate within 0.01 of it, the
prefix coherence at each level at most 0.02 below it (measured: 0.0237 against 0.0221, and at most
0.009 lower).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.catalog.kmeans import kmeans_plus_plus, nearest
from neo_jax.catalog.residual import residual_encode
from neo_jax.catalog.rqvae import epoch_batches
from neo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class MiniBatchConfig:
    batch_size: int = 4096  # rows a step
    steps: int = 300  # mini-batches per level
    seed_rows: int = 65536  # rows of the k-means++ seeding sample
    chunk_rows: int = 262144  # rows encoded at a time

    def check(self) -> None:
        if min(self.batch_size, self.steps, self.seed_rows, self.chunk_rows) < 1:
            raise UserError("sids.quantiser.minibatch: batch_size, steps, seed_rows and chunk_rows must be positive")


class TypeRows:
    """Rows `rows` (ascending) of `base` `[n, dim]` (an array or a memory map) as a read-on-demand array:
    `shape`, and `[index]` by an index array or a slice, which reads just those rows of `base`."""

    def __init__(self, base, rows: np.ndarray):
        self.base, self.rows = base, np.asarray(rows, np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows.size, int(self.base.shape[1]))

    def __getitem__(self, index) -> np.ndarray:
        return np.asarray(self.base[self.rows[index]])


def _read(vectors, rows: np.ndarray) -> jax.Array:
    """`[len(rows), dim]` float32 of `vectors` (an array or a memory map) at `rows`, read in row order."""
    order = np.argsort(rows, kind="stable")
    block = np.asarray(vectors[rows[order]], np.float32)  # sorted reads of a memory map are sequential
    out = np.empty_like(block)
    out[order] = block
    return jnp.asarray(out)


@jax.jit
def _residual(x: jax.Array, codebooks: tuple[jax.Array, ...]) -> jax.Array:
    """`x` `[n, dim]` less its codes' vectors under `codebooks` (every level of them)."""
    for codebook in codebooks:
        codes, _ = nearest(x, codebook)
        x = x - codebook[codes]
    return x


@jax.jit
def _update(centroids: jax.Array, counts: jax.Array, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One mini-batch step: each centre moves to the mean of every row it has taken, this batch's included."""
    k = centroids.shape[0]
    codes, _ = nearest(rows, centroids)  # [batch]
    sums = jax.ops.segment_sum(rows, codes, num_segments=k)  # [k, dim]
    taken = jax.ops.segment_sum(jnp.ones(rows.shape[0], jnp.float32), codes, num_segments=k)  # [k]
    total = counts + taken  # [k]
    moved = (centroids * counts[:, None] + sums) / jnp.maximum(total, 1.0)[:, None]
    return jnp.where((taken > 0)[:, None], moved, centroids), total


def fit_minibatch_residual_kmeans(vectors, codebook_sizes: Sequence[int], key: jax.Array,
                                  config: MiniBatchConfig = MiniBatchConfig()) -> list[jax.Array]:
    """One codebook per level, `[min(k_l, n), dim]` each, fitted by mini-batches of `vectors` `[n, dim]`."""
    config.check()
    n = vectors.shape[0]
    batch, sample = min(config.batch_size, n), min(config.seed_rows, n)
    codebooks: list[jax.Array] = []
    for level, size in enumerate(codebook_sizes):
        level_key = jax.random.fold_in(key, level)
        seed_key, order_key = jax.random.split(level_key)
        seed_rows = np.asarray(jax.random.permutation(seed_key, n)[:sample])  # [sample]
        residual = _residual(_read(vectors, seed_rows), tuple(codebooks))  # [sample, dim]
        centroids = kmeans_plus_plus(residual, seed_key, min(int(size), n))  # [k, dim]
        counts = jnp.zeros(centroids.shape[0], jnp.float32)
        for rows in np.asarray(epoch_batches(order_key, n, batch, config.steps)):  # [batch] each
            centroids, counts = _update(centroids, counts, _residual(_read(vectors, rows), tuple(codebooks)))
        codebooks.append(centroids)
    return codebooks


def encode_in_chunks(vectors, codebooks: Sequence[jax.Array], chunk_rows: int) -> np.ndarray:
    """`[n, levels]` int32 codes of `vectors` `[n, dim]` (an array or a memory map), `chunk_rows` at a time."""
    n = vectors.shape[0]
    return np.concatenate([np.asarray(residual_encode(jnp.asarray(np.asarray(vectors[start:start + chunk_rows],
                                                                             np.float32)), codebooks).codes)
                           for start in range(0, n, chunk_rows)]).astype(np.int32)
