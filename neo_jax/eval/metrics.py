"""Leave-one-out ranking metrics: Recall@K and NDCG@K over ranked item lists.

Each user has one held-out target item; the model returns a ranked list of item rows
(`-1` pads lists shorter than K, e.g. when fewer valid items were decoded). With a single
relevant item, Recall@K is the hit rate and NDCG@K is `1 / log2(rank + 2)` at the
target's 0-based rank, 0 when it is missing. A list that holds the target more than once
counts its first (best) position only, so a user's Recall@K never exceeds 1. Any K from 1 to
the lists' length can be asked for, e.g. `ks=(1, 5, 10, 20)`.

`history_repeats` measures how often a ranking names what the user already has: on a dataset
without repeat purchases (Amazon Beauty has none) every such slot is wasted.
"""

from __future__ import annotations

import numpy as np

from neo_jax.errors import UserError


def ranking_metrics(ranked: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (5, 10)) -> dict[str, float]:
    """`ranked` `[users, max_k]` item rows best first (-1 pads), `targets` `[users]`."""
    ranked = np.asarray(ranked)
    targets = np.asarray(targets)
    if ranked.ndim != 2 or targets.shape != (ranked.shape[0],):
        raise UserError(f"ranked must be [users, k] and targets [users], got {ranked.shape} and {targets.shape}")
    if ranked.shape[0] == 0:
        raise UserError("no users to evaluate")
    if targets.min() < 0:
        raise UserError("targets must be catalog rows (>= 0); -1 only pads ranked lists")
    if not ks or min(ks) < 1:
        raise UserError(f"ks must be one or more positive cutoffs, got {tuple(ks)}")
    if max(ks) > ranked.shape[1]:
        raise UserError(f"asked for @{max(ks)} but the ranked lists hold {ranked.shape[1]} items")
    hits = ranked == targets[:, None]  # [users, max_k]
    first = np.where(hits.any(axis=1), hits.argmax(axis=1), ranked.shape[1])  # [users] rank of target
    metrics = {}
    for k in ks:
        found = first < k  # [users]
        metrics[f"recall@{k}"] = float(found.mean())
        metrics[f"ndcg@{k}"] = float(np.where(found, 1.0 / np.log2(first + 2.0), 0.0).mean())
    return metrics


def history_repeats(ranked: np.ndarray, histories: list[set[int]], ks: tuple[int, ...] = (10,)) -> dict[str, float]:
    """`history_first`: the share of users whose first-ranked item is in their history;
    `history_share@K`: the share of the top-K slots naming a history item. `ranked` `[users,
    max_k]` item rows best first (-1 pads), `histories` each user's item rows."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2 or len(histories) != ranked.shape[0]:
        raise UserError(f"ranked must be [users, k] with one history per user, got {ranked.shape} "
                        f"and {len(histories)} histories")
    if max(ks) > ranked.shape[1]:
        raise UserError(f"asked for @{max(ks)} but the ranked lists hold {ranked.shape[1]} items")
    in_history = np.stack([np.isin(row, np.fromiter(history, np.int64, len(history)))
                           for row, history in zip(ranked, histories)]) & (ranked >= 0)  # [users, max_k]
    metrics = {"history_first": float(in_history[:, 0].mean())}
    for k in ks:
        metrics[f"history_share@{k}"] = float(in_history[:, :k].mean())
    return metrics
