"""Make every item's SID distinct within its entity type; no item is ever dropped.

Two methods:
- `extra_level` (TIGER, the default): items that share a full SID get one more level
  whose code is their rank in the group (0, 1, ...; by training popularity when given, so
  code 0 is the group's most frequent item). The level's codebook size is the largest group;
  every item of the type carries the level (0 where it was alone). The width is capped
  (`max_width`, default 256): a group larger than the cap writes its rank in base `max_width`
  over as many levels as it needs, most significant digit first, so one degenerate group
  (thousands of items with the same text, say) adds a level or two of at most `max_width`
  codes, not a level as wide as the group (which would size every trie node's bitmap and add
  as many vocabulary rows).
- `balanced`: first re-assign the last level within each group of items that share all
  earlier codes, so that no two of them take the same last code, each item getting the
  nearest free code (rounds of proposals: every unplaced item proposes its nearest free
  code; the closest proposer wins each code). Only a group larger than the last codebook
  cannot be separated this way; its overflow then gets the extra level as above.
A type with no collisions keeps its levels unchanged.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

CollisionMethod = Literal["extra_level", "balanced"]


class CollisionStats(NamedTuple):
    collision_rate: float  # share of items whose SID another item of the type also has
    mean_items_per_leaf: float  # items / distinct SIDs
    max_items_per_leaf: int  # the largest group of items sharing one SID


def group_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(group index [n], group sizes [n_groups])` of the distinct rows of `codes` `[n, levels]`."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    return inverse.reshape(-1), counts


def collision_stats(codes: np.ndarray) -> CollisionStats:
    """Figures that judge a set of SIDs `[n, levels]` of one type."""
    groups, sizes = group_rows(codes)
    n = codes.shape[0]
    return CollisionStats(
        collision_rate=float(np.sum(sizes[groups] > 1) / n),
        mean_items_per_leaf=float(n / sizes.size),
        max_items_per_leaf=int(sizes.max()),
    )


def rank_within_groups(groups: np.ndarray, priority: np.ndarray | None = None) -> np.ndarray:
    """`[n]` position of each row among the rows of its group: by descending `priority` `[n]`
    (e.g. training popularity), ties and `None` in row order."""
    order = (np.argsort(groups, kind="stable") if priority is None
             else np.lexsort((-np.asarray(priority, np.float64), groups)))  # [n]
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.append(True, sorted_groups[1:] != sorted_groups[:-1]))  # [n_groups]
    run_start = np.repeat(starts, np.diff(np.append(starts, groups.size)))  # [n] start of each row's run
    ranks = np.empty_like(order)
    ranks[order] = np.arange(groups.size) - run_start
    return ranks


def add_disambiguation_levels(codes: np.ndarray, priority: np.ndarray | None = None,
                              max_width: int = 256) -> tuple[np.ndarray, tuple[int, ...]]:
    """`(codes [n, levels + extra], the new levels' sizes)`: the new codes are the rank within the
    SID group, most popular first when `priority` `[n]` is given (so the code carries signal: 0 is
    the group's most frequent item), written in base `max_width` over as few levels as the largest
    group needs (one while it has at most `max_width` items), most significant digit first."""
    if max_width < 2:
        raise ValueError(f"max_width must be at least 2, got {max_width}")
    groups, sizes = group_rows(codes)
    ranks = rank_within_groups(groups, priority)  # [n]
    extra = 1
    while max_width ** extra < int(sizes.max()):
        extra += 1
    digits = np.stack([ranks // max_width ** (extra - 1 - level) % max_width for level in range(extra)],
                      axis=1).astype(codes.dtype)  # [n, extra]
    return np.concatenate([codes, digits], axis=1), tuple(int(d.max()) + 1 for d in digits.T)


def balance_last_level(codes: np.ndarray, last_distances: np.ndarray) -> np.ndarray:
    """Codes `[n, levels]` whose last level is re-assigned to free codes within each prefix group.

    `last_distances` `[n, k]`: squared distance of each item's last residual to each last-level code.
    Items of a group larger than `k` that find no free code keep their nearest code.
    """
    n, k = last_distances.shape
    prefix_groups = group_rows(codes[:, :-1])[0] if codes.shape[1] > 1 else np.zeros(n, np.int64)  # [n]
    taken = np.zeros((int(prefix_groups.max()) + 1, k), bool)  # [n_groups, k]
    last = np.full(n, -1, np.int64)  # [n]
    while True:
        pending = np.flatnonzero(last < 0)  # [p]
        if pending.size == 0:
            break
        distances = np.where(taken[prefix_groups[pending]], np.inf, last_distances[pending])  # [p, k]
        choice = np.argmin(distances, axis=1)  # [p]
        best = distances[np.arange(pending.size), choice]  # [p]
        placeable = np.isfinite(best)
        if not placeable.any():
            break
        pending, choice, best = pending[placeable], choice[placeable], best[placeable]
        cells = prefix_groups[pending] * k + choice  # [p'] (group, code) cells proposed
        order = np.lexsort((best, cells))  # by cell, closest proposer first
        winners = order[np.append(True, cells[order][1:] != cells[order][:-1])]
        last[pending[winners]] = choice[winners]
        taken.flat[cells[winners]] = True
    balanced = codes.copy()
    placed = last >= 0
    balanced[placed, -1] = last[placed]
    return balanced


class Resolved(NamedTuple):
    codes: np.ndarray  # [n, levels (+1)] distinct rows
    codebook_sizes: tuple[int, ...]  # with the extra level's size when one was added
    before: CollisionStats
    after: CollisionStats


def resolve_collisions(codes: np.ndarray, codebook_sizes: tuple[int, ...], method: CollisionMethod,
                       last_distances: np.ndarray | None = None, priority: np.ndarray | None = None,
                       max_width: int = 256) -> Resolved:
    """Distinct SIDs for one type's items `codes` `[n, levels]`; `last_distances` is needed by
    `balanced`; `priority` `[n]` orders the extra levels' codes (highest first), each at most
    `max_width` wide."""
    codes = np.asarray(codes, np.int32)
    before = collision_stats(codes)
    resolved, sizes = codes, tuple(codebook_sizes)
    if before.max_items_per_leaf > 1 and method == "balanced":
        if last_distances is None:
            raise ValueError("balanced collision handling needs the last level's distances")
        resolved = balance_last_level(resolved, np.asarray(last_distances))
    if collision_stats(resolved).max_items_per_leaf > 1:
        resolved, extra_sizes = add_disambiguation_levels(resolved, priority, max_width)
        sizes = (*sizes, *extra_sizes)
    return Resolved(resolved, sizes, before, collision_stats(resolved))
