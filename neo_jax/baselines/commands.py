"""`neo-jax baseline sasrec`: a well-tuned SASRec on a dataset's leave-one-out split.

    neo-jax baseline sasrec --data DIR --out RUN_DIR [--config configs/sasrec_beauty.yaml] [KEY=VALUE ...]

DIR is any dataset `neo-jax data check` reads (e.g. the Amazon 2014 layout). The model trains
on every user's training items (all but the last two), is validated on the second-to-last item
every `eval_every` epochs and stops early on validation NDCG@10; the best epoch's parameters
rank the last item. Ranking is over the full catalog, without the user's history items when
`exclude_history` is true (as `neo-jax eval recommend --exclude-history`). Progress goes to
stderr. RUN_DIR gets `config.yaml` and `result.json` (valid and test Recall/NDCG@5/10 of the best epoch, and of a
popularity baseline on the same users); the result is also printed as one JSON line.
Settings (KEY=VALUE overrides the config file): learning_rate, batch_size, epochs, eval_every,
patience, exclude_history, eval_batch_size, seed, model.max_len, model.hidden, model.blocks,
model.heads, model.dropout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from neo_jax.atomic import atomic_output_dir
from neo_jax.baselines.train import SasRecTrainConfig, train_sasrec
from neo_jax.config import load_config, to_dict
from neo_jax.data.loaders import load_dataset
from neo_jax.data.splits import leave_one_out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    baselines = parser.add_subparsers(dest="baseline", metavar="BASELINE", required=True)
    sasrec = baselines.add_parser("sasrec", help="SASRec trained with full-softmax cross-entropy",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sasrec.add_argument("--data", required=True, type=Path, help="dataset directory")
    sasrec.add_argument("--out", required=True, type=Path, help="run directory to create (must not exist)")
    sasrec.add_argument("--config", type=Path, default=None, help="YAML file of settings")
    sasrec.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings, e.g. epochs=50 model.dropout=0.3")


def _log(message: str) -> None:
    print(f"[sasrec] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    config = load_config(SasRecTrainConfig, args.config, args.overrides)
    started = time.perf_counter()
    with atomic_output_dir(args.out) as run_dir:
        dataset = load_dataset(args.data)
        split = leave_one_out(dataset.interactions.sequences())
        trained = train_sasrec(split, len(dataset.catalog), config, _log)
        result = {"model": "sasrec", "data": str(args.data), "exclude_history": config.exclude_history, **trained,
                  "wall_seconds": time.perf_counter() - started, "config": to_dict(config)}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")
        (run_dir / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result))
    return 0
