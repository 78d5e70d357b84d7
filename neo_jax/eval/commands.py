"""`neo-jax eval`: one JSON object per run.

    neo-jax eval recommend --ckpt RUN/final --examples TASKS/test.jsonl [--sids SIDS_DIR] [--beams 20]
                           [--exclude-history] [--limit N]
    neo-jax eval language --ckpt RUN/final --data DATA_DIR --examples TASKS/test.jsonl [--sids SIDS_DIR]
                          [--base-ckpt RUN_BEFORE/final] [--text FILE] [--items 200] [--users 200]

`recommend`: recall@K, ndcg@K, users, and the share of beams that name a catalog item (decoding is
constrained, so every named item exists and has the asked type). `language`: SID-to-text accuracy,
steerability and the valid-SID rate with the constraint off, and the perplexity of held-out plain
text, before tuning (`--base-ckpt`) and after (`neo_jax.eval.language`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neo_jax.data.loaders import load_dataset
from neo_jax.checkpoint import load_model, load_vocab_layout
from neo_jax.decode.commands import load_generator
from neo_jax.errors import UserError
from neo_jax.eval.language import HELDOUT_TEXT, evaluate_language, read_text_lines
from neo_jax.eval.recommend import evaluate_recommendations, parse_ks, sample_examples
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments
from neo_jax.tasks.builders import read_examples

SIDS_HELP = "output directory of `neo-jax sids build` (default: the one the checkpoint's tokenizer was built from)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    recommend = commands.add_parser("recommend", help="Recall/NDCG@K of next-item recommendation",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recommend.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory (e.g. RUN_DIR/final)")
    recommend.add_argument("--sids", default=None, type=Path,
                           help=SIDS_HELP)
    recommend.add_argument("--examples", required=True, type=Path,
                           help="valid.jsonl or test.jsonl written by `neo-jax data tasks`")
    recommend.add_argument("--tokenizer", type=Path, default=None,
                           help="tokenizer directory (default: the one saved in the checkpoint)")
    recommend.add_argument("--beams", type=int, default=20,
                           help="beams = length of each ranked list, at least the largest K (default 20)")
    recommend.add_argument("--ks", default="1,5,10,20", help="cut-offs K of Recall/NDCG@K (default 1,5,10,20; "
                                                             "those above --beams are left out)")
    recommend.add_argument("--batch", type=int, default=64, help="prompts decoded together (default 64)")
    recommend.add_argument("--limit", type=int, default=None,
                           help="evaluate a seeded random sample of N examples (default: all)")
    recommend.add_argument("--seed", type=int, default=0, help="seed of the --limit sample (default 0)")
    recommend.add_argument("--exclude-history", action="store_true",
                           help="never rank an item the user already has (the examples' `history`), as "
                                "S3-Rec's full-ranking evaluation of SASRec does")
    add_mesh_arguments(recommend)

    language = commands.add_parser("language", help="SID-to-text, steerability, valid-SID rate, perplexity",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    language.add_argument("--ckpt", required=True, type=Path, help="the tuned checkpoint (e.g. RUN_DIR/final)")
    language.add_argument("--sids", default=None, type=Path,
                           help=SIDS_HELP)
    language.add_argument("--data", required=True, type=Path, help="the data directory (the items' text)")
    language.add_argument("--examples", required=True, type=Path,
                          help="recommendation examples (valid.jsonl or test.jsonl of `neo-jax data tasks`), "
                               "re-headed with each output format for steerability")
    language.add_argument("--base-ckpt", type=Path, default=None,
                          help="the checkpoint before tuning (same tokenizer): its perplexity is reported too")
    language.add_argument("--tokenizer", type=Path, default=None,
                          help="tokenizer directory (default: the one saved in the checkpoint)")
    language.add_argument("--text", type=Path, default=HELDOUT_TEXT,
                          help="held-out plain text, one document per line (default: the English sample "
                               "shipped with neo_jax, never trained on)")
    language.add_argument("--items", type=int, default=200, help="items described, a seeded sample (0: all)")
    language.add_argument("--users", type=int, default=200, help="examples for steerability, a seeded sample (0: all)")
    language.add_argument("--beams", type=int, default=5, help="unconstrained beams per steerability prompt")
    language.add_argument("--batch", type=int, default=16, help="prompts decoded together (default 16)")
    language.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    add_mesh_arguments(language)


def _read_examples(path: str) -> list:
    examples = read_examples(path)
    if not examples:
        raise UserError(f"{path}: no evaluation examples in the file")
    return examples


def run(args: argparse.Namespace) -> int:
    if args.eval_command == "language":
        return run_language(args)
    if args.beams < 1 or args.batch < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--beams, --batch and --limit must be positive")
    ks = parse_ks(args.ks)
    examples = sample_examples(_read_examples(args.examples), args.limit or 0, args.seed)
    generator = load_generator(args.ckpt, args.sids, mesh_from_arguments(args), args.tokenizer,
                               allow_replicated=args.mesh_allow_replicated)
    metrics = evaluate_recommendations(generator, examples, beams=args.beams, batch_size=args.batch, ks=ks,
                                       exclude_history=args.exclude_history)
    print(json.dumps({"examples": str(args.examples), "ckpt": str(args.ckpt), "beams": args.beams,
                      "exclude_history": args.exclude_history, **metrics}))
    return 0


def run_language(args: argparse.Namespace) -> int:
    texts = read_text_lines(args.text)
    mesh = mesh_from_arguments(args)
    generator = load_generator(args.ckpt, args.sids, mesh, args.tokenizer, allow_replicated=args.mesh_allow_replicated)
    base_model = None
    if args.base_ckpt is not None:
        base_layout = load_vocab_layout(args.base_ckpt)
        if base_layout is not None and base_layout != generator.tokenizer.layout:
            raise UserError(f"{args.base_ckpt}: its vocabulary layout differs from {args.ckpt}'s; perplexities "
                            "are only comparable under one tokenizer")
        base_model = load_model(args.base_ckpt, mesh, allow_replicated=args.mesh_allow_replicated)
    metrics = evaluate_language(generator, load_dataset(args.data).catalog, _read_examples(args.examples), texts,
                                base_model, items=args.items, users=args.users, beams=args.beams,
                                batch_size=args.batch, seed=args.seed)
    print(json.dumps({"ckpt": str(args.ckpt), "base_ckpt": None if args.base_ckpt is None else str(args.base_ckpt),
                      "examples": str(args.examples), "text": str(args.text), **metrics}))
    return 0
