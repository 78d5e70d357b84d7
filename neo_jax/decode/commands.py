"""`neo-jax generate`: decode prompts with a checkpoint; every SID comes back as a catalog item.

    neo-jax generate --ckpt RUN/final \
        --prompt $'task: recommend | type: product | format: ids\nHistory: ...' [--beams 8]
    neo-jax generate --ckpt RUN/final --prompts requests.jsonl [--batch 32] [--sids SIDS_DIR] [--data DATA_DIR]
    neo-jax generate --bundle BUNDLE --prompt ...

A training run's `final/` carries its tokenizer, which records the SID directory it was built
from, and that records its data directory: `--sids`, `--tokenizer` and `--data` (item titles)
default to those. A serving bundle (`neo-jax export`) holds all of them and is verified against
its manifest before it is used.

Prints one JSON line per prompt: `{"prompt", "beams": [{"text", "raw", "items": [{"id",
"type", "title"}], "score", "log_prob", "finished"}]}`, beams best first. A requests file
holds one JSON object a line: `prompt` and optionally `exclude` (item ids not to name).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Iterable

from jax.sharding import Mesh

from neo_jax.catalog.sid_output import load_sid_output, sid_data_dir
from neo_jax.checkpoint import TOKENIZER, load_model, load_vocab_layout
from neo_jax.data.loaders import load_items, read_records
from neo_jax.decode.generate import DecodeSettings, Generator, eos_token_id, sid_answer_tokens
from neo_jax.errors import UserError
from neo_jax.export.bundle import load_bundle
from neo_jax.progress import Progress
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments
from neo_jax.tasks.builders import ANY_TYPE, TASK_FORMATS, TASKS, TEMPLATES, parse_header
from neo_jax.tokenizer import SOURCES_FILE, MixedTokenizer, load_text_tokenizer, sids_source
from neo_jax.vocab import format_sid


TEXT_MAX_NEW_TOKENS = 96  # the default length of text and mixed answers


def prompt_language() -> str:
    """The prompt header, each task's formats and phrasings, and the output fields: `generate --help`'s epilog."""
    def prose(text: str) -> str:
        return textwrap.fill(text, width=100)

    lines = ["The prompt language. A prompt's first line is its header:",
             "  task: TASK | type: TYPE | format: FORMAT",
             prose(f"TYPE is an entity type of the catalog, or '{ANY_TYPE}' for tasks about a user (any type may "
                   "be named); FORMAT is 'ids' (exactly one item), 'text' (free text) or 'mixed' (text with items "
                   "of the allowed types). An item is written as its SID, e.g. "
                   f"{format_sid('product', (12, 200, 3))}. The lines after the header are the request, phrased "
                   "as in the training data ({history}: the items' SIDs, oldest first; {history_titled}: the "
                   "same with titles):")]
    for task in TASKS:
        lines.append(f"  {task} (formats: {', '.join(TASK_FORMATS[task])}):")
        lines.extend(f"    {template!r}" for template in TEMPLATES[task])
    lines += [prose("Next-item data built with `data tasks --window N` (the benchmark recipe) writes a recommend "
                    "prompt as the header followed by the history's SIDs alone."),
              "Example:",
              "  neo-jax generate --ckpt RUN/final --beams 5 \\",
              "    --prompt $'task: recommend | type: product | format: ids\\nHistory: [SID]...[/SID]\\n"
              "Which product will this user choose next?'",
              prose("A prompt without a header uses --type and --format. Output: one JSON line per prompt, "
                    '{"prompt", "beams": [{"text", "raw", "items": [{"id", "type", "title"}], "score", "log_prob", '
                    '"finished"}]}, beams best first; "text" writes each item as [type id "title"], "raw" as its '
                    f"SID. --max-new-tokens defaults to what the formats need: one SID for 'ids', "
                    f"{TEXT_MAX_NEW_TOKENS} tokens for 'text' and 'mixed' (less if the model's context is shorter).")]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = prompt_language()
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="checkpoint directory (model_config.json, params/)")
    model.add_argument("--bundle", help="serving bundle written by `neo-jax export` (model, tokenizer, SIDs and "
                                        "titles in one directory, verified before use); instead of --ckpt")
    parser.add_argument("--sids", default=None, help="output directory of `neo-jax sids build` (trie, sids.tsv); "
                                                     "default: the one the checkpoint's tokenizer was built from")
    parser.add_argument("--data", default=None, help="data directory whose items file gives titles (default: the "
                                                     "one the SIDs were built from, if it is still there)")
    parser.add_argument("--tokenizer", default=None,
                        help="MixedTokenizer directory (default: CKPT/tokenizer with CKPT's vocabulary layout)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    source.add_argument("--prompts", help="JSONL file: one {\"prompt\": ..., \"exclude\": [item ids]} a line")
    parser.add_argument("--method", choices=("beam", "sample"), default="beam", help="beam search or sampling")
    parser.add_argument("--beams", type=int, default=4, help="beams (or samples) per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens to generate at most (default: an item's SID for 'ids' prompts, "
                             f"{TEXT_MAX_NEW_TOKENS} for 'text' and 'mixed')")
    parser.add_argument("--alpha", type=float, default=0.0, help="beam search length penalty (default 0)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (batch i draws with seed + i)")
    parser.add_argument("--batch", type=int, default=32,
                        help="prompts decoded at a time (default 32); each batch is written as it finishes")
    parser.add_argument("--type", action="append", dest="types", default=None,
                        help="entity type a prompt without a task header may name (repeat; default all)")
    parser.add_argument("--format", choices=("ids", "text", "mixed"), default="mixed",
                        help="output format of prompts without a task header (default mixed)")
    parser.add_argument("--exclude", action="append", default=None, help="item id no prompt may name (repeat)")
    parser.add_argument("--in-stock", default=None, help="file of the only item ids that may be named, one a line")
    parser.add_argument("--unconstrained", action="store_true", help="turn the SID constraint off (for comparison)")
    add_mesh_arguments(parser)


def read_requests(args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    """Prompts and, per prompt, the item ids it must not name."""
    if args.prompt is not None:
        return list(args.prompt), [list(args.exclude or []) for _ in args.prompt]
    prompts, excluded = [], []
    for line_number, record in read_records(args.prompts):
        if not isinstance(record.get("prompt"), str):
            raise UserError(f"{args.prompts}:{line_number}: needs a string field 'prompt'")
        exclude = record.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(i, str) for i in exclude):
            raise UserError(f"{args.prompts}:{line_number}: 'exclude' must be a list of item id strings")
        prompts.append(record["prompt"])
        excluded.append(exclude + list(args.exclude or []))
    return prompts, excluded


def load_tokenizer(ckpt: str | Path, tokenizer_dir: str | Path | None = None) -> MixedTokenizer:
    """The tokenizer at `tokenizer_dir`, else the one saved in the checkpoint directory."""
    if tokenizer_dir is not None:
        return MixedTokenizer.load(tokenizer_dir)
    ckpt = Path(ckpt)
    layout = load_vocab_layout(ckpt)
    if layout is None or not (ckpt / TOKENIZER).is_dir():
        raise UserError(f"{ckpt}: no vocab_layout.json and {TOKENIZER}/ to build the tokenizer from; "
                        "pass --tokenizer")
    return MixedTokenizer(load_text_tokenizer(ckpt / TOKENIZER), layout)


def resolve_sids_dir(ckpt: str | Path, sids_dir: str | Path | None, tokenizer_dir: str | Path | None) -> Path:
    """`sids_dir`, else the SID directory the tokenizer (given, or the checkpoint's copy) was built from."""
    if sids_dir is not None:
        return Path(sids_dir)
    tokenizer_dir = Path(ckpt) / TOKENIZER if tokenizer_dir is None else Path(tokenizer_dir)
    recorded = sids_source(tokenizer_dir) if tokenizer_dir.is_dir() else None
    if recorded is None:
        raise UserError(f"{tokenizer_dir}: no {SOURCES_FILE} naming the SID directory (a tokenizer built before "
                        "it was recorded); pass --sids")
    if not recorded.is_dir():
        raise UserError(f"{tokenizer_dir / SOURCES_FILE}: its SID directory {recorded} is gone; pass --sids")
    return recorded


def load_generator(ckpt: str | Path, sids_dir: str | Path | None, mesh: Mesh,
                   tokenizer_dir: str | Path | None = None, data_dir: str | Path | None = None,
                   default_titles: bool = False, allow_replicated: Iterable[str] = ()) -> Generator:
    """A checkpoint, its tokenizer and a SID catalog, ready to generate. Titles come from `data_dir`,
    else (with `default_titles`) from the data directory the SIDs were built from, if it is still there
    (`allow_replicated`: see `neo_jax.sharding.logical_to_spec`)."""
    tokenizer = load_tokenizer(ckpt, tokenizer_dir)
    sids_dir = resolve_sids_dir(ckpt, sids_dir, tokenizer_dir)
    if data_dir is None and default_titles:
        data_dir = sid_data_dir(sids_dir)
    model = load_model(ckpt, mesh, allow_replicated=allow_replicated)
    titles = None
    if data_dir is not None:
        catalog = load_items(items_file(data_dir))
        titles = {item_id: catalog.title(row) for row, item_id in enumerate(catalog.item_ids)}
    return Generator(model, tokenizer, load_sid_output(sids_dir), eos_token_id(tokenizer, model.config), titles, mesh)


def _prompt_format(prompt: str, default_format: str) -> str:
    return parse_header(prompt).output_format if prompt.startswith("task:") else default_format


def read_item_ids(path: str) -> list[str]:
    try:
        return [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        raise UserError(f"{path}: in-stock item file not found") from None


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UserError(f"--batch must be at least 1, got {args.batch}")
    prompts, excluded = read_requests(args)
    if args.bundle is not None:
        if args.sids or args.tokenizer or args.data:
            raise UserError("--sids, --tokenizer and --data go with --ckpt; a bundle carries its own")
        generator = load_bundle(args.bundle, mesh_from_arguments(args), args.mesh_allow_replicated)
    else:
        generator = load_generator(args.ckpt, args.sids, mesh_from_arguments(args), args.tokenizer, args.data,
                                   default_titles=True, allow_replicated=args.mesh_allow_replicated)
    max_new_tokens = args.max_new_tokens
    if max_new_tokens is None:  # enough for what the prompts ask: one SID, or a text answer
        formats = {_prompt_format(p, args.format) for p in prompts}
        # text answers: as long as the default allows, within the room the model's context leaves
        room = generator.model.config.max_position_embeddings - max(len(generator.tokenizer.encode(p)) + 2
                                                                    for p in prompts)
        max_new_tokens = sid_answer_tokens(generator.tokenizer.layout) if formats == {"ids"} else max(1, min(TEXT_MAX_NEW_TOKENS, room))
    settings = DecodeSettings(args.method, max_new_tokens, args.beams, args.alpha, args.temperature,
                              args.top_k, args.top_p)
    settings.check()
    allowed = None if args.in_stock is None else read_item_ids(args.in_stock)
    progress = Progress(len(prompts), label="generate", unit="prompt") if len(prompts) > args.batch else None
    for index, start in enumerate(range(0, len(prompts), args.batch)):
        batch, batch_excluded = prompts[start:start + args.batch], excluded[start:start + args.batch]
        # A short last batch repeats its last request, so that every batch of a run has one shape.
        fill = args.batch - len(batch) if len(prompts) > args.batch else 0
        beams = generator.generate(batch + batch[-1:] * fill, settings,
                                   excluded_ids=batch_excluded + batch_excluded[-1:] * fill,
                                   allowed_ids=allowed, default_types=args.types, default_format=args.format,
                                   constrained=not args.unconstrained, seed=args.seed + index)
        for prompt, continuations in zip(batch, beams):
            json.dump({"prompt": prompt, "beams": [c.to_dict() for c in continuations]}, sys.stdout,
                      ensure_ascii=False)
            print()
        sys.stdout.flush()
        if progress is not None:
            progress.update(start + len(batch))
    return 0


def items_file(data_dir: str | Path) -> Path:
    """The items file of a data directory (`items.jsonl`, else `items.tsv`), where titles are read."""
    data_dir = Path(data_dir)
    for name in ("items.jsonl", "items.tsv"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise UserError(f"{data_dir}: no items.jsonl or items.tsv to read titles from")
