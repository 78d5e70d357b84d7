"""Semantic IDs per entity type: quantise each type's item embeddings, then make SIDs distinct.

Each entity type has its own levels and codebook sizes (`SidConfig.codebook_sizes`, or a
per-type entry in `type_codebook_sizes`), its own quantiser fit (residual k-means by
default, or an RQ-VAE) and its own collision handling (see `collisions`). The result
holds every item's codes `[n_items, max_levels]` (-1 past a type's depth) and the figures
that judge the SIDs; `build_trie(result.codes, result.item_types, result.levels_per_type)`
gives the decoder's trie.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Literal

import jax
import numpy as np

from neo_jax.catalog.collisions import CollisionMethod, CollisionStats, group_rows, resolve_collisions
from neo_jax.catalog.kmeans import pairwise_sq_distances
from neo_jax.catalog.minibatch import MiniBatchConfig, TypeRows, encode_in_chunks, fit_minibatch_residual_kmeans
from neo_jax.catalog.residual import fit_residual_kmeans, residual_encode
from neo_jax.catalog.rqvae import RqVaeConfig, fit_rqvae
from neo_jax.errors import UserError
from neo_jax.vocab import EntityType

FIGURE_CHUNK_ROWS = 262144  # rows read at a time for the input check and the coherence figures


@dataclasses.dataclass(frozen=True)
class QuantiserConfig:
    # residual_kmeans: Lloyd iterations over every item; minibatch_kmeans: mini-batches of them, for
    # catalogs too large for that (`neo_jax.catalog.minibatch`); rqvae: a residual-quantised autoencoder.
    method: Literal["residual_kmeans", "minibatch_kmeans", "rqvae"] = "residual_kmeans"
    kmeans_iters: int = 50  # Lloyd iterations per level (stops earlier once assignments settle)
    minibatch: MiniBatchConfig = MiniBatchConfig()
    rqvae: RqVaeConfig = RqVaeConfig()


@dataclasses.dataclass(frozen=True)
class SidConfig:
    codebook_sizes: tuple[int, ...] = (256, 256, 256)  # per level, for every type without its own entry
    type_codebook_sizes: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    quantiser: QuantiserConfig = QuantiserConfig()
    collisions: CollisionMethod = "extra_level"
    disambiguation_order: Literal["catalog", "popularity"] = "popularity"  # of the extra level's codes
    # The extra level's width at most; a larger group of identical SIDs takes more levels
    # (`neo_jax.catalog.collisions.add_disambiguation_levels`).
    max_disambiguation_width: int = 256

    def sizes_for(self, type_name: str) -> tuple[int, ...]:
        return tuple(self.type_codebook_sizes.get(type_name, self.codebook_sizes))


@dataclasses.dataclass(frozen=True)
class TypeSids:
    """The SIDs of one entity type and the figures that judge them."""

    name: str
    rows: np.ndarray  # [n_t] catalog rows of the type's items
    codes: np.ndarray  # [n_t, levels] int32, distinct rows
    codebook_sizes: tuple[int, ...]  # per level, including an added disambiguation level
    disambiguation_level: bool  # whether collisions needed the extra level
    before: CollisionStats  # of the quantised codes, before collision handling
    after: CollisionStats
    prefix_coherence: list[float]  # per prefix length 1 .. levels - 1 (see `prefix_coherence`)
    random_pair_cosine: float  # the same figure for random pairs of the type's items, for scale
    seconds: float

    def codebook_use(self) -> list[float]:
        """Per level: the fraction of the level's codes that some item uses."""
        return [float(np.unique(self.codes[:, level]).size / size) for level, size in enumerate(self.codebook_sizes)]

    def summary(self) -> dict:
        return {
            "items": int(self.rows.size),
            "levels": len(self.codebook_sizes),
            "codebook_sizes": list(self.codebook_sizes),
            "disambiguation_level": self.disambiguation_level,
            "collision_rate_before": self.before.collision_rate,
            "collision_rate_after": self.after.collision_rate,
            "mean_items_per_leaf_before": self.before.mean_items_per_leaf,
            "max_items_per_leaf_before": self.before.max_items_per_leaf,
            "codebook_use": self.codebook_use(),
            "prefix_coherence": [round(c, 4) for c in self.prefix_coherence],
            "random_pair_cosine": round(self.random_pair_cosine, 4),
            "seconds": round(self.seconds, 3),
        }


