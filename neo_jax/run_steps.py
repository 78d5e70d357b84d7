"""The steps that whole-path commands (`neo-jax quickstart`, `neo-jax bench rec`) chain.

Each step writes its own directory; a step whose directory exists is skipped, so running the
command again resumes: finished steps are kept and an interrupted training stage continues
from its last checkpoint. Every step is also an ordinary command, and is printed as one, so a
run can be reproduced by hand.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

from neo_jax.cli import main as cli_main
from neo_jax.config import MeshConfig, load_config
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object


# The decoder whole-path commands train from random weights: a small Llama-style model (about 1M
# parameters with the extended vocabulary); `vocab_size` is replaced by the tokenizer's padded one.
DEFAULT_MODEL = {
    "architecture": "LlamaForCausalLM", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 384,
    "num_layers": 4, "num_heads": 4, "num_kv_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": True, "dtype": "float32",
}


def say(prefix: str, message: str) -> None:
    print(f"[{prefix}] {message}", file=sys.stderr, flush=True)


def cli_step(prefix: str, name: str, out_dir: Path, command: list[str]) -> None:
    """Run `neo-jax COMMAND` unless its output directory exists (a finished step)."""
    if out_dir.exists():
        say(prefix, f"{name}: {out_dir} exists, skipped")
        return
    say(prefix, f"{name}: neo-jax {' '.join(command)}")
    if cli_main(command) != 0:
        raise UserError(f"{prefix} step '{name}' failed (see the message above)")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """One training stage of a whole-path command; written out as a `neo-jax train` config."""

    stage: str  # grounding | instruct | preference
    steps: int
    learning_rate: float
    batch_size: int
    seq_len: int
    seed: int = 0
    mesh: MeshConfig = MeshConfig()
    warmup_steps: int | None = None  # default: a tenth of the steps
    weight_decay: float | None = None  # default: 0 for grounding, 0.1 otherwise
    dropout: float = 0.0
    item_id_dropout: float = 0.0  # `TrainConfig.item_id_dropout`
    unlikelihood: float = 0.0  # weight of the history unlikelihood term (`TrainConfig.unlikelihood`)
    unlikelihood_from_level: int = 1  # `TrainConfig.unlikelihood_from_level`
    unlikelihood_avoided_from_level: int = 2  # `TrainConfig.unlikelihood_avoided_from_level`
    ema_decay: float = 0.0  # weight average (`OptimizerConfig.ema_decay`); 0: none
    compute_dtype: str = "float32"  # or bfloat16 (an accelerator); the weights stay float32
    evaluations: int = 4  # validation losses (and checkpoints) over the run
    eval_batches: int = 4
    # More `neo-jax train` eval settings (`EvalConfig`): the Recall validation and model selection,
    # e.g. {"recall_examples": ..., "recall_sids": ..., "recall_users": 2000, "select": "valid_ndcg@10"}.
    eval_extra: dict = dataclasses.field(default_factory=dict)
    log_every: int = 10
    preference: dict = dataclasses.field(default_factory=dict)  # `TrainConfig.preference` of a preference stage
    task_weights: dict = dataclasses.field(default_factory=dict)  # the records' task mix (`DataConfig`); {}: as written


def train_stage(prefix: str, run_dir: Path, settings: StageSettings, init: dict, records: Path,
                tokenizer: Path, sids: Path | None = None) -> Path:
    """Train one stage into `run_dir` (resuming it if it has checkpoints); the final model's directory,
    or the selected one's (`RUN_DIR/best`) when `eval_extra` sets `select`. `sids`: the catalog of the
    model's item-identity table (`neo-jax train`'s `data.sids`)."""
    from neo_jax.train.config import TrainConfig
    from neo_jax.train.trainer import SELECTION_FILE, train

    every = max(1, settings.steps // settings.evaluations)
    weight_decay = settings.weight_decay
    if weight_decay is None:
        weight_decay = 0.0 if settings.stage == "grounding" else 0.1
    config = {
        "run_dir": str(run_dir), "stage": settings.stage, "init": init, "seed": settings.seed,
        "data": {"records_dir": str(records), "tokenizer": str(tokenizer),
                 **({} if sids is None else {"sids": str(sids)}),
                 **({"task_weights": dict(settings.task_weights)} if settings.task_weights else {})},
        "mesh": dataclasses.asdict(settings.mesh), "steps": settings.steps, "batch_size": settings.batch_size,
        "seq_len": settings.seq_len, "log_every": settings.log_every, "dropout": settings.dropout,
        "item_id_dropout": settings.item_id_dropout,
        "compute_dtype": settings.compute_dtype, "unlikelihood": settings.unlikelihood,
        "unlikelihood_from_level": settings.unlikelihood_from_level,
        "unlikelihood_avoided_from_level": settings.unlikelihood_avoided_from_level,
        "optimizer": {"learning_rate": settings.learning_rate,
                      "warmup_steps": (max(1, settings.steps // 10) if settings.warmup_steps is None
                                       else settings.warmup_steps),
                      "weight_decay": weight_decay, "ema_decay": settings.ema_decay},
        "checkpoint": {"every_steps": every, "keep": 2},
        "eval": {"every_steps": every, "batches": settings.eval_batches, **settings.eval_extra},
    }
    if settings.preference:
        config["preference"] = settings.preference
    config_path = run_dir.parent / f"{run_dir.name}.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    say(prefix, f"train {settings.stage}: neo-jax train --config {config_path}")
    result = train(load_config(TrainConfig, config_path))
    if result.preempted or result.final_dir is None:
        raise UserError(f"training stage {settings.stage} stopped at step {result.step}; run the command again "
                        f"to resume")
    if result.loss is not None:  # None when the stage had already finished
        say(prefix, f"train {settings.stage}: loss {result.loss:.4f}, valid_loss {result.valid_loss}")
    if result.best_dir is not None:
        selection = read_json_object(Path(result.best_dir) / SELECTION_FILE)
        say(prefix, f"train {settings.stage}: selected the model of step {selection['step']} "
                    f"({selection['metric']} {selection['value']:.4f}): {result.best_dir}")
        return Path(result.best_dir)
    return Path(result.final_dir)
