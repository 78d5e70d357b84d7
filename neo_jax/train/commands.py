"""`neo-jax train --config configs/train_tiny_grounding.yaml key=value ...`: run or resume a training stage.

Settings are those of `neo_jax.train.config.TrainConfig` (YAML sections `init`, `data`,
`mesh`, `distributed`, `optimizer`, `lora`, `checkpoint`, `eval` and top-level keys such
as `stage`, `steps`, `batch_size`, `seq_len`); `key=value` overrides use dotted names,
e.g. `mesh.fsdp=4 optimizer.learning_rate=1e-4 steps=200`. Running the same command again resumes
from the run directory's latest checkpoint. Prints a JSON summary when done.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from neo_jax.config import add_config_arguments, load_config
from neo_jax.train.config import TrainConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, __doc__, "a training config YAML (see configs/train_*.yaml)",
                         "settings that replace the file's, e.g. steps=100 mesh.data=2 run_dir=runs/try",
                         config_required=True)


def run(args: argparse.Namespace) -> int:
    config = load_config(TrainConfig, args.config, args.overrides)
    from neo_jax.train.trainer import train  # imports JAX: only once the config is known to be valid

    result = train(config)
    print(json.dumps({"run_dir": config.run_dir, **dataclasses.asdict(result)}))
    return 0
