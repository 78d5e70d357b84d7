"""Next-item recommendation quality of a model: constrained beam search in ID mode, then Recall/NDCG@K.

Each evaluation example (`neo-jax data tasks` writes valid.jsonl and test.jsonl: the user's
history in the prompt, the held-out item's SID as the completion) is decoded with `beams`
beams; ID mode names exactly one item per beam, so the beams are a ranked list of distinct
items. The constraint guarantees each is a real catalog item of the asked type.
`recall_hook` runs the same evaluation on the model being trained at every validation step.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
from jax.sharding import Mesh

from neo_jax.catalog.sid_output import SidOutput
from neo_jax.decode.generate import DecodeSettings, Generator, sid_answer_tokens
from neo_jax.errors import UserError
from neo_jax.eval.metrics import history_repeats, ranking_metrics
from neo_jax.model.decoder import Decoder
from neo_jax.tasks.builders import TaskExample, parse_header
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.progress import Progress
from neo_jax.vocab import SID_CODE_PATTERN

T = TypeVar("T")


def target_rows(examples: Sequence[TaskExample], generator: Generator) -> np.ndarray:
    """`[examples]` catalog row of each example's completion SID."""
    layout, trie = generator.tokenizer.layout, generator.sids.trie
    rows = []
    for index, example in enumerate(examples):
        codes = SID_CODE_PATTERN.findall(example.completion)
        if not codes or len({name for name, _, _ in codes}) != 1:
            raise UserError(f"evaluation example {index}: its completion {example.completion!r} is not one SID")
        row = trie.find_item(layout.type_index(codes[0][0]), [int(code) for _, _, code in codes])
        if row is None:
            raise UserError(f"evaluation example {index}: {example.completion!r} names no item of this catalog")
        rows.append(row)
    return np.asarray(rows, np.int64)


def sample_indices(count: int, limit: int, seed: int) -> np.ndarray:
    """`[chosen]` sorted indices: all of `count` (`limit` 0 or at least `count`), else a seeded
    random sample of `limit`: never the first N, which would pick users by file order."""
    if limit < 0:
        raise UserError(f"the number of evaluated examples must be positive (or 0 for all), got {limit}")
    if limit == 0 or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size=limit, replace=False))


def sample_examples(examples: Sequence[T], limit: int, seed: int) -> list[T]:
    """`examples` at `sample_indices(len(examples), limit, seed)`, in their original order."""
    return [examples[i] for i in sample_indices(len(examples), limit, seed).tolist()]


def parse_ks(text: str) -> tuple[int, ...]:
    """`"1,5,10"` -> (1, 5, 10), refusing anything but positive integers."""
    try:
        ks = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        raise UserError(f"K values must be comma-separated positive integers, got {text!r}") from None
    if not ks or ks[0] < 1:
        raise UserError(f"K values must be comma-separated positive integers, got {text!r}")
    return ks


def rank_examples(generator: Generator, examples: Sequence[TaskExample], beams: int, batch_size: int = 16,
                  show_progress: bool = False, exclude_history: bool = False) -> np.ndarray:
    """`[examples, beams]` catalog rows ranked by constrained ID-mode beam search for each example's
    prompt, best first (-1: a filler beam, where fewer items were found); with `exclude_history`
    each example's history (`TaskExample.history`) is kept out of its beams."""
    settings = DecodeSettings(method="beam", max_new_tokens=sid_answer_tokens(generator.tokenizer.layout),
                              beam_size=beams)
    ranked = np.full((len(examples), beams), -1, np.int64)  # [examples, beams] catalog rows, best first
    progress = Progress(len(examples), label="rank", unit="user") if show_progress else None
    # Batches of similar prompt lengths pad less; results go back to the examples' own order.
    order = np.argsort([len(e.prompt) for e in examples], kind="stable")  # [examples]
    for start in range(0, len(examples), batch_size):
        indices = order[start:start + batch_size].tolist()
        batch = [examples[i] for i in indices]
        # The last batch repeats its final prompt up to `batch_size`, so every batch has one shape.
        padded = batch + [batch[-1]] * (batch_size - len(batch))
        excluded = [e.history for e in padded] if exclude_history else None
        ranked[indices] = generator.rank_items([e.prompt for e in padded], settings,
                                               excluded_ids=excluded)[:len(batch)]  # [batch, beams]
        if progress is not None:
            progress.update(min(start + batch_size, len(examples)))
    return ranked


def evaluate_recommendations(generator: Generator, examples: Sequence[TaskExample], beams: int = 10,
                             batch_size: int = 16, ks: tuple[int, ...] = (5, 10),
                             show_progress: bool = True, exclude_history: bool = False) -> dict[str, float]:
    """Recall@K and NDCG@K over `examples` (K <= beams), with the share of beams naming a real item
    and, where the examples list their histories, how often the ranking names a history item
    (`history_first`, `history_share@K`: see `history_repeats`).

    With `exclude_history` the constraint keeps each user's history (`TaskExample.history`) out
    of the beams."""
    if not examples:
        raise UserError("no evaluation examples")
    for index, example in enumerate(examples):
        try:  # a prompt without a header would be decoded as free text
            header = parse_header(example.prompt)
        except UserError as error:
            raise UserError(f"evaluation example {index}: {error}") from None
        if header.output_format != "ids" or example.output_format != "ids":
            raise UserError(f"evaluation example {index}: recommendation evaluation needs the 'ids' output "
                            f"format, its prompt asks for {header.output_format!r}")
    ks = tuple(k for k in ks if k <= beams)
    if not ks:
        raise UserError(f"beams ({beams}) must be at least the smallest K")
    if exclude_history and not all(e.history for e in examples):
        raise UserError("--exclude-history needs examples that list the user's history; rebuild them with "
                        "`neo-jax data tasks`")
    targets = target_rows(examples, generator)  # [examples]
    ranked = rank_examples(generator, examples, beams, batch_size, show_progress, exclude_history)
    named = int((ranked >= 0).sum())  # -1 for filler beams
    metrics = ranking_metrics(ranked, targets, ks)
    if all(e.history for e in examples):
        histories = [{generator.row_of_id[i] for i in e.history if i in generator.row_of_id} for e in examples]
        metrics.update(history_repeats(ranked, histories, ks))
    metrics["users"] = len(examples)
    metrics["beams_naming_an_item"] = named / (len(examples) * beams)
    return metrics


RECALL_METRICS = ("recall@5", "recall@10", "ndcg@10")


def recall_hook(tokenizer: MixedTokenizer, sids: SidOutput, examples: Sequence[TaskExample], beams: int = 10,
                mesh: Mesh | None = None) -> Callable[[Decoder, int], dict[str, float]]:
    """A training validation hook: `(model, step) -> {"valid_recall@5", "valid_recall@10", "valid_ndcg@10"}`
    of `examples`, decoded with `beams` beams and the tokenizer's EOS (the one the training records end with)."""
    if tokenizer.eos_id is None:
        raise UserError("the tokenizer has no EOS token to end the generated SIDs with")
    if beams < 10:
        raise UserError(f"Recall@10 needs at least 10 beams, got {beams}")

    generator: Generator | None = None  # built at the first call; later calls only swap the model

    def hook(model: Decoder, step: int) -> dict[str, float]:
        nonlocal generator
        generator = (Generator(model, tokenizer, sids, tokenizer.eos_id, mesh=mesh) if generator is None
                     else generator.with_model(model))
        metrics = evaluate_recommendations(generator, examples, beams=beams, show_progress=False)
        return {f"valid_{name}": metrics[name] for name in RECALL_METRICS}

    return hook
