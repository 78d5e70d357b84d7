"""`neo-jax`: one command line with subcommands.

Each subcommand lives in its own module, which exposes `add_arguments(parser)` and
`run(args) -> int`. Modules are imported only when their command runs, so
`neo-jax --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from neo_jax.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("neo_jax.quickstart", "the whole path on the generated default catalog: data, SIDs, train, eval"),
    "data": ("neo_jax.data.commands", "generate, check and split datasets; write task examples and ArrayRecord shards"),
    "sids": ("neo_jax.catalog.commands", "build semantic IDs and the SID trie for a catalog (`sids build`)"),
    "tokenizer": ("neo_jax.tokenizer.commands", "build a mixed text + SID tokenizer directory"),
    "import-hf": ("neo_jax.hf.commands_import", "import a Hugging Face (safetensors) or GGUF checkpoint"),
    "train": ("neo_jax.train.commands", "train a stage (SID grounding, instruction tuning or preference) on a "
                                        "device mesh"),
    "align": ("neo_jax.align", "progressive self-play softmax-DPO of a fine-tuned recommender (Align3GR)"),
    "shard-plan": ("neo_jax.train.shard_plan", "a training config's partition specs and bytes per device "
                                               "(parameters, optimizer state, gradients), from shapes alone"),
    "generate": ("neo_jax.decode.commands", "decode prompts with SID-constrained beam search or sampling"),
    "eval": ("neo_jax.eval.commands", "evaluate a checkpoint: recommendation Recall/NDCG@K, the language side"),
    "export-hf": ("neo_jax.hf.commands_export", "export a checkpoint as a Hugging Face model directory"),
    "export": ("neo_jax.export.commands", "export a checkpoint, tokenizer, SIDs and titles as a serving bundle"),
    "serve": ("neo_jax.serve.commands", "serve a bundle over HTTP: generate, recommend and search, batched"),
    "plot": ("neo_jax.plot", "write PNG training curves of a run directory"),
    "report": ("neo_jax.report", "a Markdown page with PNG plots of a bench rec, quickstart or train run directory"),
    "baseline": ("neo_jax.baselines.commands", "train and evaluate a baseline recommender (`baseline sasrec`)"),
}

# name -> (module, one-line help) for `neo-jax bench NAME`
BENCHMARKS: dict[str, tuple[str, str]] = {
    "model": ("neo_jax.bench.model", "train-step tokens/s and MFU, against transformers + torch"),
    "trie": ("neo_jax.bench.trie", "SID trie build time, bytes and peak memory for a synthetic N-item catalog"),
    "decode": ("neo_jax.bench.decode", "constrained vs unconstrained vs host-trie beam search ms/step by catalog size"),
    "catalog": ("neo_jax.bench.catalog", "a catalog of millions of items through SIDs, trie, task records and a decode "
                                         "step: each phase's time, peak memory and bytes"),
    "rec": ("neo_jax.bench.rec", "the generative recommender vs SASRec, transition and popularity on one dataset"),
    "align": ("neo_jax.bench.align", "Align3GR's token, behaviour and preference levels, and the ablation of each"),
    "scale": ("neo_jax.bench.scale", "compiled per-device memory and compile time of the train and decode steps "
                                     "of 1B-class shapes on a device mesh"),
    "serve": ("neo_jax.bench.serve", "HTTP serving requests/s and latency: concurrent clients vs one at a time"),
}


def _add_lazy(subparsers, name: str, module: str, help_text: str, selected: bool) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(_module=module)
    if selected:  # only the module of the command being run is imported
        importlib.import_module(module).add_arguments(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser; `argv` picks which command's module gets imported for its arguments."""
    words = [a for a in argv if not a.startswith("-")]
    command = words[0] if words else None
    benchmark = words[1] if command == "bench" and len(words) > 1 else None
    parser = argparse.ArgumentParser(prog="neo-jax", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        _add_lazy(subparsers, name, module, help_text, selected=name == command)
    bench = subparsers.add_parser("bench", help="benchmarks; each prints one JSON object")
    bench_sub = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, (module, help_text) in BENCHMARKS.items():
        _add_lazy(bench_sub, name, module, help_text, selected=name == benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    module = getattr(args, "_module", None)
    if module is None:
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(module).run(args) or 0)
    except UserError as e:
        print(f"neo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path that cannot be read or written: a parent that is a file, no permission
        where = f"{e.filename}: " if e.filename else ""
        print(f"neo-jax {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def _drop_abandoned_read_callbacks(unraisable) -> None:
    """`sys.unraisablehook` that drops one known message: the storage library's callbacks for reads that
    a failed restore abandoned, arriving after the checkpoint library closed their event loop. The
    restore's failure is already reported in one line; everything else goes to the default hook."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def run_cli() -> None:
    """The `neo-jax` program: `main`, then exit. A failed command exits at once, without the
    interpreter's teardown, where the checkpoint library's abandoned reads of a damaged checkpoint
    would print tracebacks after the one error line (everything the command wrote is final by then)."""
    sys.unraisablehook = _drop_abandoned_read_callbacks
    code = main()
    if code != 0:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run_cli()
