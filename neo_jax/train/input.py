"""This process's rows of each global batch, from the grain pipeline of `neo_jax.tasks.pipeline`
(or, in the `preference` stage, of `neo_jax.tasks.preference`).

The global batch is `num_shards` equal parts side by side (`[batch, ...]` = part 0
rows, part 1 rows, ...); part i is built from every num_shards-th record starting at
record i. Process p of P reads parts `p*K .. p*K+K-1` (K = num_shards / P) and zips them
into its `[batch / P, ...]` rows. The batches therefore depend on `num_shards` only:
one process and several processes see the same global batches. The zipped iterator is a
grain `DatasetIterator`, so its state (every part's position) is checkpointed exactly.
"""

from __future__ import annotations

from typing import Callable, Mapping

import grain
import jax
import numpy as np

from neo_jax.catalog.item_ids import ItemIds
from neo_jax.tasks.pipeline import PipelineConfig, make_dataset
from neo_jax.tasks.preference import make_preference_dataset, preference_layout
from neo_jax.tasks.records import record_paths
from neo_jax.train.config import TrainConfig, num_data_shards

# (record paths, rows per part, shuffle, shard index, shard count) -> one part's batches
PartFactory = Callable[[list[str], int, bool, int, int], grain.IterDataset]


def _concat_parts(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    """K parts of `[rows, ...]` -> `[K * rows, ...]` per field."""
    return {key: np.concatenate([part[key] for part in parts], axis=0) for key in parts[0]}


def _process_batches(config: TrainConfig, split: str, shuffle: bool, part: PartFactory) -> grain.DatasetIterator:
    """An endless iterator over this process's rows of the global batches of `split`."""
    process_count, process_index = jax.process_count(), jax.process_index()
    shards = num_data_shards(config, process_count)
    per_process = shards // process_count
    paths = record_paths(config.data.records_dir, split)
    parts = [part(paths, config.batch_size // shards, shuffle, shard, shards)
             for shard in range(process_index * per_process, (process_index + 1) * per_process)]
    return iter(grain.experimental.ZipIterDataset(parts).map(_concat_parts))


def _packed_parts(config: TrainConfig, task_weights: Mapping[str, float], item_ids: ItemIds | None) -> PartFactory:
    """Parts packed from task records (`neo_jax.tasks.pipeline`), mixed by `task_weights` (empty: as written)."""
    def part(paths, rows, shuffle, shard, shards):
        pipeline = PipelineConfig(seq_len=config.seq_len, batch_size=rows, seed=config.seed, shuffle=shuffle,
                                  packing_bins=config.data.packing_bins, read_threads=config.data.read_threads,
                                  prefetch_batches=config.data.prefetch_batches, task_weights=task_weights)
        return make_dataset(paths, pipeline, shard_index=shard, shard_count=shards, item_ids=item_ids)
    return part


def _preference_parts(config: TrainConfig, item_ids: ItemIds | None) -> PartFactory:
    """Parts of preference groups (`neo_jax.tasks.preference`), one chosen and the rejected each."""
    candidates = preference_layout(config.data.records_dir)["candidates"]

    def part(paths, rows, shuffle, shard, shards):
        return make_preference_dataset(paths, config.seq_len, candidates, rows, config.seed, shuffle, shard, shards,
                                       config.data.read_threads, config.data.prefetch_batches, item_ids)
    return part


def _parts(config: TrainConfig, task_weights: Mapping[str, float], item_ids: ItemIds | None) -> PartFactory:
    """The stage's parts: preference groups in the preference stage, else packed task records; with
    `item_ids` (a model with item identity), the batches carry the items the `[/SID]` tokens close."""
    if config.stage == "preference":
        return _preference_parts(config, item_ids)
    return _packed_parts(config, task_weights, item_ids)


def train_batches(config: TrainConfig, item_ids: ItemIds | None = None) -> grain.DatasetIterator:
    return _process_batches(config, config.data.train_split, config.data.shuffle,
                            _parts(config, config.data.task_weights, item_ids))


def validation_batches(config: TrainConfig, item_ids: ItemIds | None = None) -> grain.DatasetIterator:
    """The validation split in file order, its own task mix; every evaluation reads the same first
    `eval.batches` batches."""
    return _process_batches(config, config.data.valid_split, False, _parts(config, {}, item_ids))
