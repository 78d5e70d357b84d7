"""`neo-jax bench align`: Align3GR's three alignment levels on one dataset, and the ablation that turns
each one off.

    neo-jax bench align --dataset beauty [--config configs/bench_align_beauty.yaml] [KEY=VALUE ...]
    neo-jax bench align --data DIR [--config FILE] [KEY=VALUE ...]

Each variant is a `neo-jax bench rec` run (`rec`: SIDs, window training, test evaluation) followed by
`neo-jax align` over its selected model (`align`: the progressive DPO stages), in `OUT/<variant>/`:
- `full`: the token level (items and users quantised from the fusion networks' vectors, `sids build`'s
  `users` section), the behaviour level (the user's SID in every next-item prompt; the profile_to_user
  and user_to_profile tasks in training) and the preference level (the DPO stages);
- `no_behaviour`: the same SIDs, users included, but no user in the prompts and no profile tasks;
- `no_token`: the item SIDs of `rec`'s own embedding settings, no user SIDs (so no behaviour level either);
- the preference level off is every variant's fine-tuned row (its `align` stage "fine-tuned").
`behaviour_task_weights` and `behaviour_steps` give the full variant its own task mix and length, so that
its profile tasks need not crowd out next-item training.
Only the first variant runs `rec.baselines`. Prints one JSON object (also OUT/result.json): per variant
its levels, `bench rec`'s test figures (history kept) and every `align` row (validation, and test on
`align.test_users`), then `ablation`: validation and test Recall/NDCG@10 of the full sequence, of the
full variant before its DPO stages, and of each variant without a level after its stages. Rerunning
with the same OUT resumes every phase.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from neo_jax.align import AlignConfig, run_align
from neo_jax.atomic import atomic_write_text
from neo_jax.bench.rec import RecBenchConfig, add_arguments as add_rec_arguments, run_bench, shared_data_dir
from neo_jax.config import load_config
from neo_jax.errors import UserError
from neo_jax.run_steps import say

PREFIX = "bench align"
# variant -> its levels: token (dual SIDs with users), behaviour (users in prompts and tasks)
VARIANTS = {"full": ("token", "behaviour"), "no_behaviour": ("token",), "no_token": ()}
METRICS = ("recall@10", "ndcg@10")


@dataclasses.dataclass(frozen=True)
class AlignBenchConfig:
    out: str = ""  # default runs/bench_align/<dataset directory name>
    variants: tuple[str, ...] = tuple(VARIANTS)
    # Every variant's `bench rec` settings; `out`, `users.enabled`, `user_sids` and `behaviour_tasks` are
    # the variant's. `users` holds the fusion networks' and the users' codebooks' settings.
    rec: RecBenchConfig = RecBenchConfig()
    # A variant with the behaviour level trains on the profile tasks too (on Beauty two records of
    # three, and 57% of the tokens, as written). These replace its `rec.task_weights` and `rec.steps`
    # (0: keep them) so it can see as many next-item windows as the other variants.
    behaviour_task_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    behaviour_steps: int = 0
    # Every variant's `neo-jax align` settings; `init`, `data`, `sids`, `out`, `window` and `user_sids` are
    # the variant's.
    align: AlignConfig = AlignConfig()

    def __post_init__(self):
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise UserError(f"variants: {unknown or 'none'}; choose from {list(VARIANTS)}")
        if self.behaviour_steps < 0:
            raise UserError(f"behaviour_steps must be 0 (rec.steps) or positive, got {self.behaviour_steps}")


def _variant_configs(config: AlignBenchConfig, name: str, root: Path, data_dir: Path,
                     first: bool) -> tuple[RecBenchConfig, AlignConfig]:
    levels = VARIANTS[name]
    rec = config.rec
    if "behaviour" in levels:
        rec = dataclasses.replace(rec, task_weights=config.behaviour_task_weights or rec.task_weights,
                                  steps=config.behaviour_steps or rec.steps)
    rec = dataclasses.replace(rec, out=str(root / "rec"),
                              users=dataclasses.replace(config.rec.users, enabled="token" in levels),
                              user_sids="behaviour" in levels, behaviour_tasks="behaviour" in levels,
                              baselines=config.rec.baselines if first else ())
    align = dataclasses.replace(config.align, init=str(root / "rec" / "train" / ("best" if rec.select else "final")),
                                data=str(data_dir), sids=str(root / "rec" / "sids"), out=str(root / "align"),
                                window=rec.window, user_sids=rec.user_sids)
    return rec, align


def _row(name: str, stage: dict) -> dict:
    return {"variant": name, "stage": stage["stage"],
            **{f"valid_{m}": stage["valid"].get(m) for m in METRICS},
            **{f"test_{m}": stage["test"].get(m) for m in METRICS}}


def run_bench_align(config: AlignBenchConfig, data_dir: Path) -> dict:
    root = Path(config.out or f"runs/bench_align/{data_dir.name}")
    variants = {}
    for index, name in enumerate(config.variants):
        say(PREFIX, f"variant {name}: levels {list(VARIANTS[name]) + ['preference']}")
        rec, align = _variant_configs(config, name, root / name, data_dir, index == 0)
        rec_result = run_bench(rec, data_dir)
        aligned = run_align(align)
        variants[name] = {"levels": [*VARIANTS[name], "preference"], "steps": rec.steps,
                          "task_weights": rec.task_weights, "rec_test": rec_result["protocols"]["history_kept"],
                          "align": aligned["stages"]}
    ablation = []
    for name, variant in variants.items():
        stages = variant["align"]
        if name == "full":
            ablation += [_row("full", stages[-1]), _row("no_preference", stages[0])]
        else:
            ablation.append(_row(name, stages[-1]))
    result = {"dataset": str(data_dir), "out": str(root), "variants": variants, "ablation": ablation}
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / "result.json", json.dumps(result, indent=2))
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_rec_arguments(parser)
    parser.description = __doc__


def run(args: argparse.Namespace) -> int:
    data_dir = shared_data_dir(args.dataset) if args.dataset else args.data
    if not data_dir.is_dir():
        raise UserError(f"--data: {data_dir} is not a directory")
    print(json.dumps(run_bench_align(load_config(AlignBenchConfig, args.config, args.overrides), data_dir)))
    return 0