@dataclasses.dataclass(frozen=True)
class SidAssignment:
    """Every item's SID: the input of `build_trie` and of the vocabulary's SID blocks."""

    type_names: tuple[str, ...]
    item_types: np.ndarray  # [n_items] int32
    codes: np.ndarray  # [n_items, max_levels] int32, -1 past a type's depth
    per_type: tuple[TypeSids, ...]  # by type index

    @property
    def levels_per_type(self) -> tuple[int, ...]:
        return tuple(len(t.codebook_sizes) for t in self.per_type)

    def entity_types(self) -> tuple[EntityType, ...]:
        """The vocabulary's SID blocks: one `EntityType` per type with its final codebook sizes."""
        return tuple(EntityType(t.name, t.codebook_sizes) for t in self.per_type)

    def summary(self) -> dict:
        """Totals over all items plus one entry per type."""
        n_items = int(self.item_types.size)
        before = [t.before for t in self.per_type]
        sizes = [t.rows.size for t in self.per_type]
        return {
            "items": n_items,
            "types": list(self.type_names),
            "levels": {t.name: len(t.codebook_sizes) for t in self.per_type},
            "codebook_sizes": {t.name: list(t.codebook_sizes) for t in self.per_type},
            "collision_rate_before": sum(b.collision_rate * n for b, n in zip(before, sizes)) / n_items,
            "collision_rate_after": sum(t.after.collision_rate * n for t, n in zip(self.per_type, sizes)) / n_items,
            "mean_items_per_leaf_before": n_items / sum(n / b.mean_items_per_leaf for b, n in zip(before, sizes)),
            "max_items_per_leaf_before": max(b.max_items_per_leaf for b in before),
            "codebook_use": {t.name: t.codebook_use() for t in self.per_type},
            "prefix_coherence": {t.name: t.summary()["prefix_coherence"] for t in self.per_type},
            "per_type": {t.name: t.summary() for t in self.per_type},
        }


def check_sid_inputs(embeddings: np.ndarray, item_types: np.ndarray, type_names: tuple[str, ...],
                     config: SidConfig) -> None:
    """A `UserError` naming the problem for inputs the quantiser cannot use."""
    n_items = item_types.shape[0]
    if n_items == 0:
        raise UserError("the catalog is empty: there are no items to give SIDs")
    if embeddings.ndim != 2 or embeddings.shape[0] != n_items or embeddings.shape[1] < 1:
        raise UserError(f"item embeddings have shape {embeddings.shape}; expected ({n_items}, dim), one row per item")
    for start in range(0, n_items, FIGURE_CHUNK_ROWS):  # a chunk at a time: the embeddings may be a memory map
        finite = np.isfinite(np.asarray(embeddings[start:start + FIGURE_CHUNK_ROWS])).all(axis=1)
        if not finite.all():
            raise UserError(f"item embeddings: row {start + int(np.flatnonzero(~finite)[0])} has a NaN or "
                            "infinite value")
    unknown = sorted(set(config.type_codebook_sizes) - set(type_names))
    if unknown:
        raise UserError(f"sids.type_codebook_sizes names entity type(s) {unknown} that the catalog does not have "
                        f"(its types: {list(type_names)})")
    for name in type_names:
        sizes = config.sizes_for(name)
        if not sizes or min(sizes) < 1:
            raise UserError(f"entity type {name!r}: codebook sizes must be a non-empty list of integers >= 1, "
                            f"got {list(sizes)}")
    if config.max_disambiguation_width < 2:
        raise UserError(f"sids.max_disambiguation_width must be >= 2, got {config.max_disambiguation_width}")
    if config.quantiser.kmeans_iters < 1:
        raise UserError(f"sids.quantiser.kmeans_iters must be >= 1, got {config.quantiser.kmeans_iters}")


def quantise(vectors: np.ndarray, codebook_sizes: tuple[int, ...], key: jax.Array,
             config: QuantiserConfig, keep_last_distances: bool):
    """`(codes [n, levels] int32, last-level distances [n, k] or None)` of one type's embeddings."""
    if config.method == "minibatch_kmeans":
        if keep_last_distances:
            raise UserError("sids.collisions=balanced needs every item's distances to every last-level code, which "
                            "minibatch_kmeans does not keep; use collisions=extra_level")
        codebooks = fit_minibatch_residual_kmeans(vectors, codebook_sizes, key, config.minibatch)
        return encode_in_chunks(vectors, codebooks, config.minibatch.chunk_rows), None
    if config.method == "rqvae":
        vectors, codebooks, _ = fit_rqvae(vectors, codebook_sizes, key, config.rqvae)
    else:
        codebooks = fit_residual_kmeans(vectors, codebook_sizes, key, config.kmeans_iters)
    encoded = residual_encode(vectors, codebooks)
    distances = pairwise_sq_distances(encoded.last_residual, codebooks[-1]) if keep_last_distances else None
    return np.asarray(encoded.codes, np.int32), None if distances is None else np.asarray(distances)


