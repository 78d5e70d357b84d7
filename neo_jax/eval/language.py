"""The language side of a tuned model: does it describe items, follow the asked type and format
without the constraint, and keep its language?

- `sid_to_text_accuracy`: "Describe the item {sid}." for a seeded sample of catalog items, decoded
  greedily (constrained, which leaves text free); exact match of the generated text with the item's
  catalog text (case and spacing ignored) and the mean word F1 between them.
- `steerability`: recommendation prompts re-headed with each output format (ids, text, mixed) and
  decoded by beam search with the constraint OFF; the share of beams of the asked type (every SID
  names a catalog item of that type, and there is one: ids and mixed prompts), of the asked format
  (ids: one SID and nothing else; text: words and no SID; mixed: a SID and words), and the valid-SID
  rate: the share of the SIDs written that name a real catalog item.
- `perplexity`: exp of the mean next-token negative log-likelihood of plain text lines (BOS, the
  line, EOS), to compare a model before and after tuning.

`evaluate_language` runs all three (`neo-jax eval language`, and the quickstart's last step).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax.data.schema import Catalog
from neo_jax.decode.generate import DecodeSettings, GeneratedText, Generator
from neo_jax.errors import UserError
from neo_jax.eval.recommend import sample_examples, sample_indices
from neo_jax.model.decoder import Decoder
from neo_jax.model.loss import masked_cross_entropy
from neo_jax.tasks.builders import OUTPUT_FORMATS, TaskExample, parse_header, render_prompt
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.progress import Progress
from neo_jax.vocab import SID_CLOSE, SID_CODE_PATTERN, SID_OPEN, format_sid

_SID_SPAN = re.compile(re.escape(SID_OPEN) + ".*?" + re.escape(SID_CLOSE), re.DOTALL)
_WORD = re.compile(r"\w+")
MAX_TEXT_TOKENS = 256  # the longest description `sid_to_text_accuracy` lets the model write (context allowing)


def _batches(count: int, batch_size: int):
    for start in range(0, count, batch_size):
        yield range(start, min(start + batch_size, count))


def _padded(items: list, batch_size: int) -> list:
    """`items` repeated at the end up to `batch_size`, so every decoding batch has one shape."""
    return items + [items[-1]] * (batch_size - len(items))


# -- SID -> text ------------------------------------------------------------------------------

def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def word_f1(generated: str, reference: str) -> float:
    """F1 of the two texts' bags of lower-case words (1.0 when both have none)."""
    ours = collections.Counter(_WORD.findall(generated.lower()))
    theirs = collections.Counter(_WORD.findall(reference.lower()))
    if not ours and not theirs:
        return 1.0
    common = sum((ours & theirs).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(ours.values()), common / sum(theirs.values())
    return 2 * precision * recall / (precision + recall)


def item_sid(generator: Generator, row: int) -> str:
    """The SID string of the SID catalog's row `row`."""
    trie = generator.sids.trie
    entity = generator.sids.entity_types[int(trie.item_types[row])]
    return format_sid(entity.name, [c for c in trie.codes[row].tolist() if c >= 0][:len(entity.codebook_sizes)])


def sid_to_text_accuracy(generator: Generator, catalog: Catalog, items: int, seed: int = 0,
                         batch_size: int = 32, show_progress: bool = True) -> dict[str, float]:
    """Greedy descriptions of a seeded sample of `items` catalog items (0: all) against their catalog text."""
    catalog_row = {item_id: row for row, item_id in enumerate(catalog.item_ids)}
    missing = [i for i in generator.sids.item_ids if i not in catalog_row]
    if missing:
        raise UserError(f"SID catalog item {missing[0]!r} is not in the data's items file")
    rows = sample_indices(len(generator.sids.item_ids), items, seed).tolist()  # SID catalog rows
    prompts, references = [], []
    for row in rows:
        catalog_index = catalog_row[generator.sids.item_ids[row]]
        prompts.append(render_prompt("sid_to_text", catalog.type_name(catalog_index), "text", 0,
                                     sid=item_sid(generator, row)))
        references.append(catalog.item_text(catalog_index))
    longest = max(len(generator.tokenizer.encode(r)) for r in references) + 1  # + EOS
    # The context holds BOS, the longest prompt and the description.
    room = generator.model.config.max_position_embeddings - 1 - max(len(generator.tokenizer.encode(p)) for p in prompts)
    if room < 1:
        raise UserError("the model's context leaves no room for a description after the sid_to_text prompt")
    settings = DecodeSettings(method="sample", max_new_tokens=min(longest, MAX_TEXT_TOKENS, room), beam_size=1,
                              temperature=0.0)
    exact, f1 = [], []
    progress = Progress(len(rows), label="sid_to_text", unit="item") if show_progress else None
    for batch in _batches(len(rows), batch_size):
        decoded = generator.generate(_padded([prompts[i] for i in batch], batch_size), settings)
        for i, beams in zip(batch, decoded):
            text = beams[0].text if beams else ""
            exact.append(normalise(text) == normalise(references[i]))
            f1.append(word_f1(text, references[i]))
        if progress is not None:
            progress.update(batch.stop)
    return {"items": len(rows), "exact_match": float(np.mean(exact)), "word_f1": float(np.mean(f1))}


# -- steerability without the constraint ------------------------------------------------------

def with_format(example: TaskExample, output_format: str) -> str:
    """The example's prompt with its header asking for `output_format`."""
    header = parse_header(example.prompt)
    rest = example.prompt[len(header.render()):]
    return dataclasses.replace(header, output_format=output_format).render() + rest


def outside_sids(raw: str) -> tuple[str, bool]:
    """(the words of a generated string outside its SID spans, whether stray SID tokens remain:
    an unclosed span or codes outside one)."""
    rest = _SID_SPAN.sub(" ", raw)
    stray = SID_CODE_PATTERN.search(rest) is not None or SID_OPEN in rest or SID_CLOSE in rest
    words = SID_CODE_PATTERN.sub(" ", rest).replace(SID_OPEN, " ").replace(SID_CLOSE, " ")
    return " ".join(words.split()), stray


@dataclasses.dataclass(frozen=True)
class BeamCheck:
    asked_type: bool | None  # None: a text prompt, which names no item
    asked_format: bool
    sids: int  # SID spans written
    valid_sids: int  # of them, those naming a catalog item


def check_beam(beam: GeneratedText, asked_type: str, output_format: str) -> BeamCheck:
    words, stray = outside_sids(beam.raw)
    sids = len(beam.items)
    valid = sum(1 for item in beam.items if item is not None)
    if output_format == "ids":
        right_format = sids == 1 and not words and not stray
    elif output_format == "text":
        right_format = sids == 0 and bool(words) and not stray
    else:
        right_format = sids >= 1 and bool(words) and not stray
    right_type = None if output_format == "text" else (
        sids >= 1 and all(item is not None and item.entity_type == asked_type for item in beam.items))
    return BeamCheck(right_type, right_format, sids, valid)


def steerability(generator: Generator, examples: Sequence[TaskExample], beams: int, batch_size: int = 16,
                 max_new_tokens: int = 48, show_progress: bool = True) -> dict[str, float]:
    """Unconstrained beams of every example under each output format, checked against the asked
    type and format (`BeamCheck`)."""
    if not examples:
        raise UserError("no examples to measure steerability on")
    settings = DecodeSettings(method="beam", max_new_tokens=max_new_tokens, beam_size=beams)
    checks: dict[str, list[BeamCheck]] = {f: [] for f in OUTPUT_FORMATS}
    progress = Progress(len(examples) * len(OUTPUT_FORMATS), label="steerability", unit="prompt") if show_progress else None
    done = 0
    for output_format in OUTPUT_FORMATS:
        for batch in _batches(len(examples), batch_size):
            chosen = [examples[i] for i in batch]
            decoded = generator.generate(_padded([with_format(e, output_format) for e in chosen], batch_size),
                                         settings, constrained=False)
            for example, continuations in zip(chosen, decoded):
                checks[output_format] += [check_beam(c, example.entity_type, output_format) for c in continuations]
            done += len(batch)
            if progress is not None:
                progress.update(done)
    every = [c for format_checks in checks.values() for c in format_checks]
    typed = [c.asked_type for c in every if c.asked_type is not None]
    written = sum(c.sids for c in every)
    result = {"prompts": len(examples), "beams": beams,
              "asked_type": float(np.mean(typed)) if typed else 0.0,
              "asked_format": float(np.mean([c.asked_format for c in every])),
              "valid_sid_rate": sum(c.valid_sids for c in every) / written if written else 0.0,
              "sids_written": written}
    for output_format, format_checks in checks.items():
        result[f"asked_format.{output_format}"] = float(np.mean([c.asked_format for c in format_checks]))
    return result


# -- perplexity of plain text -----------------------------------------------------------------

@nnx.jit
def _nll_sum(model: Decoder, tokens: jax.Array, targets: jax.Array, weights: jax.Array):
    """(sum of `-log p(target)` over weighted positions, their count); all `[batch, len]`."""
    batch, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    logits, _ = model(tokens, positions)  # [batch, len, vocab]; causal, so the right padding is never seen
    mean, count = masked_cross_entropy(logits, targets, weights)
    return mean * count, count


def perplexity(model: Decoder, tokenizer: MixedTokenizer, texts: Sequence[str], batch_size: int = 16,
               length_multiple: int = 64) -> dict[str, float]:
    """exp(mean next-token NLL) of `texts`, each as BOS + text + EOS, cut to the model's context."""
    if not texts:
        raise UserError("no text to measure perplexity on")
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    context = model.config.max_position_embeddings
    sequences = [(bos + tokenizer.encode(t) + eos)[:context] for t in texts]
    if any(len(s) < 2 for s in sequences):
        raise UserError("every text line must give at least two tokens (BOS, EOS or words)")
    total, count = 0.0, 0.0
    for batch in _batches(len(sequences), batch_size):
        chosen = [sequences[i] for i in batch]
        length = min(context, -(-max(len(s) for s in chosen) // length_multiple) * length_multiple)
        tokens = np.zeros((batch_size, length), np.int32)  # [batch, len], right padded
        weights = np.zeros((batch_size, length), np.float32)
        targets = np.zeros((batch_size, length), np.int32)
        for b, s in enumerate(chosen):
            tokens[b, :len(s)] = s
            targets[b, :len(s) - 1] = s[1:]
            weights[b, :len(s) - 1] = 1.0
        nll, n = _nll_sum(model, jnp.asarray(tokens), jnp.asarray(targets), jnp.asarray(weights))
        total, count = total + float(nll), count + float(n)
    return {"texts": len(texts), "tokens": int(count), "perplexity": math.exp(total / count)}


HELDOUT_TEXT = Path(__file__).with_name("heldout_text.txt")  # English prose no neo_jax run trains on


def read_text_lines(path: str | Path) -> list[str]:
    """The non-empty lines of a UTF-8 text file."""
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except FileNotFoundError:
        raise UserError(f"{path}: text file not found") from None
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"{path}: no non-empty line of text")
    return lines


def evaluate_language(generator: Generator, catalog: Catalog, examples: Sequence[TaskExample],
                      texts: Sequence[str], base_model: Decoder | None = None, items: int = 200, users: int = 200,
                      beams: int = 5, batch_size: int = 16, seed: int = 0,
                      show_progress: bool = True) -> dict[str, dict[str, float]]:
    """SID-to-text accuracy on `items` catalog items, steerability on `users` of `examples` (both
    seeded samples, 0: all) and the perplexity of `texts` under the model (and under `base_model`,
    the model before tuning, which must share the generator's tokenizer)."""
    if min(items, users) < 0 or min(beams, batch_size) < 1:
        raise UserError("items and users must be 0 (all) or positive, beams and the batch size positive")
    result = {"sid_to_text": sid_to_text_accuracy(generator, catalog, items, seed, batch_size, show_progress),
              "unconstrained": steerability(generator, sample_examples(examples, users, seed), beams, batch_size,
                                            show_progress=show_progress),
              "perplexity": perplexity(generator.model, generator.tokenizer, texts, batch_size)}
    if base_model is not None:
        if base_model.config.vocab_size != generator.model.config.vocab_size:
            raise UserError(f"the model before tuning has {base_model.config.vocab_size} vocabulary rows, the "
                            f"tuned one {generator.model.config.vocab_size}: perplexities need one tokenizer")
        result["perplexity_before"] = perplexity(base_model, generator.tokenizer, texts, batch_size)
    return result
