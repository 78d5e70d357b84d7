"""`neo-jax shard-plan --config TRAIN_CONFIG.yaml [key=value ...]`: where a training run's state lives.

From shapes alone (nothing is initialised, loaded or compiled) it builds the train state that
`neo-jax train` would build for the config (`neo_jax.train.trainer.train_state_layout`: the same
stage split, LoRA adapters, optimizer and weight average, the same shardings) on the config's mesh
over this machine's devices, or over `--devices N` devices that need not exist, and prints one
JSON object:
- `parameters`: per weight of the state (`trainable.model.*`, `trainable.lora.*`, `frozen.*`),
  its shape, dtype, partition spec (per dimension: a mesh axis, a list of them, or null) and the
  bytes each device holds of it;
- `bytes_per_device`: `parameters` (trainable and frozen weights, LoRA adapters included),
  `optimizer_state` (the optimizer's moments and counters, the weight average where
  `optimizer.ema_decay` keeps one, the step counter), `gradients` (one value per trainable
  weight, sharded like it) and their `total`; `train_state_bytes_per_device` splits the state
  by its entries (`step`, `trainable`, `frozen`, `opt`, `ema`).
A mesh axis that does not divide a parameter is the one-line error `neo-jax train` stops with.
Needs the config's `init` and `data.tokenizer` (for the model's shape and vocabulary), not its data.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
from jax.sharding import NamedSharding

from neo_jax.config import load_config
from neo_jax.errors import UserError
from neo_jax.sharding import abstract_mesh
from neo_jax.train.config import TrainConfig, check_model_settings
from neo_jax.train.trainer import model_source, train_state_layout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="a training config YAML (see configs/train_*.yaml)")
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="plan for N devices (default: this machine's); they need not exist")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="settings that replace the file's, e.g. mesh.fsdp=4 mesh.tensor=2 lora.rank=8")


def _bytes_per_device(leaf: jax.ShapeDtypeStruct, sharding: NamedSharding) -> int:
    return math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize


def _spec(sharding: NamedSharding, ndim: int) -> list:
    """Per dimension: the mesh axis it is split over, a list of them, or None (whole)."""
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def state_bytes_per_device(tree, shardings) -> int:
    """Bytes one device holds of every leaf of `tree` (abstract arrays) laid out by `shardings`."""
    return sum(jax.tree.leaves(jax.tree.map(_bytes_per_device, tree, shardings)))


def shard_plan(config: TrainConfig, num_devices: int) -> dict:
    """The plan `neo-jax shard-plan` prints (see the module docstring)."""
    check_model_settings(config)
    model_config, layout = model_source(config)
    mesh = abstract_mesh(config.mesh, num_devices)
    state_layout = train_state_layout(config, model_config, layout, mesh)
    state, shardings = state_layout.abstract_state, state_layout.shardings
    weights = {"trainable": state["trainable"], "frozen": state["frozen"]}
    weight_shardings = {"trainable": shardings["trainable"], "frozen": shardings["frozen"]}
    parameters = [{"path": jax.tree_util.keystr(path, simple=True, separator="."), "shape": list(leaf.shape),
                   "dtype": str(leaf.dtype), "spec": _spec(sharding, leaf.ndim),
                   "bytes_per_device": _bytes_per_device(leaf, sharding)}
                  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(weights),
                                                    jax.tree.leaves(weight_shardings))]
    by_entry = {name: state_bytes_per_device(state[name], shardings[name]) for name in state}
    totals = {"parameters": by_entry["trainable"] + by_entry["frozen"],
              "optimizer_state": by_entry["opt"] + by_entry.get("ema", 0) + by_entry["step"],
              "gradients": by_entry["trainable"]}
    totals["total"] = sum(totals.values())
    return {"mesh": dict(mesh.shape), "devices": num_devices, "allow_replicated": list(config.mesh.allow_replicated),
            "stage": config.stage, "parameters": parameters, "bytes_per_device": totals,
            "train_state_bytes_per_device": by_entry}


def run(args: argparse.Namespace) -> int:
    config = load_config(TrainConfig, args.config, args.overrides)
    if args.devices is not None and args.devices < 1:
        raise UserError(f"--devices must be at least 1, got {args.devices}")
    print(json.dumps(shard_plan(config, jax.device_count() if args.devices is None else args.devices)))
    return 0