def mean_pair_cosine(vectors, groups: np.ndarray, chunk_rows: int = FIGURE_CHUNK_ROWS) -> float:
    """Mean cosine similarity of two distinct items of one group, over items in groups of two or
    more (each group weighted by its size); `vectors` `[n, dim]` (an array or a lazy view of rows, read
    `chunk_rows` at a time), `groups` `[n]`."""
    n_groups = int(groups.max()) + 1
    sizes = np.bincount(groups, minlength=n_groups).astype(np.float64)  # [n_groups]
    sums = np.zeros((n_groups, vectors.shape[1]))  # [n_groups, dim]
    for start in range(0, groups.size, chunk_rows):
        chunk = np.asarray(vectors[start:start + chunk_rows], np.float64)  # [chunk, dim]
        np.add.at(sums, groups[start:start + chunk_rows],
                  chunk / np.maximum(np.linalg.norm(chunk, axis=1, keepdims=True), 1e-12))
    shared = sizes > 1
    pair_means = (np.sum(sums[shared] ** 2, axis=1) - sizes[shared]) / (sizes[shared] * (sizes[shared] - 1))
    return float(np.average(pair_means, weights=sizes[shared])) if shared.any() else float("nan")


def prefix_coherence(vectors, codes: np.ndarray) -> list[float]:
    """NEO's criterion: for each prefix length 1 .. levels - 1, the mean cosine similarity of two
    items sharing that prefix of their SIDs (higher: a prefix groups items that mean alike)."""
    return [mean_pair_cosine(vectors, group_rows(codes[:, :length])[0]) for length in range(1, codes.shape[1])]


def assign_sids(embeddings: np.ndarray, item_types: np.ndarray, type_names: tuple[str, ...], config: SidConfig,
                seed: int, log: Callable[[str], None] = lambda message: None,
                popularity: np.ndarray | None = None) -> SidAssignment:
    """Distinct SIDs for every item, per entity type. Same inputs and seed, same SIDs.

    `popularity` `[n_items]` (training events per item) orders the disambiguation level when
    `config.disambiguation_order` is `popularity`. `embeddings` may be a memory-mapped `.npy`: with
    `minibatch_kmeans` each type's rows are then read from it a batch or a chunk at a time
    (`TypeRows`), never copied whole."""
    if not isinstance(embeddings, np.memmap):
        embeddings = np.asarray(embeddings, np.float32)  # [n_items, dim]
    item_types = np.asarray(item_types, np.int32)  # [n_items]
    check_sid_inputs(embeddings, item_types, type_names, config)
    if config.disambiguation_order == "popularity" and popularity is None:
        raise UserError("sids.disambiguation_order is 'popularity' but no training popularity was given")
    per_type = []
    for type_index, name in enumerate(type_names):
        start = time.perf_counter()
        rows = np.flatnonzero(item_types == type_index)  # [n_t]
        sizes = config.sizes_for(name)
        if rows.size == 0:
            raise UserError(f"entity type {name!r} has no items")
        key = jax.random.fold_in(jax.random.key(seed), type_index)
        vectors = (TypeRows(embeddings, rows) if config.quantiser.method == "minibatch_kmeans"
                   else np.asarray(embeddings[rows], np.float32))  # [n_t, dim]
        codes, last_distances = quantise(vectors, sizes, key, config.quantiser,
                                         keep_last_distances=config.collisions == "balanced")
        priority = popularity[rows] if config.disambiguation_order == "popularity" else None
        resolved = resolve_collisions(codes, sizes, config.collisions, last_distances, priority,
                                      config.max_disambiguation_width)
        per_type.append(TypeSids(name, rows, resolved.codes, resolved.codebook_sizes,
                                 len(resolved.codebook_sizes) > len(sizes), resolved.before, resolved.after,
                                 prefix_coherence(vectors, resolved.codes),
                                 mean_pair_cosine(vectors, np.zeros(rows.size, np.int64)),
                                 time.perf_counter() - start))
        log(f"sids: {name}: {rows.size} items, {len(resolved.codebook_sizes)} levels "
            f"{list(resolved.codebook_sizes)}, collision rate {resolved.before.collision_rate:.4f} -> "
            f"{resolved.after.collision_rate:.4f} ({per_type[-1].seconds:.1f} s)")
    max_levels = max(len(t.codebook_sizes) for t in per_type)
    codes = np.full((item_types.size, max_levels), -1, np.int32)  # [n_items, max_levels]
    for t in per_type:
        codes[t.rows, : t.codes.shape[1]] = t.codes
    return SidAssignment(tuple(type_names), item_types, codes, tuple(per_type))
