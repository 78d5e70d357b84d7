"""Train SASRec on leave-one-out training sequences; pick the epoch by validation NDCG@10.

Each user's training sequence gives one example: its newest `max_len + 1` items, every
position predicting the next. An epoch shuffles the users, sorts each window of
`batch_size * SORT_WINDOW` users by length and cuts batches from it, so a batch is padded
only to the next bucket length (8, 16, 32, ... up to `max_len`), not always to `max_len`:
Amazon histories are short, which makes this several times faster, and since the model's
results do not depend on padding it trains the same function. Validation runs every
`eval_every` epochs; training stops after `patience` evaluations without a better
NDCG@10, and the test split is ranked once, with the best epoch's parameters. The
popularity baseline (`baselines.popularity`: training-event counts) is ranked with the same
history exclusion.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from neo_jax.baselines.popularity import popularity_metrics, training_counts
from neo_jax.baselines.sasrec import Params, SasRec, SasRecConfig, TrainStep, make_recommender, make_train_step
from neo_jax.config import ConfigError
from neo_jax.data.splits import LeaveOneOutSplit, SequenceExample
from neo_jax.errors import UserError
from neo_jax.eval.metrics import ranking_metrics

SORT_WINDOW = 64  # batches whose users are sorted by length together
SELECTION_METRIC = "ndcg@10"
TOP_K = 10


@dataclasses.dataclass(frozen=True)
class SasRecTrainConfig:
    model: SasRecConfig = SasRecConfig()
    learning_rate: float = 1e-3
    batch_size: int = 128  # users a step
    epochs: int = 200
    eval_every: int = 1  # epochs between validations
    patience: int = 5  # validations without a better NDCG@10 before stopping
    exclude_history: bool = True  # never recommend an item already in the user's history
    eval_batch_size: int = 1024
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "epochs", "eval_every", "patience", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")


def left_padded(sequences: Sequence[np.ndarray], length: int) -> np.ndarray:
    """`[len(sequences), length]` int32: the newest `length` items of each sequence, right-aligned, -1 before."""
    out = np.full((len(sequences), length), -1, np.int32)
    for row, sequence in enumerate(sequences):
        newest = sequence[len(sequence) - length:] if len(sequence) > length else sequence
        out[row, length - len(newest):] = newest
    return out


@dataclasses.dataclass(frozen=True)
class TrainingWindows:
    """One row per user with at least two training items, plus a last all-padding row."""

    inputs: np.ndarray  # [users + 1, max_len] int32 catalog rows, -1 padding
    targets: np.ndarray  # [users + 1, max_len] int32 the row after each input, -1 padding
    lengths: np.ndarray  # [users] real positions of each row

    @classmethod
    def of(cls, train_sequences: Sequence[np.ndarray], max_len: int) -> TrainingWindows:
        usable = [s for s in train_sequences if len(s) >= 2]
        if not usable:
            raise UserError("no user has two or more training items; nothing to train on")
        windows = left_padded(usable, max_len + 1)  # [users, max_len + 1]
        padding = np.full((1, max_len), -1, np.int32)
        return cls(np.concatenate([windows[:, :-1], padding]), np.concatenate([windows[:, 1:], padding]),
                   np.minimum([len(s) - 1 for s in usable], max_len))

    @property
    def padding_row(self) -> int:
        return len(self.lengths)


def bucket_lengths(max_len: int) -> list[int]:
    """8, 16, 32, ... below `max_len`, then `max_len`: the few padded lengths a batch can have."""
    return [b for b in (2 ** p for p in range(3, max_len.bit_length())) if b < max_len] + [max_len]


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Row indices of each batch of one epoch: shuffled, length-sorted within windows, in shuffled order."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * SORT_WINDOW):
        window = order[start:start + batch_size * SORT_WINDOW]
        window = window[np.argsort(lengths[window], kind="stable")]
        batches.extend(window[i:i + batch_size] for i in range(0, len(window), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def train_epoch(train_step: TrainStep, params: Params, opt_state: optax.OptState, windows: TrainingWindows,
                batch_size: int, rng: np.random.Generator, key: jax.Array) -> tuple[Params, optax.OptState, float]:
    """One pass over every training sequence; returns the new state and the mean loss of all targets."""
    buckets = np.array(bucket_lengths(windows.inputs.shape[1]))
    batches = epoch_batches(windows.lengths, batch_size, rng)
    losses, weights = [], []
    for batch, step_key in zip(batches, jax.random.split(key, len(batches))):
        length = int(buckets[np.searchsorted(buckets, windows.lengths[batch].max())])
        rows = np.pad(batch, (0, batch_size - len(batch)), constant_values=windows.padding_row)  # [batch_size]
        params, opt_state, loss = train_step(params, opt_state, windows.inputs[rows, -length:],
                                             windows.targets[rows, -length:], step_key)
        losses.append(loss)
        weights.append(windows.lengths[batch].sum())
    return params, opt_state, float(np.average(np.asarray(jax.device_get(losses)), weights=weights))


@dataclasses.dataclass(frozen=True)
class RankingInputs:
    """What ranking a split needs: each user's newest items, the items not to recommend, the targets."""

    history: np.ndarray  # [users, max_len] int32 catalog rows, -1 padding
    excluded: np.ndarray  # [users, longest history] int32, -1 padding ([users, 0] without exclusion)
    targets: np.ndarray  # [users] int32

    @classmethod
    def of(cls, examples: Sequence[SequenceExample], max_len: int, exclude_history: bool) -> RankingInputs:
        histories = [e.history for e in examples]
        longest = max(len(h) for h in histories) if exclude_history else 0
        return cls(left_padded(histories, max_len), left_padded(histories, longest),
                   np.array([e.target for e in examples], np.int32))


