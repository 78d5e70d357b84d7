"""The most-popular baseline: recommend every user the most frequent training items.

Counts are training events per item (`training_counts` of a leave-one-out split's
`train_sequences`, so no validation or test target is counted). Ties go to the lower catalog
row. With several entity types, `item_groups` (each item's type) and `user_groups` (the type
each user asks for) restrict every user to items of its own type. With `excluded`, a user is
never recommended an item of its own history: it gets the next most frequent ones instead.
`neo-jax baseline popularity`, the popularity figures of `baseline sasrec` and of the
quickstart all come from `popularity_ranking`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from neo_jax.data.schema import Catalog
from neo_jax.data.splits import LeaveOneOutSplit, SequenceExample
from neo_jax.errors import UserError
from neo_jax.eval.metrics import ranking_metrics


def training_counts(train_sequences: Sequence[np.ndarray], num_items: int) -> np.ndarray:
    """`[num_items]` int64 events of each catalog row in the training sequences."""
    events = [np.asarray(s, np.int64) for s in train_sequences]
    events = np.concatenate(events) if events else np.zeros(0, np.int64)
    if events.size and not (0 <= events.min() and events.max() < num_items):
        raise UserError(f"training sequences hold rows outside 0 .. {num_items - 1}")
    return np.bincount(events, minlength=num_items)


def popularity_order(counts: np.ndarray) -> np.ndarray:
    """`[num_items]` catalog rows, most frequent first, ties by lower row."""
    return np.argsort(-np.asarray(counts), kind="stable")


def padded_rows(rows: Sequence[Iterable[int]]) -> np.ndarray:
    """`[len(rows), longest]` int64 of each user's rows (e.g. history sets), -1 padding after."""
    lists = [sorted(int(r) for r in user_rows) for user_rows in rows]
    out = np.full((len(lists), max((len(r) for r in lists), default=0)), -1, np.int64)
    for i, user_rows in enumerate(lists):
        out[i, :len(user_rows)] = user_rows
    return out


def popularity_ranking(counts: np.ndarray, users: int, k: int, excluded: np.ndarray | None = None,
                       item_groups: np.ndarray | None = None, user_groups: np.ndarray | None = None) -> np.ndarray:
    """`[users, k]` int64 catalog rows, most frequent first; -1 pads a list when the user's group has
    fewer than `k` items left.

    `excluded` `[users, m]`: rows each user must not get (-1 padding, anywhere in the row).
    `item_groups` `[num_items]` and `user_groups` `[users]` (integer labels, both or neither): a user
    gets only items whose group equals its own.
    """
    counts = np.asarray(counts)
    num_items = counts.shape[0]
    excluded = np.zeros((users, 0), np.int64) if excluded is None else np.asarray(excluded, np.int64)
    if excluded.ndim != 2 or excluded.shape[0] != users:
        raise UserError(f"excluded must be [users={users}, m], got {excluded.shape}")
    if (item_groups is None) != (user_groups is None):
        raise UserError("give both item_groups and user_groups, or neither")
    if item_groups is None:
        item_groups, user_groups = np.zeros(num_items, np.int64), np.zeros(users, np.int64)
    item_groups, user_groups = np.asarray(item_groups), np.asarray(user_groups)
    if item_groups.shape != (num_items,) or user_groups.shape != (users,):
        raise UserError(f"item_groups must be [{num_items}] and user_groups [{users}], "
                        f"got {item_groups.shape} and {user_groups.shape}")
    # a user drops at most m of the first k + m items of its group, so those always hold its k
    width = k + excluded.shape[1]
    excluded = np.where((excluded >= 0) & (excluded < num_items), excluded, num_items)  # padding -> num_items
    ranked = np.full((users, k), -1, np.int64)
    for group in np.unique(user_groups):
        members = np.flatnonzero(user_groups == group)  # [g] users asking for this group
        rows = np.flatnonzero(item_groups == group)
        top = np.full(width, -1, np.int64)  # [width] the group's most frequent rows, -1 when it has fewer
        top_rows = rows[popularity_order(counts[rows])[:width]]
        top[:len(top_rows)] = top_rows
        position = np.full(num_items + 1, width, np.int64)  # row -> its place in `top` (width: not there)
        position[top_rows] = np.arange(len(top_rows))
        dropped = np.zeros((len(members), width + 1), bool)  # [g, width + 1] the last column absorbs misses
        dropped[np.arange(len(members))[:, None], position[excluded[members]]] = True
        dropped = dropped[:, :width] | (top < 0)  # [g, width]
        kept_first = np.argsort(dropped, axis=1, kind="stable")[:, :k]  # [g, k] kept places, in order
        ranked[members] = np.where(np.take_along_axis(dropped, kept_first, 1), -1, top[kept_first])
    return ranked


def popularity_metrics(counts: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (5, 10),
                       excluded: np.ndarray | None = None, item_groups: np.ndarray | None = None,
                       user_groups: np.ndarray | None = None) -> dict[str, float]:
    """Recall/NDCG@K (`ranking_metrics`) of `popularity_ranking` for one target row per user."""
    targets = np.asarray(targets)
    ranked = popularity_ranking(counts, len(targets), max(ks), excluded, item_groups, user_groups)
    return ranking_metrics(ranked, targets, ks)


def examples_of(split: LeaveOneOutSplit, on: str) -> list[SequenceExample]:
    """The `test` or `valid` examples of a split (a clear error when there are none)."""
    if on not in ("test", "valid"):
        raise UserError(f"the evaluated split must be 'test' or 'valid', got {on!r}")
    examples = split.test if on == "test" else split.valid
    if not examples:
        raise UserError("no user has the three items leave-one-out needs (train, validation, test)")
    return examples


def popularity_ranking_metrics(split: LeaveOneOutSplit, catalog: Catalog, ks: tuple[int, ...] = (5, 10, 20),
                               exclude_history: bool = False, on: str = "test") -> dict[str, float]:
    """`popularity_metrics` of a split's `on` examples (`test` or `valid`), counts from its training
    parts; with several entity types in the catalog, each user gets items of its target's type."""
    examples = examples_of(split, on)
    targets = np.array([e.target for e in examples], np.int64)  # [users]
    excluded = padded_rows([e.history for e in examples]) if exclude_history else None
    groups = (catalog.item_types, catalog.item_types[targets]) if len(catalog.type_names) > 1 else (None, None)
    return popularity_metrics(training_counts(split.train_sequences, len(catalog)), targets, ks, excluded, *groups)
