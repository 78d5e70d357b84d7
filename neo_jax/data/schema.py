"""In-memory form of a recommendation dataset: the catalog, interactions and search queries.

Items are addressed by their catalog row (`0 .. n_items-1`) everywhere after loading;
`Catalog.item_ids` maps rows back to the user's own ids.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np

from neo_jax.errors import UserError

POSITIVE = 1
NEUTRAL = 0  # seen and judged neither way (a middling rating): neither history nor a dislike
NEGATIVE = -1
FEEDBACK_NAMES = {POSITIVE: "positive", NEUTRAL: "neutral", NEGATIVE: "negative"}


@dataclasses.dataclass(frozen=True)
class Catalog:
    """Items with an entity type, text fields and an optional precomputed embedding.

    `texts[field][row]` is that item's text for the field (`""` where it has none);
    fields keep the order of the source file's columns.
    """

    item_ids: list[str]
    type_names: tuple[str, ...]
    item_types: np.ndarray  # [n_items] int32, index into type_names
    texts: dict[str, list[str]]
    embeddings: np.ndarray | None = None  # [n_items, dim] float32, or a read-only np.memmap of a float dtype

    def __post_init__(self):
        n = len(self.item_ids)
        if self.item_types.shape != (n,):
            raise UserError(f"catalog: item_types has shape {self.item_types.shape}, expected ({n},)")
        if n and not (0 <= self.item_types.min() and self.item_types.max() < len(self.type_names)):
            raise UserError("catalog: an item type index is outside type_names")
        for field, values in self.texts.items():
            if len(values) != n:
                raise UserError(f"catalog: text field {field!r} has {len(values)} values for {n} items")
        if self.embeddings is not None and (self.embeddings.ndim != 2 or self.embeddings.shape[0] != n):
            raise UserError(f"catalog: embeddings have shape {self.embeddings.shape}, expected ({n}, dim)")
        if len(self.row_of) != n:
            counts = collections.Counter(self.item_ids)
            duplicate = next(item_id for item_id, count in counts.items() if count > 1)
            raise UserError(f"catalog: item id {duplicate!r} appears more than once")

    def __len__(self) -> int:
        return len(self.item_ids)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Item id -> catalog row."""
        return {item_id: row for row, item_id in enumerate(self.item_ids)}

    def type_name(self, row: int) -> str:
        return self.type_names[int(self.item_types[row])]

    def rows_of_type(self, type_name: str) -> np.ndarray:
        """[n] int64 catalog rows of one entity type."""
        if type_name not in self.type_names:
            raise UserError(f"unknown entity type {type_name!r}; the catalog has {list(self.type_names)}")
        return np.flatnonzero(self.item_types == self.type_names.index(type_name))

    def item_text(self, row: int) -> str:
        """All non-empty text fields of one item, as `field: value | field: value`."""
        return " | ".join(f"{field}: {values[row]}" for field, values in self.texts.items() if values[row])

    def title(self, row: int) -> str:
        """A short name for an item: its `title` (or `name`) field, else its first non-empty field."""
        for field in ("title", "name"):
            if field in self.texts and self.texts[field][row]:
                return self.texts[field][row]
        return next((values[row] for values in self.texts.values() if values[row]), self.item_ids[row])

    def with_embeddings(self, embeddings: np.ndarray) -> "Catalog":
        """A memory map is kept as it is (read a batch at a time where it is used); anything else as float32."""
        if not isinstance(embeddings, np.memmap):
            embeddings = np.asarray(embeddings, np.float32)
        return dataclasses.replace(self, embeddings=embeddings)


