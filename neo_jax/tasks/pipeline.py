"""The training input pipeline: ArrayRecord shards -> packed, batched token arrays, with grain.

Per process: take every `shard_count`-th record starting at `shard_index`, shuffle with a
seed (a new order each epoch), decode each record into next-token features, pack several
examples into each row of `seq_len` tokens (grain first-fit packing), batch and prefetch.
With `task_weights` the records are first split by their `task` field (one scan of the
shard), each task's records shuffled and repeated on their own, and the tasks interleaved
in the given proportions (`grain.MapDataset.mix`); tasks without a weight are left out.
Each batch is a dict of numpy arrays, all `[batch_size, seq_len]`:
- `tokens` int32: input ids;
- `targets` int32: the id to predict at each position (the next token);
- `loss_mask` float32: 1.0 where the target is a completion or end token (learned), -1.0 where
  it is a token of an avoided span (`TokenizedExample.avoid`: made unlikely, `neo_jax.model.loss`),
  else 0.0;
- `segment_ids` int32: 1, 2, ... for the examples packed into the row, 0 for padding
  (attention must not cross segments);
- `positions` int32: position within the example (restarts at 0 for each segment);
- `item_ids` int32, only when `make_dataset` is given an `ItemIds`: the catalog item each `[/SID]`
  closes, 1 + its row, else 0 (`neo_jax.catalog.item_ids`; the input of a model with item identity).
An example longer than `seq_len + 1` tokens keeps its first `seq_len + 1`: a last resort that
can cut the completion (or all of it, after a long prompt). Records written with a length limit of
`seq_len + 1` (`write_records(max_length=...)`, `neo-jax data records --max-length`) never need it:
those examples were fitted by dropping prompt history, with the completion kept whole.
The iterator is a grain `DatasetIterator`: `get_state()` / `set_state()` resume it exactly
(orbax saves it with `grain.checkpoint.CheckpointSave(iterator)`).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import grain
import numpy as np

from neo_jax.catalog.item_ids import ItemIds
from neo_jax.tasks.packed import unpack
from neo_jax.tasks.records import TokenizedExample
from neo_jax.errors import UserError

BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
_PACKED_FEATURES = ("tokens", "targets", "loss_mask")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    seq_len: int = 512
    batch_size: int = 8  # rows per process
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    packing_bins: int = 0  # rows packed at once; 0 means batch_size
    read_threads: int = 2
    read_buffer: int = 64  # records read ahead
    prefetch_batches: int = 2  # batches prepared ahead in a background thread
    drop_remainder: bool = True
    task_weights: Mapping[str, float] = dataclasses.field(default_factory=dict)  # empty: the records' own mix

    def __post_init__(self):
        if self.seq_len < 2 or self.batch_size < 1 or self.packing_bins < 0:
            raise UserError("seq_len must be at least 2, batch_size positive, packing_bins non-negative")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise UserError(f"num_epochs must be positive or None, got {self.num_epochs}")
        check_task_weights(self.task_weights, "task_weights")
        if self.task_weights and self.num_epochs is not None:
            raise UserError("a task mix (task_weights) repeats every task forever: num_epochs must be None")


def check_task_weights(weights: Mapping[str, float], setting: str) -> None:
    """Weights are non-negative numbers, at least one positive (an empty mapping is the natural mix)."""
    if not weights:
        return
    if any(not isinstance(w, (int, float)) or w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise UserError(f"{setting}: weights must be non-negative numbers, not all zero; got {dict(weights)}")


def task_of(record: bytes) -> str:
    """The `task` field of one serialized example (see `neo_jax.tasks.records`)."""
    return unpack(record)[0][0]


def record_tasks(records: grain.MapDataset, read_threads: int = 2) -> np.ndarray:
    """`[records]` the task name of every record, in order (reads each record once)."""
    tasks = records.map(task_of).to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
    return np.asarray(list(tasks), dtype=object)


def _task_mix(records: grain.MapDataset, config: PipelineConfig, where: str) -> grain.MapDataset:
    """The records of each weighted task, shuffled and repeated on their own, interleaved by weight."""
    tasks = record_tasks(records, config.read_threads)  # [records]
    weighted = sorted(task for task, weight in config.task_weights.items() if weight > 0)
    missing = [task for task in weighted if not (tasks == task).any()]
    if missing:
        raise UserError(f"task_weights names task(s) {missing} that {where} has no records of; "
                        f"its tasks are {sorted(set(tasks))}")
    parts = []
    for task in weighted:
        rows = np.flatnonzero(tasks == task)  # [task records] positions in `records`
        part = grain.MapDataset.range(rows.size).map(lambda i, rows=rows: records[int(rows[i])])
        parts.append((part.shuffle(seed=config.seed) if config.shuffle else part).repeat())
    return grain.MapDataset.mix(parts, [config.task_weights[task] for task in weighted])


def next_token_features(record: bytes, seq_len: int) -> dict[str, np.ndarray]:
    """One serialized example as unpacked features of length <= seq_len."""
    example = TokenizedExample.from_bytes(record)
    parts = (example.prompt, example.completion, example.avoid, example.end)
    sequence = np.concatenate(parts)[: seq_len + 1]  # [len + 1]
    part_mask = np.repeat(np.array([0, 1, -1, 1], np.int32), [p.size for p in parts])  # prompt, learned, avoided, end
    return {"tokens": sequence[:-1], "targets": sequence[1:], "loss_mask": part_mask[1:sequence.size]}


def _batch_layout(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain's packed features (`tokens_segment_ids`, ...) -> the batch keys of this module."""
    return {"tokens": packed["tokens"], "targets": packed["targets"],
            "loss_mask": packed["loss_mask"].astype(np.float32),
            "segment_ids": packed["tokens_segment_ids"], "positions": packed["tokens_positions"]}