def rank_in_batches(rank: Callable[[np.ndarray, np.ndarray], jax.Array], inputs: RankingInputs,
                    batch_size: int) -> np.ndarray:
    """`[users, TOP_K]` of `rank(history [batch, max_len], excluded [batch, m])`; the last batch is padded
    to `batch_size` with empty users so that every call has the same shapes."""
    ranked = []
    for start in range(0, len(inputs.targets), batch_size):
        history, excluded = inputs.history[start:start + batch_size], inputs.excluded[start:start + batch_size]
        missing = batch_size - len(history)
        history = np.pad(history, ((0, missing), (0, 0)), constant_values=-1)
        excluded = np.pad(excluded, ((0, missing), (0, 0)), constant_values=-1)
        ranked.append(np.asarray(rank(history, excluded))[:batch_size - missing])
    return np.concatenate(ranked)


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def train_sasrec(split: LeaveOneOutSplit, num_items: int, config: SasRecTrainConfig,
                 log: Callable[[str], None], ks: tuple[int, ...] = (5, 10)) -> dict:
    """Train on `split.train_sequences`; return the best-validation epoch's valid and test metrics
    at `ks` (`test` under `config.exclude_history`, `test_protocols` under both: history items kept
    in the ranking and excluded from it), the popularity baseline of the same users, and the
    per-evaluation history."""
    if not split.valid:
        raise UserError("no user has the three items leave-one-out needs (train, validation, test)")
    max_len = config.model.max_len
    windows = TrainingWindows.of(split.train_sequences, max_len)
    valid = RankingInputs.of(split.valid, max_len, config.exclude_history)
    test = RankingInputs.of(split.test, max_len, config.exclude_history)
    counts = training_counts(split.train_sequences, num_items)  # [num_items]
    popularity = {name: popularity_metrics(counts, inputs.targets, excluded=inputs.excluded)
                  for name, inputs in (("valid", valid), ("test", test))}
    log(f"popularity: valid {_format(popularity['valid'])} | test {_format(popularity['test'])}")

    init_key, dropout_key = jax.random.split(jax.random.key(config.seed))
    graphdef, params = nnx.split(SasRec(num_items, config.model, nnx.Rngs(params=init_key)))
    optimizer = optax.adam(config.learning_rate)
    opt_state = optimizer.init(params)
    train_step = make_train_step(graphdef, optimizer)
    recommend = make_recommender(graphdef, max(TOP_K, *ks))
    rng = np.random.default_rng(config.seed)
    log(f"sasrec: {len(windows.lengths)} training sequences, {num_items} items, "
        f"{sum(x.size for x in jax.tree.leaves(params))} parameters, batch lengths {bucket_lengths(max_len)}")

    def evaluate(params, inputs: RankingInputs) -> dict[str, float]:
        ranked = rank_in_batches(functools.partial(recommend, params), inputs, config.eval_batch_size)
        return ranking_metrics(ranked, inputs.targets, ks)

    history, best, best_params, train_seconds, waited = [], None, params, 0.0, 0
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        dropout_key, epoch_key = jax.random.split(dropout_key)
        params, opt_state, loss = train_epoch(train_step, params, opt_state, windows, config.batch_size, rng,
                                              epoch_key)
        epoch_seconds = time.perf_counter() - started
        train_seconds += epoch_seconds
        if epoch % config.eval_every and epoch != config.epochs:
            log(f"epoch {epoch}/{config.epochs} loss {loss:.4f} ({epoch_seconds:.1f} s)")
            continue
        metrics = evaluate(params, valid)
        history.append({"epoch": epoch, "loss": loss, "valid": metrics, "epoch_seconds": epoch_seconds})
        improved = best is None or metrics[SELECTION_METRIC] > best["valid"][SELECTION_METRIC]
        if improved:
            best, best_params, waited = history[-1], params, 0
        else:
            waited += 1
        log(f"epoch {epoch}/{config.epochs} loss {loss:.4f} valid {_format(metrics)}"
            f"{' *' if improved else ''} ({epoch_seconds:.1f} s train, "
            f"{time.perf_counter() - started - epoch_seconds:.1f} s eval)")
        if waited >= config.patience:
            log(f"early stop: no better valid {SELECTION_METRIC} in {waited} evaluations")
            break
    test_protocols = {name: evaluate(best_params, RankingInputs.of(split.test, max_len, exclude))
                      for name, exclude in (("history_kept", False), ("history_excluded", True))}
    test_metrics = test_protocols["history_excluded" if config.exclude_history else "history_kept"]
    log(f"best epoch {best['epoch']}: test {_format(test_metrics)}")
    return {"best_epoch": best["epoch"], "epochs_run": epoch, "train_seconds_per_epoch": train_seconds / epoch,
            "users": {"valid": len(valid.targets), "test": len(test.targets)}, "items": num_items,
            "valid": best["valid"], "test": test_metrics, "test_protocols": test_protocols,
            "popularity_baseline": popularity, "history": history}
