"""Tokenized task examples as ArrayRecord shards.

One record is one example, a UTF-8 JSON object: `task`, `entity_type`, `output_format`
(the prompt schema fields, for per-task metrics) and the token ids of `prompt` and
`completion` kept apart, so that the loss can be restricted to the completion. The prompt
and completion are encoded separately, as the decoder sees them (it encodes the prompt
alone and generates the rest). Shards of a split are named
`{split}-{index:05d}-of-{count:05d}.array_record`; examples go to shards round-robin.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Protocol

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from neo_jax.data.tasks import TaskExample
from neo_jax.errors import UserError

# One record per chunk, so that any record can be read without decoding its neighbours.
WRITER_OPTIONS = "group_size:1"


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
    task: str
    entity_type: str
    output_format: str
    prompt: np.ndarray  # [prompt_len] int32
    completion: np.ndarray  # [completion_len] int32

    def to_bytes(self) -> bytes:
        return json.dumps({"task": self.task, "entity_type": self.entity_type, "output_format": self.output_format,
                           "prompt": self.prompt.tolist(), "completion": self.completion.tolist()}).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> "TokenizedExample":
        record = json.loads(data)
        return cls(record["task"], record["entity_type"], record["output_format"],
                   np.asarray(record["prompt"], np.int32), np.asarray(record["completion"], np.int32))


def tokenize_example(example: TaskExample, tokenizer: Encoder, bos_id: int | None = None,
                     eos_id: int | None = None) -> TokenizedExample:
    """`[bos] + encode(prompt)` and `encode(completion) + [eos]` (bos and eos only when given)."""
    prompt = ([bos_id] if bos_id is not None else []) + list(tokenizer.encode(example.prompt))
    completion = list(tokenizer.encode(example.completion)) + ([eos_id] if eos_id is not None else [])
    if not completion:
        raise UserError(f"a {example.task} example has an empty completion: {example.prompt[:80]!r}")
    return TokenizedExample(example.task, example.entity_type, example.output_format,
                            np.asarray(prompt, np.int32), np.asarray(completion, np.int32))


def shard_paths(directory: str | Path, split: str, num_shards: int) -> list[Path]:
    return [Path(directory) / f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


@dataclasses.dataclass(frozen=True)
class WriteSummary:
    split: str
    examples: int
    shards: int
    tokens: int
    max_length: int  # longest prompt + completion, to choose the packing length by

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def write_records(examples: Iterable[TaskExample], directory: str | Path, split: str, tokenizer: Encoder,
                  num_shards: int = 1, bos_id: int | None = None, eos_id: int | None = None) -> WriteSummary:
    """Tokenize `examples` and write them round-robin into `num_shards` ArrayRecord files in `directory`."""
    if num_shards < 1:
        raise UserError(f"num_shards must be positive, got {num_shards}")
    writers = [ArrayRecordWriter(str(path), WRITER_OPTIONS) for path in shard_paths(directory, split, num_shards)]
    count = tokens = max_length = 0
    try:
        for count, example in enumerate(examples, start=1):
            record = tokenize_example(example, tokenizer, bos_id, eos_id)
            writers[(count - 1) % num_shards].write(record.to_bytes())
            length = record.prompt.size + record.completion.size
            tokens += length
            max_length = max(max_length, length)
    finally:
        for writer in writers:
            writer.close()
    return WriteSummary(split, count, num_shards, tokens, max_length)


def record_paths(directory: str | Path, split: str) -> list[str]:
    """The shard files of one split, in order."""
    paths = sorted(Path(directory).glob(f"{split}-*-of-*.array_record"))
    if not paths:
        raise UserError(f"{directory}: no ArrayRecord shards for split {split!r} ({split}-*-of-*.array_record)")
    return [str(p) for p in paths]