def shard_records(paths: Sequence[str], shard_index: int, shard_count: int) -> grain.MapDataset:
    """Every `shard_count`-th record of the ArrayRecord files `paths`, from record `shard_index` on."""
    if not 0 <= shard_index < shard_count:
        raise UserError(f"shard_index {shard_index} is outside 0..{shard_count - 1}")
    source = grain.sources.ArrayRecordDataSource(list(paths))
    if len(source) < shard_count:
        raise UserError(f"{len(source)} records in {paths[0]} ... cannot feed {shard_count} data shards")
    return grain.MapDataset.source(source)[shard_index::shard_count]


def make_dataset(paths: Sequence[str], config: PipelineConfig, shard_index: int = 0,
                 shard_count: int = 1, item_ids: ItemIds | None = None) -> grain.IterDataset:
    """The batches of this process (`shard_index` of `shard_count`, e.g. `jax.process_index()`
    of `jax.process_count()`), with `item_ids` from the packed tokens when `item_ids` is given."""
    records = shard_records(paths, shard_index, shard_count)
    if config.task_weights:
        records = _task_mix(records, config, f"shard {shard_index} of {shard_count} of {paths[0]} ...")
    else:
        records = (records.shuffle(seed=config.seed) if config.shuffle else records).repeat(config.num_epochs)
    features = (records
                .map(lambda record: next_token_features(record, config.seq_len))
                .to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.read_buffer)))
    packed = grain.experimental.FirstFitPackIterDataset(
        features,
        length_struct={name: config.seq_len for name in _PACKED_FEATURES},
        num_packing_bins=config.packing_bins or config.batch_size,
        seed=config.seed,
        shuffle_bins=config.shuffle,
    )
    rows = packed.map(_batch_layout)
    if item_ids is not None:
        rows = rows.map(lambda row: {**row, "item_ids": item_ids(row["tokens"])})
    batches = rows.batch(config.batch_size, drop_remainder=config.drop_remainder)
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch_batches)


def make_iterator(paths: Sequence[str], config: PipelineConfig, shard_index: int = 0,
                  shard_count: int = 1, item_ids: ItemIds | None = None) -> grain.DatasetIterator:
    """An iterator over `make_dataset`'s batches; checkpoint it with `get_state()`/`set_state()`."""
    return iter(make_dataset(paths, config, shard_index, shard_count, item_ids))
