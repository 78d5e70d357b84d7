"""`neo-jax eval recommend`: Recall/NDCG@K of a checkpoint on leave-one-out examples.

    neo-jax eval recommend --ckpt RUN/final --sids SIDS_DIR --examples TASKS/test.jsonl [--beams 10]
                           [--exclude-history]

Prints one JSON object: recall@K, ndcg@K, users, and the share of beams that name a catalog item
(decoding is constrained, so every named item exists and has the asked type).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from neo_jax.decode.commands import load_generator
from neo_jax.errors import UserError
from neo_jax.eval.recommend import evaluate_recommendations, parse_ks, sample_examples
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments
from neo_jax.tasks.builders import read_examples


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    recommend = commands.add_parser("recommend", help="Recall/NDCG@K of next-item recommendation",
                                    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    recommend.add_argument("--ckpt", required=True, type=Path, help="checkpoint directory (e.g. RUN_DIR/final)")
    recommend.add_argument("--sids", required=True, type=Path, help="output directory of `neo-jax sids build`")
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


def run(args: argparse.Namespace) -> int:
    if args.beams < 1 or args.batch < 1 or (args.limit is not None and args.limit < 1):
        raise UserError("--beams, --batch and --limit must be positive")
    ks = parse_ks(args.ks)
    examples = sample_examples(read_examples(args.examples), args.limit or 0, args.seed)
    generator = load_generator(args.ckpt, args.sids, mesh_from_arguments(args), args.tokenizer)
    metrics = evaluate_recommendations(generator, examples, beams=args.beams, batch_size=args.batch, ks=ks,
                                       exclude_history=args.exclude_history)
    print(json.dumps({"examples": str(args.examples), "ckpt": str(args.ckpt), "beams": args.beams,
                      "exclude_history": args.exclude_history, **metrics}))
    return 0
