"""Leave-one-out splits of user histories (the TIGER protocol) and a held-out share of queries.

For a user with history `s_0 .. s_{n-1}`: the test example predicts `s_{n-1}` from
`s_0 .. s_{n-2}`, the validation example predicts `s_{n-2}` from `s_0 .. s_{n-3}`, and
training uses only `s_0 .. s_{n-3}` (every prefix predicts its next item). So no
validation or test target is ever a training target or part of a training history.
Users with fewer than `MIN_EVAL_LENGTH` items have no evaluation examples; their whole
history is training data.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from neo_jax.data.schema import Queries
from neo_jax.errors import UserError

MIN_EVAL_LENGTH = 3


@dataclasses.dataclass(frozen=True)
class SequenceExample:
    """Predict `target` from `history`; `position` is the target's index in the user's history."""

    user: int  # index into Interactions.user_ids
    history: np.ndarray  # [position] int32 catalog rows, oldest first
    target: int  # catalog row
    position: int


@dataclasses.dataclass(frozen=True)
class LeaveOneOutSplit:
    train: list[SequenceExample]
    valid: list[SequenceExample]
    test: list[SequenceExample]
    train_sequences: list[np.ndarray]  # per user: the training part of the history (for collaborative models)


def leave_one_out(sequences: list[np.ndarray]) -> LeaveOneOutSplit:
    """Split per-user time-ordered histories (`Interactions.sequences()`)."""
    train, valid, test, train_sequences = [], [], [], []
    for user, sequence in enumerate(sequences):
        n = len(sequence)
        evaluated = n >= MIN_EVAL_LENGTH
        train_part = sequence[: n - 2] if evaluated else sequence
        train_sequences.append(train_part)
        train.extend(SequenceExample(user, train_part[:t], int(train_part[t]), t) for t in range(1, len(train_part)))
        if evaluated:
            valid.append(SequenceExample(user, sequence[: n - 2], int(sequence[n - 2]), n - 2))
            test.append(SequenceExample(user, sequence[: n - 1], int(sequence[n - 1]), n - 1))
    return LeaveOneOutSplit(train, valid, test, train_sequences)


def split_queries(queries: Queries, test_fraction: float, seed: int) -> tuple[Queries, Queries]:
    """`(train, test)`: a seeded random `test_fraction` of the queries is held out.

    Queries with the same text stay on the same side, so a held-out query is never seen in training.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"query test fraction must be in [0, 1), got {test_fraction}")
    distinct = sorted(set(queries.texts))
    held_out = set(np.random.default_rng(seed).permutation(distinct)[: round(test_fraction * len(distinct))])
    test_indices = [i for i, text in enumerate(queries.texts) if text in held_out]
    train_indices = [i for i, text in enumerate(queries.texts) if text not in held_out]
    return queries.subset(train_indices), queries.subset(test_indices)
