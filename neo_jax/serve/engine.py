"""The model side of the server: a `Generator` behind a fixed set of compiled shapes.

Every decode call has one of a few shapes, each compiled by `Engine.warm_up` before the server
says it is ready, so no request waits for a compile:
- batch: the queries of a call, padded with copies of the first to the next of
  `ShapePlan.batch_sizes` (the powers of two below `max_batch`, and `max_batch`);
- prompt width: the longest prompt's tokens rounded up to `SHAPE_MULTIPLE` (as `pack_prompts`
  does), so one of `ShapePlan.widths`, since no prompt may pass `max_prompt_tokens`;
- beams: one of `beam_widths`;
- answer length: `ids` answers decode one SID, `text` and `mixed` ones `text_tokens` (these two
  share their programs: the format is data to the constraint);
- exclusions: every query passes its excluded items (maybe none), at most `MAX_EXCLUDED`, so the
  exclusion lists always have one width;
- an allowed subset of items is a device mask, another program: such queries run one at a time,
  so only batch size 1 is compiled for them.
`compiles()` counts the process's XLA compilations, so a caller can check none happens after warm-up.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

import jax

from neo_jax.decode.commands import TEXT_MAX_NEW_TOKENS
from neo_jax.decode.generate import SHAPE_MULTIPLE, DecodeSettings, GeneratedText, Generator, sid_answer_tokens
from neo_jax.errors import UserError
from neo_jax.serve.metrics import Metrics
from neo_jax.tasks.builders import ANY_TYPE

MAX_EXCLUDED = SHAPE_MULTIPLE  # items one query may exclude: the narrowest exclusion width of `Generator`

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compile_lock = threading.Lock()
_compile_count = 0


def _count_compile(event: str, duration_secs: float, **kwargs) -> None:
    global _compile_count
    if event == _BACKEND_COMPILE_EVENT:
        with _compile_lock:
            _compile_count += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compiles() -> int:
    """XLA compilations in this process so far (any thread)."""
    with _compile_lock:
        return _compile_count


@dataclasses.dataclass(frozen=True)
class ShapePlan:
    """The compiled shapes the server decodes with (see the module docstring)."""

    max_batch: int = 16
    beam_widths: tuple[int, ...] = (5, 10)
    max_prompt_tokens: int = 128
    text_tokens: int = TEXT_MAX_NEW_TOKENS  # new tokens of `text` and `mixed` answers

    def __post_init__(self):
        if self.max_batch < 1:
            raise UserError(f"--max-batch must be at least 1, got {self.max_batch}")
        widths = list(self.beam_widths)
        if not widths or min(widths) < 1 or widths != sorted(set(widths)):
            raise UserError(f"--beams must be distinct positive widths in increasing order, got {widths}")
        if self.max_prompt_tokens < 1 or self.text_tokens < 1:
            raise UserError("--max-prompt-tokens and --text-tokens must be positive")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        powers = [1 << k for k in range(self.max_batch.bit_length()) if 1 << k < self.max_batch]
        return tuple(powers + [self.max_batch])

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(range(SHAPE_MULTIPLE, self.max_prompt_tokens + SHAPE_MULTIPLE, SHAPE_MULTIPLE))

    def batch_size(self, n: int) -> int:
        """The compiled batch size `n` queries are padded to."""
        return next(size for size in self.batch_sizes if size >= n)


@dataclasses.dataclass(frozen=True)
class Query:
    """One validated request: a prompt in the header language and what its answer may name."""

    prompt: str
    entity_type: str  # the header's type (`any`: every type)
    output_format: str  # ids, text or mixed
    beam: int  # one of the plan's beam widths
    excluded: tuple[str, ...] = ()  # item ids it must not name, at most MAX_EXCLUDED
    allowed: frozenset[str] | None = None  # the only item ids it may name (None: the whole catalog)

    @property
    def key(self) -> tuple:
        """Queries with equal keys decode in one call: the same beams, answer length and allowed items."""
        return self.output_format == "ids", self.beam, self.allowed


class Engine:
    """Decodes groups of `Query` objects of one key at the plan's compiled shapes."""

    def __init__(self, generator: Generator, plan: ShapePlan, metrics: Metrics):
        layout = generator.tokenizer.layout
        self.generator, self.plan, self.metrics = generator, plan, metrics
        self.ids_tokens = sid_answer_tokens(layout)
        context = generator.model.config.max_position_embeddings
        longest = plan.widths[-1] + max(plan.text_tokens, self.ids_tokens)
        if longest > context:
            raise UserError(f"--max-prompt-tokens {plan.max_prompt_tokens} (width {plan.widths[-1]}) plus "
                            f"{max(plan.text_tokens, self.ids_tokens)} new tokens exceed the model's context of "
                            f"{context} tokens; lower --max-prompt-tokens or --text-tokens")
        items = len(generator.sids.item_ids)
        if plan.beam_widths[-1] > items:
            raise UserError(f"--beams {plan.beam_widths[-1]} is larger than the bundle's {items} catalog items")

    def prompt_tokens(self, prompt: str, output_format: str) -> int:
        """The tokens `prompt` takes in the model (BOS, and the `[SID]` an `ids` prompt ends with, included)."""
        tokenizer = self.generator.tokenizer
        return (tokenizer.bos_id is not None) + len(tokenizer.encode(prompt)) + (output_format == "ids")

    def run(self, queries: Sequence[Query]) -> list[list[GeneratedText]]:
        """`[query][beam]` answers of queries that share one key, in calls of at most the plan's batch."""
        limit = 1 if queries[0].allowed is not None else self.plan.max_batch
        answers = []
        for start in range(0, len(queries), limit):
            chunk = queries[start:start + limit]
            beams = self._decode(chunk)
            self.metrics.observe_batch(len(chunk), sum(invalid_items(q, b) for q, b in zip(chunk, beams)))
            answers += beams
        return answers

    def _decode(self, queries: Sequence[Query]) -> list[list[GeneratedText]]:
        """One decode call: the queries padded to a compiled batch size with copies of the first."""
        first = queries[0]
        padded = list(queries) + [first] * (self.plan.batch_size(len(queries)) - len(queries))
        tokens = self.ids_tokens if first.output_format == "ids" else self.plan.text_tokens
        beams = self.generator.generate([q.prompt for q in padded], DecodeSettings("beam", tokens, first.beam),
                                        excluded_ids=[list(q.excluded) for q in padded], allowed_ids=first.allowed,
                                        default_format=first.output_format)
        return beams[:len(queries)]

    def warm_up(self) -> int:
        """Decode once at every compiled shape; returns how many there are.

        The prompts have no header (the format is `_decode`'s default), the shortest a prompt of each
        width can be; a restricted query allows every item."""
        everything = frozenset(self.generator.sids.item_ids)
        shapes = 0
        for output_format in ("ids", "text"):
            for width in self.plan.widths:
                prompt = self._prompt_of_width(width, output_format)
                for beam in self.plan.beam_widths:
                    for allowed, sizes in ((None, self.plan.batch_sizes), (everything, (1,))):
                        for size in sizes:
                            self._decode([Query(prompt, ANY_TYPE, output_format, beam, (), allowed)] * size)
                            shapes += 1
        return shapes

    def _prompt_of_width(self, width: int, output_format: str) -> str:
        """Words whose prompt tokens are more than `width - SHAPE_MULTIPLE` and at most `width`."""
        words = ["item"]
        while self.prompt_tokens(" ".join(words), output_format) <= width - SHAPE_MULTIPLE:
            words.append("item")
        if self.prompt_tokens(" ".join(words), output_format) > width:
            raise UserError(f"cannot write a warm-up prompt of {width} tokens with this tokenizer")
        return " ".join(words)


def invalid_items(query: Query, beams: Sequence[GeneratedText]) -> int:
    """Items the answer names that it may not: no catalog item, or (in `ids`) not of the asked type, an
    excluded item, one outside the allowed subset; in `text` any item at all. The constraint makes it 0."""
    count = 0
    excluded = set(query.excluded)
    for beam in beams:
        for item in beam.items:
            count += (item is None or query.output_format == "text" or item.item_id in excluded
                      or (query.allowed is not None and item.item_id not in query.allowed)
                      or (query.output_format == "ids" and query.entity_type not in (ANY_TYPE, item.entity_type)))
    return count

