"""`neo-jax quickstart`: the whole path on the embedded default, end to end.

    generated multi-type catalog -> item embeddings -> SIDs + trie -> task examples ->
    tokenizer -> ArrayRecord shards -> stage 2 SID grounding -> stage 3 instruction tuning ->
    constrained beam search on held-out users -> Recall/NDCG@K (with a popularity baseline
    of the same users in the same run) -> SID-to-text accuracy, steerability and valid-SID rate
    with the constraint off, held-out text perplexity before (grounded) and after tuning

With `data=DIR` (a `neo-jax data` directory or the Amazon 2014 layout) the same path runs on
that data instead of a generated catalog, e.g. `neo-jax quickstart --config
configs/quickstart_beauty.yaml` for Amazon Beauty; `eval_split=test` scores the held-out last
items (the benchmark protocol) instead of the validation ones.

Every step writes its own directory under `out`; running again skips finished steps and
resumes an interrupted training stage from its last checkpoint. Each step is also an
ordinary command (`neo-jax data synth`, `sids build`, `data tasks`, `tokenizer build`,
`data records`, `train`, `eval recommend`, `eval language`); the quickstart prints them as it goes, so the
same run can be reproduced by hand. Settings: `key=value` overrides of `QuickstartConfig`,
e.g. `instruct_steps=2000 eval_users=1000 out=runs/qs2`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from neo_jax.baselines.popularity import padded_rows, popularity_metrics, training_counts
from neo_jax.catalog.commands import SidsBuildConfig, build_sids
from neo_jax.catalog.embed_collab import CollabConfig
from neo_jax.catalog.embeddings import EmbeddingConfig
from neo_jax.catalog.embed_text import TextEncoderConfig
from neo_jax.catalog.sids import SidConfig
from neo_jax.config import MeshConfig, add_config_arguments, load_config
from neo_jax.data.loaders import load_dataset
from neo_jax.data.splits import leave_one_out
from neo_jax.data.synthetic import SynthConfig
from neo_jax.tasks.builders import read_examples
from neo_jax.errors import UserError
from neo_jax.run_steps import DEFAULT_MODEL, StageSettings, cli_step, say, train_stage

GROUNDING_TASKS = "sid_to_text,text_to_sid,sid_to_type"



@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
    out: str = "runs/quickstart"
    seed: int = 0
    data: str | None = None  # an existing data directory; None: generate one from `synthetic`
    synthetic: SynthConfig = SynthConfig()
    embedding: EmbeddingConfig = EmbeddingConfig(source="fused", text=TextEncoderConfig(dim=128),
                                                 collab=CollabConfig(dim=32))
    sids: SidConfig = SidConfig(codebook_sizes=(32, 32), type_codebook_sizes={"brand": (16, 16), "creator": (16,)})
    text_vocab_size: int = 512  # sentencepiece model trained on the task text
    # ModelConfig fields replacing DEFAULT_MODEL's: 2 layers answer in time and ranked better than 4 here
    # (valid R@10 0.227 against 0.170 at 60 + 400 steps; BUILD_NOTES.md).
    model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"num_layers": 2})
    mesh: MeshConfig = MeshConfig()
    batch_size: int = 16
    seq_len: int = 256
    # Sized to answer within 5 minutes on a 2-core CPU; configs/quickstart_full.yaml trains 200 + 800 steps.
    grounding_steps: int = 100
    grounding_lr: float = 1e-2
    instruct_steps: int = 400
    instruct_lr: float = 3e-3
    eval_split: str = "valid"  # `valid` or `test`: which held-out item of each user is scored
    eval_users: int = 300  # users decoded at the end, a seeded sample (0: all)
    exclude_history: bool = False  # rank no item the user already has (model and popularity alike)
    beams: int = 10
    language_items: int = 100  # items described for SID-to-text accuracy (0: all)
    language_users: int = 50  # prompts for steerability without the constraint (0: all)


PREFIX = "quickstart"


def _step(name: str, out_dir: Path, command: list[str]) -> None:
    cli_step(PREFIX, name, out_dir, command)


def _train_stage(config: QuickstartConfig, root: Path, stage: str, init: dict, records: Path, steps: int,
                 learning_rate: float) -> Path:
    settings = StageSettings(stage=stage, steps=steps, learning_rate=learning_rate, batch_size=config.batch_size,
                             seq_len=config.seq_len, seed=config.seed, mesh=config.mesh)
    return train_stage(PREFIX, root / f"train_{stage}", settings, init, records, root / "tokenizer")


def popularity_baseline(data_dir: Path, targets: np.ndarray, target_types: list[str], beams: int,
                        histories: list[set[int]] | None = None) -> dict[str, float]:
    """Recall/NDCG@K of recommending each user the most frequent training items of the asked type
    (with `histories`, catalog rows per user: the most frequent ones the user does not have)."""
    dataset = load_dataset(data_dir)
    catalog = dataset.catalog
    counts = training_counts(leave_one_out(dataset.interactions.sequences()).train_sequences, len(catalog))
    for name in set(target_types):
        catalog.rows_of_type(name)  # a clear error for a type the catalog lacks
    user_types = np.array([catalog.type_names.index(name) for name in target_types], np.int64)  # [users]
    return popularity_metrics(counts, targets, tuple(k for k in (5, 10) if k <= beams),
                              padded_rows(histories) if histories else None, catalog.item_types, user_types)


def run_quickstart(config: QuickstartConfig) -> dict:
    if config.eval_split not in ("valid", "test"):
        raise UserError(f"eval_split must be 'valid' or 'test', got {config.eval_split!r}")
    root = Path(config.out)
    if config.data is not None and not Path(config.data).is_dir():  # checked before anything is written
        raise UserError(f"data: {config.data} is not a directory")
    root.mkdir(parents=True, exist_ok=True)
    if config.data is None:
        data_dir, synth = root / "data", config.synthetic
        _step("data", data_dir, ["data", "synth", str(data_dir), "--seed", str(synth.seed),
                                 "--num-items", str(synth.num_items), "--num-users", str(synth.num_users),
                                 "--num-queries", str(synth.num_queries)])
    else:
        data_dir = Path(config.data)
    if not (root / "sids").exists():
        say(PREFIX, "sids: neo-jax sids build (settings in the quickstart config)")
        summary = build_sids(SidsBuildConfig(data=str(data_dir), output=str(root / "sids"), seed=config.seed,
                                             embedding=config.embedding, sids=config.sids))
        say(PREFIX, f"sids: {json.dumps({k: summary[k] for k in ('items', 'types') if k in summary})}")
    sids_tsv = str(root / "sids" / "sids.tsv")
    _step("tasks", root / "tasks", ["data", "tasks", str(data_dir), sids_tsv, str(root / "tasks"),
                                    "--seed", str(config.seed)])
    _step("grounding tasks", root / "tasks_grounding",
          ["data", "tasks", str(data_dir), sids_tsv, str(root / "tasks_grounding"), "--tasks", GROUNDING_TASKS,
           "--seed", str(config.seed)])
    _step("tokenizer", root / "tokenizer", ["tokenizer", "build", str(root / "tokenizer"), "--sids",
                                            str(root / "sids"), "--train", str(root / "tasks"),
                                            "--vocab-size", str(config.text_vocab_size)])
    for name in ("tasks", "tasks_grounding"):
        _step(f"records ({name})", root / f"records_{name}",
              ["data", "records", str(root / name), str(root / "tokenizer"), str(root / f"records_{name}"),
               "--shards", "1", "--splits", "train,valid", "--max-length", str(config.seq_len + 1)])
    model_path = root / "model.yaml"
    model_path.write_text(yaml.safe_dump({**DEFAULT_MODEL, **config.model, "vocab_size": config.text_vocab_size}),
                          encoding="utf-8")
    grounded = _train_stage(config, root, "grounding", {"model_config": str(model_path)},
                            root / "records_tasks_grounding", config.grounding_steps, config.grounding_lr)
    tuned = _train_stage(config, root, "instruct", {"checkpoint": str(grounded)}, root / "records_tasks",
                         config.instruct_steps, config.instruct_lr)

    from neo_jax.checkpoint import load_model
    from neo_jax.decode.commands import load_generator
    from neo_jax.eval.language import HELDOUT_TEXT, evaluate_language, read_text_lines
    from neo_jax.eval.recommend import evaluate_recommendations, sample_examples, target_rows
    from neo_jax.sharding import make_mesh

    examples_path = root / "tasks" / f"{config.eval_split}.jsonl"
    all_examples = read_examples(examples_path)
    examples = sample_examples(all_examples, config.eval_users, config.seed)
    say(PREFIX, f"eval: neo-jax eval recommend --ckpt {tuned} --sids {root / 'sids'} --tokenizer {root / 'tokenizer'} "
         f"--examples {examples_path} --beams {config.beams} --limit {len(examples)} --seed {config.seed}"
         + (" --exclude-history" if config.exclude_history else ""))
    mesh = make_mesh(config.mesh)
    generator = load_generator(tuned, root / "sids", mesh, root / "tokenizer", data_dir,
                               allow_replicated=config.mesh.allow_replicated)
    model_metrics = evaluate_recommendations(generator, examples, beams=config.beams,
                                             exclude_history=config.exclude_history)
    say(PREFIX, f"eval: neo-jax eval language --ckpt {tuned} --base-ckpt {grounded} --sids {root / 'sids'} "
         f"--tokenizer {root / 'tokenizer'} --data {data_dir} --examples {examples_path} "
         f"--items {config.language_items} --users {config.language_users} --seed {config.seed}")
    grounded_model = load_model(grounded, mesh, allow_replicated=config.mesh.allow_replicated)
    language = evaluate_language(generator, load_dataset(data_dir).catalog, all_examples,
                                 read_text_lines(HELDOUT_TEXT), grounded_model,
                                 items=config.language_items, users=config.language_users, seed=config.seed)
    histories = [{generator.row_of_id[i] for i in e.history} for e in examples] if config.exclude_history else None
    result = {"out": str(root), "eval_split": config.eval_split, "users": len(examples),
              "exclude_history": config.exclude_history, "model": model_metrics, "language": language,
              "popularity_baseline": popularity_baseline(data_dir, target_rows(examples, generator),
                                                         [e.entity_type for e in examples], config.beams, histories),
              "checkpoint": str(tuned)}
    (root / "result.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    _show_examples(generator, examples[:SHOWN_EXAMPLES], config.beams)
    say(PREFIX, f"scale: a {_parameter_count(generator.model) / 1e6:.1f}M-parameter decoder from random weights, "
                f"{config.grounding_steps} + {config.instruct_steps} training steps, {len(examples)} evaluated users: "
                "it shows the path working end to end, not what the model can reach; for the longer run "
                "`--config configs/quickstart_full.yaml`, for the public benchmark `neo-jax bench rec --dataset beauty`")
    say(PREFIX, f"results: {root / 'result.json'}; `neo-jax report {root}` draws them")
    say(PREFIX, f"next: neo-jax generate --ckpt {shlex.quote(str(tuned))} --prompt {_shell_word(examples[0].prompt)}")
    return result


SHOWN_EXAMPLES = 3


def _parameter_count(model) -> int:
    import jax
    from flax import nnx
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _shell_word(text: str) -> str:
    """`text` as one bash word on one line: `$'...'` (newlines as \\n) when it spans lines."""
    if "\n" not in text:
        return shlex.quote(text)
    return "$'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _show_examples(generator, examples, beams: int) -> None:
    """Print a few held-out users' constrained recommendations, with titles, beside their real next item."""
    from neo_jax.decode.generate import DecodeSettings
    from neo_jax.eval.recommend import target_rows

    settings = DecodeSettings(method="beam", max_new_tokens=8, beam_size=min(beams, 3))
    decoded = generator.generate([e.prompt for e in examples], settings)
    for example, target, continuations in zip(examples, target_rows(examples, generator), decoded):
        named = [f'{item.item_id} "{item.title or ""}"' for c in continuations for item in c.items if item]
        say(PREFIX, f"example: {example.prompt.splitlines()[-1][:80]!r} -> {'; '.join(named)} "
                    f"(held out: {generator.sids.item_ids[target]})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, __doc__, "a YAML file of settings (e.g. configs/quickstart_beauty.yaml)",
                         "settings of the run, e.g. out=runs/qs instruct_steps=2000 mesh.data=2")


def run(args: argparse.Namespace) -> int:
    result = run_quickstart(load_config(QuickstartConfig, args.config, args.overrides))
    print(json.dumps(result))
    return 0
