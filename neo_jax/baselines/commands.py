"""`neo-jax baseline sasrec|transition|popularity`: baselines on a dataset's leave-one-out split.

    neo-jax baseline sasrec --data DIR --out RUN_DIR [--config configs/sasrec_beauty.yaml] [KEY=VALUE ...]
    neo-jax baseline transition --data DIR [--split test|valid] [--exclude-history] [--ks 5,10,20]
    neo-jax baseline popularity --data DIR [--split test|valid] [--exclude-history] [--ks 5,10,20]

DIR is any dataset `neo-jax data check` reads (e.g. the Amazon 2014 layout). SASRec trains
on every user's training items (all but the last two), is validated on the second-to-last item
every `eval_every` epochs and stops early on validation NDCG@10; the best epoch's parameters
rank the last item. Ranking is over the full catalog, without the user's history items when
`exclude_history` is true (as `neo-jax eval recommend --exclude-history`). Progress goes to
stderr. RUN_DIR gets `config.yaml` and `result.json` (valid and test Recall/NDCG@5/10 of the
best epoch, and of a popularity baseline on the same users); the result is also printed as
one JSON line.
Settings (KEY=VALUE overrides the config file): learning_rate, batch_size, epochs, eval_every,
patience, exclude_history, eval_batch_size, seed, model.max_len, model.hidden, model.blocks,
model.heads, model.dropout.

`transition` (`baselines.transition`) ranks by the next-item counts of the user's newest item
plus 0.3 times those of the one before it, counted over the training parts, popularity
breaking ties; `popularity` (`baselines.popularity`) ranks by training-event counts, within
the target's entity type when the catalog has several. Both score every user with a
validation (`--split valid`) or test (`--split test`, the default) item, over the full
catalog, and print one JSON object: Recall/NDCG@K, users, items and wall seconds. They train
nothing and take seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from neo_jax.atomic import atomic_output_dir
from neo_jax.baselines.popularity import examples_of, popularity_ranking_metrics
from neo_jax.baselines.transition import transition_ranking_metrics
from neo_jax.config import load_config, to_dict
from neo_jax.data.loaders import load_dataset
from neo_jax.data.splits import leave_one_out

COUNT_BASELINES = {
    "transition": "next-item counts of the newest two history items (weights 1.0 / 0.3), popularity breaking ties",
    "popularity": "the most frequent training items (per entity type when the catalog has several)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    baselines = parser.add_subparsers(dest="baseline", metavar="BASELINE", required=True)
    sasrec = baselines.add_parser("sasrec", help="SASRec trained with full-softmax cross-entropy",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sasrec.add_argument("--data", required=True, type=Path, help="dataset directory")
    sasrec.add_argument("--out", required=True, type=Path, help="run directory to create (must not exist)")
    sasrec.add_argument("--config", type=Path, default=None, help="YAML file of settings")
    sasrec.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings, e.g. epochs=50 model.dropout=0.3")
    for name, help_text in COUNT_BASELINES.items():
        counted = baselines.add_parser(name, help=help_text, description=__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        counted.add_argument("--data", required=True, type=Path, help="dataset directory")
        counted.add_argument("--split", choices=("test", "valid"), default="test",
                             help="which held-out item of each user is ranked (default: test)")
        counted.add_argument("--exclude-history", action="store_true",
                             help="never recommend an item of the user's history")
        counted.add_argument("--ks", type=_cutoffs, default=(5, 10, 20), help="cutoffs K (default 5,10,20)")


def _log(message: str) -> None:
    print(f"[sasrec] {message}", file=sys.stderr, flush=True)


def _cutoffs(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(ks) < 1:
        raise argparse.ArgumentTypeError(f"cutoffs must be positive, got {text!r}")
    return ks


def run_count_baseline(args: argparse.Namespace) -> dict:
    """Metrics of the `transition` or `popularity` baseline on one split, as the printed JSON object."""
    started = time.perf_counter()
    dataset = load_dataset(args.data)
    catalog = dataset.catalog
    split = leave_one_out(dataset.interactions.sequences())
    metric = {"transition": transition_ranking_metrics, "popularity": popularity_ranking_metrics}[args.baseline]
    metrics = metric(split, catalog, args.ks, args.exclude_history, on=args.split)
    return {"model": args.baseline, "data": str(args.data), "split": args.split,
            "exclude_history": args.exclude_history, "users": len(examples_of(split, args.split)),
            "items": len(catalog), **metrics, "wall_seconds": time.perf_counter() - started}


def run(args: argparse.Namespace) -> int:
    if args.baseline in COUNT_BASELINES:
        print(json.dumps(run_count_baseline(args)))
        return 0
    from neo_jax.baselines.train import SasRecTrainConfig, train_sasrec  # jax and flax: only for sasrec

    config = load_config(SasRecTrainConfig, args.config, args.overrides)
    started = time.perf_counter()
    with atomic_output_dir(args.out, overwrite_option=None) as run_dir:
        dataset = load_dataset(args.data)
        split = leave_one_out(dataset.interactions.sequences())
        trained = train_sasrec(split, len(dataset.catalog), config, _log)
        result = {"model": "sasrec", "data": str(args.data), "exclude_history": config.exclude_history, **trained,
                  "wall_seconds": time.perf_counter() - started, "config": to_dict(config)}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        (run_dir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result))
    return 0
