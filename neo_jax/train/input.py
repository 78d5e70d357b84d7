"""This process's rows of each global batch, from the grain pipeline of `neo_jax.tasks.pipeline`.

The global batch is `num_shards` equal parts side by side (`[batch, seq_len]` = part 0
rows, part 1 rows, ...); part i is packed from every num_shards-th record starting at
record i. Process p of P reads parts `p*K .. p*K+K-1` (K = num_shards / P) and zips them
into its `[batch / P, seq_len]` rows. The batches therefore depend on `num_shards` only:
one process and several processes see the same global batches. The zipped iterator is a
grain `DatasetIterator`, so its state (every part's position) is checkpointed exactly.
"""

from __future__ import annotations

from typing import Mapping

import grain
import jax
import numpy as np

from neo_jax.tasks.pipeline import BATCH_KEYS, PipelineConfig, make_dataset
from neo_jax.tasks.records import record_paths
from neo_jax.train.config import TrainConfig, num_data_shards


def _concat_parts(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    """K parts of `[rows, seq_len]` -> `[K * rows, seq_len]` per field."""
    return {key: np.concatenate([part[key] for part in parts], axis=0) for key in BATCH_KEYS}


def process_batches(config: TrainConfig, split: str, shuffle: bool,
                    task_weights: Mapping[str, float]) -> grain.DatasetIterator:
    """An endless iterator over this process's rows of the global batches of `split`, whose
    records are mixed by `task_weights` (empty: as written)."""
    process_count, process_index = jax.process_count(), jax.process_index()
    shards = num_data_shards(config, process_count)
    per_process = shards // process_count
    pipeline = PipelineConfig(seq_len=config.seq_len, batch_size=config.batch_size // shards, seed=config.seed,
                              shuffle=shuffle, packing_bins=config.data.packing_bins,
                              read_threads=config.data.read_threads,
                              prefetch_batches=config.data.prefetch_batches, task_weights=task_weights)
    paths = record_paths(config.data.records_dir, split)
    parts = [make_dataset(paths, pipeline, shard_index=shard, shard_count=shards)
             for shard in range(process_index * per_process, (process_index + 1) * per_process)]
    return iter(grain.experimental.ZipIterDataset(parts).map(_concat_parts))


def train_batches(config: TrainConfig) -> grain.DatasetIterator:
    return process_batches(config, config.data.train_split, shuffle=config.data.shuffle,
                           task_weights=config.data.task_weights)


def validation_batches(config: TrainConfig) -> grain.DatasetIterator:
    """The validation split in file order, its own task mix; every evaluation reads the same first
    `eval.batches` batches."""
    return process_batches(config, config.data.valid_split, shuffle=False, task_weights={})
