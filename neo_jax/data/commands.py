"""`neo-jax data ...`: generate, check and turn datasets into task examples and ArrayRecord shards.

    neo-jax data synth OUT_DIR                       # the generated multi-type default dataset
    neo-jax data check DATA_DIR                      # load a data directory and summarise it
    neo-jax data tasks DATA_DIR SIDS_TSV OUT_DIR     # leave-one-out split -> task examples (JSONL)
    neo-jax data records EXAMPLES_DIR TOKENIZER_DIR OUT_DIR   # tokenize -> ArrayRecord shards

Each prints a JSON summary; outputs are written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
from pathlib import Path
from typing import Iterable, Iterator

from neo_jax.atomic import atomic_output_dir
from neo_jax.data.loaders import load_dataset
from neo_jax.data.schema import Dataset
from neo_jax.data.splits import leave_one_out, split_queries
from neo_jax.data.synthetic import SynthConfig, generate
from neo_jax.data.writers import write_dataset, write_queries
from neo_jax.errors import UserError
from neo_jax.tasks.builders import (DEFAULT_TASKS, TASKS, USER_TASKS, WINDOW_SAMPLING, TaskConfig, iter_eval_examples,
                                    iter_examples, load_sid_map, load_user_sids, write_examples, write_train_examples)
from neo_jax.tasks.records import write_records
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.progress import Progress

SPLITS = ("train", "valid", "test")
SUMMARY_FILE = "summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = commands.add_parser("synth", help="write the generated multi-type dataset (items, interactions, "
                                              "queries) as JSONL", description=_synth.__doc__)
    synth.add_argument("out_dir", help="output directory (must not exist unless --overwrite)")
    synth.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    synth.add_argument("--num-items", type=int, default=1500, help="catalog size over all entity types")
    synth.add_argument("--num-users", type=int, default=1000, help="number of users")
    synth.add_argument("--num-queries", type=int, default=400, help="number of search queries")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    synth.set_defaults(data_run=_synth)

    check = commands.add_parser("check", help="load a data directory and print what it holds",
                                description=_check.__doc__)
    check.add_argument("data_dir", help="a directory of items/interactions/queries files, or the Amazon 2014 layout")
    check.set_defaults(data_run=_check)

    tasks = commands.add_parser("tasks", help="split histories leave-one-out and write task examples as JSONL",
                                description=_tasks.__doc__)
    tasks.add_argument("data_dir", help="the data directory")
    tasks.add_argument("sids", help="sids.tsv written by `neo-jax sids build`")
    tasks.add_argument("out_dir", help="output directory for train/valid/test.jsonl")
    tasks.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                       help=f"comma-separated tasks to write, of {','.join(TASKS)} (default: all but "
                            f"{' and '.join(USER_TASKS)}, which need user SIDs)")
    tasks.add_argument("--max-history", type=int, default=20, help="most recent items shown in a prompt")
    tasks.add_argument("--window", type=int, default=0,
                       help="next-item examples as windows of this many history items, the loss on every "
                            "item (0, the default: one prompt per prefix)")
    tasks.add_argument("--window-sampling", choices=WINDOW_SAMPLING, default="tile",
                       help="tile: windows cut each history from its newest end, every item a target once; "
                            "random: as many windows at seeded random end points (default: tile)")
    tasks.add_argument("--avoid-repeats", action="store_true",
                       help="each window example also carries one of its own items after its last one, whose "
                            "SID codes training makes unlikely there (at `neo-jax train`'s unlikelihood weight, "
                            "from its unlikelihood_avoided_from_level)")
    tasks.add_argument("--user-sids", action="store_true",
                       help="next-item prompts carry the user's SID on a line after the header (the SIDS file "
                            "must hold the users', from `neo-jax sids build users.enabled=true`)")
    tasks.add_argument("--user-sid-share", type=float, default=1.0,
                       help="with --user-sids: the share of training next-item prompts that name their user, "
                            "a seeded draw per prompt; validation and test prompts always do (default: 1)")
    tasks.add_argument("--max-search-targets", type=int, default=5, help="examples per search query")
    tasks.add_argument("--explain-fraction", type=float, default=0.2,
                       help="share of training sequences also written as explanations")
    tasks.add_argument("--query-test-fraction", type=float, default=0.1,
                       help="share of distinct queries held out of training (written to queries_test.jsonl)")
    tasks.add_argument("--seed", type=int, default=0, help="seed for templates, formats and order")
    tasks.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    tasks.set_defaults(data_run=_tasks)

    records = commands.add_parser("records", help="tokenize task examples into ArrayRecord shards",
                                  description=_records.__doc__)
    records.add_argument("examples_dir", help="output of `neo-jax data tasks`")
    records.add_argument("tokenizer", help="a tokenizer directory (MixedTokenizer.save: text model + vocab layout)")
    records.add_argument("out_dir", help="output directory for the shards")
    records.add_argument("--shards", type=int, default=4, help="shards per split (at least the number of hosts)")
    records.add_argument("--splits", default=",".join(SPLITS), help="comma-separated splits to tokenize")
    records.add_argument("--max-length", type=int, default=0,
                         help="fit every example to this many tokens, prompt and completion together: drop the "
                              "oldest history items from the prompt, then cut its start, never the completion "
                              "or the header; pass the training seq_len + 1 (default 0: no limit, and the "
                              "training pipeline cuts the head of longer examples, completion included)")
    records.add_argument("--workers", type=int, default=0,
                         help="processes that tokenize in parallel (default 0: tokenize in this one); the "
                              "records are the same, in the same order")
    records.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    records.set_defaults(data_run=_records)


def run(args: argparse.Namespace) -> int:
    summary = args.data_run(args)
    print(json.dumps(summary, indent=2))
    return 0


def _describe(dataset: Dataset) -> dict:
    catalog, events = dataset.catalog, dataset.interactions
    lengths = [len(s) for s in events.sequences()]
    return {
        "items": len(catalog),
        "items_per_type": dict(collections.Counter(catalog.type_name(r) for r in range(len(catalog)))),
        "text_fields": list(catalog.texts),
        "embedding_dim": None if catalog.embeddings is None else int(catalog.embeddings.shape[1]),
        "users": events.num_users,
        "interactions": len(events),
        "negative_interactions": sum(len(n) for n in events.negatives()),
        "history_length_min_mean_max": [min(lengths), round(sum(lengths) / len(lengths), 2), max(lengths)],
        "queries": 0 if dataset.queries is None else len(dataset.queries),
    }


def _synth(args: argparse.Namespace) -> dict:
    """Generate the synthetic multi-type dataset (products, brands, creators; users with topic tastes;
    search queries; negative feedback) and write it as JSONL in the format `neo-jax data check` reads."""
    config = SynthConfig(seed=args.seed, num_items=args.num_items, num_users=args.num_users,
                         num_queries=args.num_queries)
    dataset = generate(config)
    with atomic_output_dir(args.out_dir, overwrite=args.overwrite) as tmp:
        write_dataset(dataset, tmp)
        (tmp / "synth_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2), encoding="utf-8")
    return {"out_dir": str(args.out_dir), **_describe(dataset)}


def _check(args: argparse.Namespace) -> dict:
    """Load every file of a data directory, reporting the first problem with its file and line,
    and summarise the catalog, interactions and queries."""
    return {"data_dir": str(args.data_dir), **_describe(load_dataset(args.data_dir))}


def _tasks(args: argparse.Namespace) -> dict:
    """Split each user's history leave-one-out (last item test, second-to-last validation) and write
    task examples: train.jsonl (every task), valid.jsonl and test.jsonl (next-item recommendation),
    and the held-out search queries as queries_test.jsonl."""
    config = TaskConfig(tasks=tuple(t for t in args.tasks.split(",") if t), max_history=args.max_history,
                        max_search_targets=args.max_search_targets, explain_fraction=args.explain_fraction,
                        window=args.window, window_sampling=args.window_sampling,
                        avoid_repeats=args.avoid_repeats, user_sids=args.user_sids,
                        user_sid_share=args.user_sid_share, seed=args.seed)
    dataset = load_dataset(args.data_dir)
    sid_map = load_sid_map(args.sids, dataset.catalog)
    users = (load_user_sids(args.sids, dataset.catalog, dataset.interactions.user_ids)
             if config.user_sids or set(config.tasks) & set(USER_TASKS) else None)
    split = leave_one_out(dataset.interactions.sequences())
    train_queries = test_queries = None
    if dataset.queries is not None:
        train_queries, test_queries = split_queries(dataset.queries, args.query_test_fraction, args.seed)
    held_out = {"valid": split.valid, "test": split.test}
    empty = [name for name, examples in held_out.items() if not examples]
    if empty:
        sequences = dataset.interactions.sequences()
        raise UserError(f"{args.data_dir}: no {' or '.join(empty)} examples: leave-one-out needs users with at least "
                        f"3 positive items (test, validation, training); {sum(len(s) >= 3 for s in sequences)} of "
                        f"{len(sequences)} users have them")
    with atomic_output_dir(args.out_dir, overwrite=args.overwrite) as tmp:
        per_task = write_train_examples(tmp / "train.jsonl", dataset, split, sid_map, config, train_queries, users)
        if not per_task:
            raise UserError(f"{args.data_dir}: the tasks {list(config.tasks)} make no training example")
        counts = {"train": sum(per_task.values())}
        for name, examples in held_out.items():
            written = iter_eval_examples(dataset, examples, sid_map, config, users)
            counts[name] = write_examples(tmp / f"{name}.jsonl", _with_progress(written, len(examples), name))
        summary = {"out_dir": str(args.out_dir), "examples": counts, "train_examples_per_task": dict(per_task),
                   "held_out_queries": 0 if test_queries is None else len(test_queries)}
        if test_queries is not None:
            write_queries(tmp / "queries_test.jsonl", test_queries, dataset.catalog)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _with_progress(items: Iterable, total: int, label: str) -> Iterator:
    progress = Progress(total, label=label, unit="example")
    count = 0
    for count, item in enumerate(items, start=1):
        yield item
        progress.update(count)
    progress.update(count, force=True)
    progress.close()


def _count_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _records(args: argparse.Namespace) -> dict:
    """Tokenize train/valid/test.jsonl with a mixed tokenizer (bos before each prompt, eos after each
    completion) and write each split as ArrayRecord shards for `neo_jax.tasks.pipeline`. With
    --max-length (the training seq_len + 1) an example longer than that loses its oldest history
    items, then the start of its prompt after the header, never its completion; each split's summary
    counts history_items_dropped, examples_shortened and prompts_cut. The examples are read as a
    stream; with --workers N they are tokenized in N processes."""
    tokenizer = MixedTokenizer.load(args.tokenizer)
    paths = {split: Path(args.examples_dir) / f"{split}.jsonl" for split in args.splits.split(",") if split}
    missing = [str(path) for path in paths.values() if not path.is_file()]
    if missing:
        raise UserError(f"no such example file(s): {missing} (written by `neo-jax data tasks`)")
    summaries = {}
    with atomic_output_dir(args.out_dir, overwrite=args.overwrite) as tmp:
        for split, path in paths.items():
            examples = _with_progress(iter_examples(path), _count_lines(path), f"tokenizing {split}")
            summaries[split] = write_records(examples, tmp, split, tokenizer, args.shards, tokenizer.bos_id,
                                             tokenizer.eos_id, args.max_length, args.workers).to_dict()
        summary = {"out_dir": str(args.out_dir), "tokenizer": str(args.tokenizer), "splits": summaries}
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
