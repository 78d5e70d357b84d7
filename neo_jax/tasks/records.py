"""Tokenized task examples as ArrayRecord shards.

One record is one example, packed (`neo_jax.tasks.packed`, no JSON): the texts `task`,
`entity_type`, `output_format` (the prompt schema fields, for per-task metrics), then the token ids
of `prompt` and `completion` kept apart, so that the loss can be restricted to the completion, and
of `avoid` and `end` (empty unless the example has an avoided span, `TaskExample.avoid`; then
`avoid` holds its tokens and `end` the eos): the
sequence is prompt, completion, avoided span, end; the completion and the end are learned, the
avoided span penalised (`neo_jax.tasks.pipeline`), so the span sits right after the completion's
last item and the example still learns its eos. The prompt, completion and avoided span are
encoded separately, as the decoder sees them (it encodes the prompt alone and generates the
rest). Shards of a split are named `{split}-{index:05d}-of-{count:05d}.array_record`; examples go
to shards round-robin.

With a length limit (`max_length` > 0, the training `seq_len + 1`), an example longer than the
limit is fitted here, where the tokenizer is known, so that the pipeline never has to cut it
(`neo_jax.tasks.pipeline` keeps only the first `seq_len + 1` tokens, which would cut the
completion): the completion is always kept whole and the prompt's header never touched (its first
line, and the line naming the user that may follow it, `neo_jax.tasks.builders.USER_LINE`).
1. History items are dropped from the prompt, oldest first, at the text level: the first SID span
   after the header (`[SID]...[/SID]`) is removed together with the text up to the next SID span
   (its title and separator, as `{history}` and `{history_titled}` write items), as often as
   needed. The newest SID span of a prompt is never dropped (the text after it is the template's,
   not the item's), so a prompt with one SID (the item of `sid_to_text`, `sid_to_type`) keeps it.
2. If that is not enough (or the prompt has no items to drop), the prompt's text after the header
   is cut from its start at the token level: bos and the header's tokens are kept, then the last
   tokens of the rest that fit.
3. If bos, the header and the completion alone exceed the limit, no cut of the prompt can fit the
   example: `UserError`, naming the example's index and task.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import multiprocessing
import re
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from neo_jax.tasks.builders import USER_LINE, TaskExample
from neo_jax.tasks.packed import pack, unpack
from neo_jax.errors import UserError
from neo_jax.vocab import SID_OPEN

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
    avoid: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # [avoid_len] int32
    end: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int32))  # [end_len] int32, after avoid

    def to_bytes(self) -> bytes:
        return pack((self.task, self.entity_type, self.output_format),
                    (self.prompt, self.completion, self.avoid, self.end))

    @classmethod
    def from_bytes(cls, data: bytes) -> "TokenizedExample":
        texts, arrays = unpack(data)
        return cls(*texts, *arrays)

    @property
    def length(self) -> int:
        return self.prompt.size + self.completion.size + self.avoid.size + self.end.size


@dataclasses.dataclass(frozen=True)
class Fit:
    """What fitting one example to the length limit took."""

    history_items_dropped: int = 0  # oldest SID spans removed from the prompt
    prompt_cut: bool = False  # the prompt's text after the header was also cut at the token level

    @property
    def shortened(self) -> bool:
        return self.history_items_dropped > 0 or self.prompt_cut


def _split_header(prompt: str) -> tuple[str, str]:
    """`(header line with its newline, and the user's line after it if there is one; the rest)` of a prompt."""
    end = prompt.find("\n") + 1
    if not end:
        return prompt, ""
    if prompt.startswith(USER_LINE, end) and prompt.find("\n", end) >= 0:
        end = prompt.find("\n", end) + 1
    return prompt[:end], prompt[end:]


def _drop_oldest(body: str, starts: list[int], count: int) -> str:
    """`body` without its first `count` SID spans, each with the text up to the next span."""
    return body[:starts[0]] + body[starts[count]:] if count else body


def fit_example(example: TaskExample, tokenizer: Encoder, bos_id: int | None = None, eos_id: int | None = None,
                max_length: int = 0, index: int | None = None) -> tuple[TokenizedExample, Fit]:
    """`[bos] + encode(prompt)` and `encode(completion) + [eos]` (bos and eos only when given;
    with an avoided span, `encode(completion)`, `encode(avoid)` and the end `[eos]`), with the
    prompt shortened to fit `max_length` tokens in all (0: no limit) as the module docstring
    describes; `index` names the example in errors."""
    bos = [bos_id] if bos_id is not None else []
    eos = [eos_id] if eos_id is not None else []
    where = f"example {index} ({example.task})" if index is not None else f"a {example.task} example"
    completion = list(tokenizer.encode(example.completion)) + ([] if example.avoid else eos)
    avoid, end = (list(tokenizer.encode(example.avoid)), eos) if example.avoid else ([], [])
    tail = avoid + end  # tokens after the completion
    if not completion:
        raise UserError(f"{where} has an empty completion: {example.prompt[:80]!r}")
    prompt = bos + list(tokenizer.encode(example.prompt))
    budget = max_length - len(completion) - len(tail)  # tokens the prompt may have
    fit = Fit()
    if max_length <= 0 or len(prompt) <= budget:
        return _tokenized(example, prompt, completion, avoid, end), fit

    header, body = _split_header(example.prompt)
    header_ids = bos + list(tokenizer.encode(header))
    if len(header_ids) + len(completion) + len(tail) > max_length:
        raise UserError(f"{where} cannot fit max_length {max_length}: its completion alone is "
                        f"{len(completion) + len(tail)} tokens and the prompt's header {len(header_ids)} (bos included); no cut of the prompt "
                        f"fits it (the completion is never cut). Raise --max-length (and the training seq_len) "
                        f"or write shorter completions (e.g. a smaller --window). Prompt: {example.prompt[:80]!r}")
    starts = [m.start() for m in re.finditer(re.escape(SID_OPEN), body)]
    droppable = max(len(starts) - 1, 0)  # the newest SID span stays

    def encoded(count: int) -> list[int]:
        return bos + list(tokenizer.encode(header + _drop_oldest(body, starts, count)))

    if droppable:
        # The fewest drops that fit (the length shrinks as items go): binary search over 1..droppable.
        low, high = 1, droppable
        if len(encoded(high)) <= budget:
            while low < high:
                middle = (low + high) // 2
                if len(encoded(middle)) <= budget:
                    high = middle
                else:
                    low = middle + 1
        fit = Fit(history_items_dropped=high)
        prompt = encoded(high)
        if len(prompt) <= budget:
            return _tokenized(example, prompt, completion, avoid, end), fit
        body = _drop_oldest(body, starts, high)
    rest = list(tokenizer.encode(body))
    keep = budget - len(header_ids)  # >= 0, checked above
    prompt = header_ids + rest[max(len(rest) - keep, 0):]
    return _tokenized(example, prompt, completion, avoid, end), dataclasses.replace(fit, prompt_cut=keep < len(rest))


def _tokenized(example: TaskExample, prompt: list[int], completion: list[int], avoid: list[int],
               end: list[int]) -> TokenizedExample:
    return TokenizedExample(example.task, example.entity_type, example.output_format,
                            *(np.asarray(part, np.int32) for part in (prompt, completion, avoid, end)))


def tokenize_example(example: TaskExample, tokenizer: Encoder, bos_id: int | None = None,
                     eos_id: int | None = None, max_length: int = 0) -> TokenizedExample:
    """`[bos] + encode(prompt)` and `encode(completion) + [eos]` (bos and eos only when given),
    fitted to `max_length` tokens (0: no limit; see `fit_example`)."""
    return fit_example(example, tokenizer, bos_id, eos_id, max_length)[0]


def shard_paths(directory: str | Path, split: str, num_shards: int) -> list[Path]:
    return [Path(directory) / f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


@dataclasses.dataclass(frozen=True)
class WriteSummary:
    split: str
    examples: int
    shards: int
    tokens: int
    max_length: int  # longest prompt + completion as written, to choose the packing length by
    length_limit: int = 0  # the `max_length` examples were fitted to (0: none)
    history_items_dropped: int = 0  # oldest history items dropped from prompts, over all examples
    examples_shortened: int = 0  # examples whose prompt lost anything
    prompts_cut: int = 0  # of those, prompts also cut at the token level after the header

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Examples a worker fits at a time, and chunks in flight per worker (bounds the memory of a parallel write).
WORKER_CHUNK = 512
CHUNKS_IN_FLIGHT = 2

_worker_settings: tuple = ()  # a worker process's (tokenizer, bos_id, eos_id, max_length)


def _start_worker(*settings) -> None:
    global _worker_settings
    _worker_settings = settings


def _fit_chunk(first_index: int, examples: list[TaskExample], tokenizer: Encoder, bos_id: int | None,
               eos_id: int | None, max_length: int) -> list[tuple[bytes, int, Fit]]:
    """`(record bytes, tokens, fit)` of each example, numbered from `first_index`."""
    fitted = (fit_example(e, tokenizer, bos_id, eos_id, max_length, index=first_index + i)
              for i, e in enumerate(examples))
    return [(record.to_bytes(), record.length, fit) for record, fit in fitted]


def _fit_chunk_in_worker(first_index: int, examples: list[TaskExample]) -> list[tuple[bytes, int, Fit]]:
    return _fit_chunk(first_index, examples, *_worker_settings)


def _chunks(examples: Iterable[TaskExample]) -> Iterator[tuple[int, list[TaskExample]]]:
    chunk: list[TaskExample] = []
    first = 0
    for example in examples:
        chunk.append(example)
        if len(chunk) == WORKER_CHUNK:
            yield first, chunk
            first, chunk = first + len(chunk), []
    if chunk:
        yield first, chunk


def _fitted_in_workers(examples: Iterable[TaskExample], workers: int, settings: tuple
                       ) -> Iterator[tuple[bytes, int, Fit]]:
    """`_fit_chunk` over `examples` in `workers` processes, in input order, with at most
    `CHUNKS_IN_FLIGHT * workers` chunks submitted ahead of the one being yielded."""
    context = multiprocessing.get_context("spawn")  # the parent may run JAX's threads: never fork it
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker,
                                                initargs=settings) as pool:
        pending: collections.deque = collections.deque()
        for first, chunk in _chunks(examples):
            pending.append(pool.submit(_fit_chunk_in_worker, first, chunk))
            if len(pending) >= CHUNKS_IN_FLIGHT * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()


def write_records(examples: Iterable[TaskExample], directory: str | Path, split: str, tokenizer: Encoder,
                  num_shards: int = 1, bos_id: int | None = None, eos_id: int | None = None,
                  max_length: int = 0, workers: int = 0) -> WriteSummary:
    """Tokenize `examples`, each fitted to `max_length` tokens (0: no limit; pass the training
    `seq_len + 1`), and write them round-robin into `num_shards` ArrayRecord files in `directory`.
    `examples` is read as a stream. With `workers` > 0 the examples are tokenized in that many
    processes (the tokenizer is pickled to each), written in the same order as without them."""
    if num_shards < 1:
        raise UserError(f"num_shards must be positive, got {num_shards}")
    if max_length < 0:
        raise UserError(f"max_length must be 0 (no limit) or positive, got {max_length}")
    if workers < 0:
        raise UserError(f"workers must be 0 (tokenize in this process) or positive, got {workers}")
    settings = (tokenizer, bos_id, eos_id, max_length)
    fitted = (_fitted_in_workers(examples, workers, settings) if workers else
              (item for first, chunk in _chunks(examples) for item in _fit_chunk(first, chunk, *settings)))
    writers = [ArrayRecordWriter(str(path), WRITER_OPTIONS) for path in shard_paths(directory, split, num_shards)]
    count = tokens = longest = dropped = shortened = cut = 0
    try:
        for count, (record, length, fit) in enumerate(fitted, start=1):
            writers[(count - 1) % num_shards].write(record)
            tokens += length
            longest = max(longest, length)
            dropped += fit.history_items_dropped
            shortened += fit.shortened
            cut += fit.prompt_cut
    finally:
        for writer in writers:
            writer.close()
    return WriteSummary(split, count, num_shards, tokens, longest, max_length, dropped, shortened, cut)


def record_paths(directory: str | Path, split: str) -> list[str]:
    """The shard files of one split, in order."""
    paths = sorted(Path(directory).glob(f"{split}-*-of-*.array_record"))
    if not paths:
        raise UserError(f"{directory}: no ArrayRecord shards for split {split!r} ({split}-*-of-*.array_record)")
    return [str(p) for p in paths]
