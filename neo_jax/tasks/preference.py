"""Preference records: one prompt, its chosen completion and N rejected ones, as ArrayRecord shards,
and the grain pipeline that batches them for the softmax-DPO stage (`neo_jax.model.preference`).

One record is one packed record (`neo_jax.tasks.packed`): the texts `task`, `entity_type`,
`output_format`, then the arrays `prompt` (token ids, bos included), `reference` (the reference
model's summed log-probability of each completion after the prompt) and one array of token ids per
completion (the chosen one first, then the rejected ones). The reference is computed once when the
stage's records are written (`neo_jax.align`). Keeping it as numbers rather than as a second model
costs 4 bytes a completion instead of a second copy of the weights (and its forward pass) on every device; the reference model cannot change during
a stage because it is not there.

A batch is fixed-shape, one group a row `[groups, seq_len]`: the prompt once, then each completion
as a branch that attends to the prompt and to itself only (`neo_jax.model.layers.attention_mask`).
The prompt's last token opens every branch (it predicts the completion's first token), so a row is
`prompt[:-1]`, then `prompt[-1] + completion[:-1]` for each completion, and each branch's scores
are exactly those of a row `prompt + completion` of its own, for a fraction of the tokens:
- `tokens`, `targets` int32 `[groups, seq_len]`: input ids and the next token of the same branch;
- `loss_mask` float32: 1.0 where the target is a completion token (whose log-probabilities sum to
  the candidate's sequence log-probability), else 0.0;
- `segment_ids` int32: 1 on real tokens, 0 on padding;
- `branch_ids` int32: 0 on the prompt, slot + 1 on the branch of candidate `slot`, 0 on padding;
- `positions` int32: 0, 1, ... along the prompt, each branch going on from the prompt's last position;
- `candidates` bool `[groups, candidates]`: the slot holds a completion (slot 0, the chosen, always);
- `reference` float32 `[groups, candidates]`: the reference log-probabilities, 0 in empty slots;
- `item_ids` int32 `[groups, seq_len]`: the item each `[/SID]` closes
  (`neo_jax.catalog.item_ids`; the input of a model with item identity), all 0 when no `ItemIds` is given.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from neo_jax.atomic import atomic_write_text
from neo_jax.catalog.item_ids import ItemIds
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object
from neo_jax.tasks.packed import pack, unpack
from neo_jax.tasks.pipeline import shard_records
from neo_jax.tasks.records import WRITER_OPTIONS, shard_paths

PREFERENCE_FILE = "preference.json"  # in a preference records directory: {"candidates", "max_length", splits}
PREFERENCE_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "branch_ids", "positions", "candidates",
                   "reference", "item_ids")


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    task: str
    entity_type: str
    output_format: str
    prompt: np.ndarray  # [prompt_len] int32, bos included
    completions: tuple[np.ndarray, ...]  # each [completion_len] int32: the chosen, then the rejected
    reference: np.ndarray  # [completions] float32: the reference model's log p(completion | prompt)

    def __post_init__(self):
        if len(self.completions) < 2:
            raise UserError(f"a preference example needs a chosen and at least one rejected completion, "
                            f"got {len(self.completions)} completion(s)")
        if self.reference.shape != (len(self.completions),):
            raise UserError(f"a preference example needs one reference log-probability per completion: "
                            f"{len(self.completions)} completions, reference shape {self.reference.shape}")

    @property
    def length(self) -> int:
        """Tokens of its row: the prompt, and each completion as a branch (see the module docstring)."""
        return self.prompt.size - 1 + sum(c.size for c in self.completions)

    def to_bytes(self) -> bytes:
        return pack((self.task, self.entity_type, self.output_format),
                    (self.prompt, self.reference.astype(np.float32), *self.completions))

    @classmethod
    def from_bytes(cls, data: bytes) -> "PreferenceExample":
        texts, (prompt, reference, *completions) = unpack(data)
        return cls(*texts, prompt, tuple(completions), reference)


def write_preference_records(examples: Iterable[PreferenceExample], directory: str | Path, split: str,
                             num_shards: int = 1) -> dict:
    """Write `examples` round-robin into `num_shards` ArrayRecord files of `split` in `directory` and
    merge the split's counts into `PREFERENCE_FILE` there; returns the split's summary."""
    if num_shards < 1:
        raise UserError(f"num_shards must be positive, got {num_shards}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    writers = [ArrayRecordWriter(str(p), WRITER_OPTIONS) for p in shard_paths(directory, split, num_shards)]
    count = candidates = longest = rejected = 0
    try:
        for count, example in enumerate(examples, start=1):
            writers[(count - 1) % num_shards].write(example.to_bytes())
            candidates, longest = max(candidates, len(example.completions)), max(longest, example.length)
            rejected += len(example.completions) - 1
    finally:
        for writer in writers:
            writer.close()
    summary = {"examples": count, "rejected": rejected, "candidates": candidates, "max_length": longest}
    path = directory / PREFERENCE_FILE
    saved = read_json_object(path) if path.is_file() else {"splits": {}}
    saved["splits"][split] = summary
    saved["candidates"] = max(s["candidates"] for s in saved["splits"].values())
    saved["max_length"] = max(s["max_length"] for s in saved["splits"].values())
    atomic_write_text(path, json.dumps(saved, indent=2))
    return summary


def preference_layout(directory: str | Path) -> dict:
    """`PREFERENCE_FILE` of a preference records directory: its `candidates` and `max_length`."""
    path = Path(directory) / PREFERENCE_FILE
    if not path.is_file():
        raise UserError(f"{directory}: no {PREFERENCE_FILE}; preference records are written by `neo-jax align`")
    return read_json_object(path)


def preference_features(record: bytes, seq_len: int, candidates: int,
                        item_ids: ItemIds | None = None) -> dict[str, np.ndarray]:
    """One serialized `PreferenceExample` as fixed-shape features (see the module docstring)."""
    return example_features(PreferenceExample.from_bytes(record), seq_len, candidates, item_ids)


def example_features(example: PreferenceExample, seq_len: int, candidates: int,
                     item_ids: ItemIds | None = None) -> dict[str, np.ndarray]:
    """`example` as fixed-shape features (see the module docstring)."""
    if len(example.completions) > candidates:
        raise UserError(f"a preference record has {len(example.completions)} completions, more than the "
                        f"{candidates} candidates of its directory's {PREFERENCE_FILE}")
    if example.length > seq_len:
        raise UserError(f"a preference record ({example.task}) is {example.length} tokens, its prompt and every "
                        f"completion; seq_len is {seq_len}: raise seq_len")
    prompt = example.prompt.size
    features = {"tokens": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
                "loss_mask": np.zeros(seq_len, np.float32), "segment_ids": np.zeros(seq_len, np.int32),
                "branch_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32),
                "candidates": np.zeros(candidates, bool), "reference": np.zeros(candidates, np.float32),
                "item_ids": np.zeros(seq_len, np.int32)}
    features["tokens"][:prompt - 1] = example.prompt[:-1]
    features["targets"][:prompt - 1] = example.prompt[1:]
    features["positions"][:prompt - 1] = np.arange(prompt - 1)
    start = prompt - 1
    for slot, completion in enumerate(example.completions):
        end = start + completion.size  # the branch: prompt[-1], completion[:-1]
        features["tokens"][start:end] = np.concatenate([example.prompt[-1:], completion[:-1]])
        features["targets"][start:end] = completion
        features["loss_mask"][start:end] = 1.0
        features["branch_ids"][start:end] = slot + 1
        features["positions"][start:end] = np.arange(prompt - 1, prompt - 1 + completion.size)
        features["candidates"][slot] = True
        features["reference"][slot] = example.reference[slot]
        if item_ids is not None:  # each branch's as in its own row: a close may end the prompt
            row_ids = item_ids(np.concatenate([example.prompt, completion[:-1]]))  # [prompt + completion - 1]
            features["item_ids"][:prompt - 1] = row_ids[:prompt - 1]
            features["item_ids"][start:end] = row_ids[prompt - 1:]
        start = end
    features["segment_ids"][:start] = 1
    return features


def make_preference_dataset(paths: Sequence[str], seq_len: int, candidates: int, batch_size: int, seed: int,
                            shuffle: bool = True, shard_index: int = 0, shard_count: int = 1,
                            read_threads: int = 2, prefetch_batches: int = 2,
                            item_ids: ItemIds | None = None) -> grain.IterDataset:
    """Endless `[batch_size, ...]` batches of the preference records of shard `shard_index` of
    `shard_count`, in a seeded order that changes every epoch (`shuffle`) or as written."""
    records = shard_records(paths, shard_index, shard_count)
    records = (records.shuffle(seed=seed) if shuffle else records).repeat()
    batches = (records.map(lambda record: preference_features(record, seq_len, candidates, item_ids))
               .to_iter_dataset(grain.ReadOptions(num_threads=read_threads))
               .batch(batch_size, drop_remainder=True))
    return grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch_batches)