@dataclasses.dataclass(frozen=True)
class Interactions:
    """One row per event: who touched which item when, with optional rating and feedback.

    `feedback` is `POSITIVE` (1), `NEUTRAL` (0) or `NEGATIVE` (-1); without a feedback column every
    event counts as positive. Histories are the positive events; negative and neutral ones are feedback.
    """

    user_ids: list[str]
    users: np.ndarray  # [n_events] int32, index into user_ids
    items: np.ndarray  # [n_events] int32, catalog rows
    timestamps: np.ndarray  # [n_events] int64
    ratings: np.ndarray | None = None  # [n_events] float32
    feedback: np.ndarray | None = None  # [n_events] int8, POSITIVE, NEUTRAL or NEGATIVE

    def __post_init__(self):
        n = self.users.shape[0]
        for name in ("items", "timestamps", "ratings", "feedback"):
            value = getattr(self, name)
            if value is not None and value.shape != (n,):
                raise UserError(f"interactions: {name} has shape {value.shape}, expected ({n},)")

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    def _time_order(self) -> np.ndarray:
        """[n_events] event indices sorted by (user, timestamp), ties in file order."""
        return np.lexsort((np.arange(len(self)), self.timestamps, self.users))

    def _per_user(self, keep: np.ndarray) -> list[np.ndarray]:
        order = self._time_order()
        order = order[keep[order]]
        bounds = np.searchsorted(self.users[order], np.arange(self.num_users + 1))
        items = self.items[order]
        return [items[bounds[u]:bounds[u + 1]] for u in range(self.num_users)]

    def sequences(self) -> list[np.ndarray]:
        """Per user (index into `user_ids`): the time-ordered catalog rows of positive events."""
        positive = np.ones(len(self), bool) if self.feedback is None else self.feedback == POSITIVE
        return self._per_user(positive)

    def negatives(self) -> list[np.ndarray]:
        """Per user: the time-ordered catalog rows of events with negative feedback."""
        negative = np.zeros(len(self), bool) if self.feedback is None else self.feedback == NEGATIVE
        return self._per_user(negative)

    def negatives_before(self, positives_kept: list[int], kind: int = NEGATIVE) -> list[np.ndarray]:
        """Per user u: the time-ordered catalog rows of feedback events of `kind` (negative, or with
        `NEUTRAL` neutral) that come before the user's
        positive event number `positives_kept[u]` (0-based, in the order of `sequences()`), i.e.
        while only the first `positives_kept[u]` items of the positive history had happened; all of
        them when the user has no more positives than that. Events are ordered by timestamp, ties
        in file order, exactly as `sequences()` orders the positives, so a negative at the same
        moment as that positive counts as before it only if the file lists it first."""
        if len(positives_kept) != self.num_users:
            raise UserError(f"negatives_before: {len(positives_kept)} cut-offs for {self.num_users} users")
        positive = np.ones(len(self), bool) if self.feedback is None else self.feedback == POSITIVE
        negative = np.zeros(len(self), bool) if self.feedback is None else self.feedback == kind
        order = self._time_order()
        users = self.users[order]
        bounds = np.searchsorted(users, np.arange(self.num_users + 1))
        seen = np.concatenate([[0], np.cumsum(positive[order])])  # [n_events + 1] positives before each
        positives_before = seen[:-1] - seen[bounds[users]]  # [n_events] of the same user, in time order
        keep = np.zeros(len(self), bool)
        keep[order] = negative[order] & (positives_before <= np.asarray(positives_kept, np.int64)[users])
        return self._per_user(keep)


@dataclasses.dataclass(frozen=True)
class Queries:
    """Search queries and, for each, the catalog rows that answer it."""

    texts: list[str]
    relevant: list[np.ndarray]  # per query: [n_relevant] int32 catalog rows

    def __post_init__(self):
        if len(self.texts) != len(self.relevant):
            raise UserError(f"queries: {len(self.texts)} texts but {len(self.relevant)} relevance lists")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "Queries":
        return Queries([self.texts[i] for i in indices], [self.relevant[i] for i in indices])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Everything one data directory holds."""

    catalog: Catalog
    interactions: Interactions
    queries: Queries | None = None
