"""`neo-jax export CKPT_DIR OUT_DIR`: a checkpoint with its tokenizer, SIDs and titles -> a serving bundle.

    neo-jax export runs/tiny_instruct/final runs/tiny_instruct/bundle [--dtype bfloat16]
    neo-jax generate --bundle runs/tiny_instruct/bundle \
        --prompt $'task: recommend | type: product | format: ids\nWhich product will this user choose next?'

The inputs are found as `generate` finds them: a training run's `final/` carries its tokenizer, which
names the SID directory it was built from, which names its data directory (the items' titles);
`--tokenizer`, `--sids` and `--data` override them. `neo_jax.export.bundle` describes the bundle and
what loading it verifies. Prints one JSON object: the bundle, its parameters' dtype, files and bytes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Iterable

from jax.sharding import Mesh

from neo_jax.atomic import atomic_output_dir
from neo_jax.catalog.sid_output import CONFIG, load_sid_output, sid_data_dir
from neo_jax.checkpoint import TOKENIZER, VOCAB_LAYOUT, load_model
from neo_jax.data.loaders import load_items
from neo_jax.decode.commands import items_file, load_tokenizer, resolve_sids_dir
from neo_jax.errors import UserError
from neo_jax.export.bundle import check_sid_blocks, write_bundle
from neo_jax.model.config import DTYPES
from neo_jax.sharding import add_mesh_arguments, mesh_from_arguments
from neo_jax.tokenizer import LAYOUT_FILE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Writes model_config.json, params/ (one raw file per parameter), tokenizer/, sids/ (codes and "
                     "trie), catalog.jsonl (ids, types, titles, text fields) and manifest.json (sha256, bytes, "
                     "shapes and dtypes of every file), which `neo-jax generate --bundle OUT_DIR` verifies before "
                     "it serves. Nothing is left at OUT_DIR on error.")
    parser.add_argument("checkpoint", help="a checkpoint directory (a training run's final/)")
    parser.add_argument("out_dir", help="the bundle directory to create")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype the parameters are stored in (default float32; bfloat16 halves them, and "
                             "the loaded model computes from their exact float32 widening)")
    parser.add_argument("--sids", default=None, help="output directory of `neo-jax sids build` (default: the one "
                                                     "the checkpoint's tokenizer was built from)")
    parser.add_argument("--tokenizer", default=None,
                        help="MixedTokenizer directory (default: CKPT/tokenizer with CKPT's vocabulary layout)")
    parser.add_argument("--data", default=None, help="data directory whose items file gives titles (default: the "
                                                     "one the SIDs were built from)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    add_mesh_arguments(parser)


def export_bundle(checkpoint: str | Path, out_dir: str | Path, mesh: Mesh, dtype: str = "float32",
                  sids_dir: str | Path | None = None, tokenizer_dir: str | Path | None = None,
                  data_dir: str | Path | None = None, overwrite: bool = False,
                  allow_replicated: Iterable[str] = ()) -> dict[str, Any]:
    """Write the serving bundle of `checkpoint` at `out_dir` (built under a temporary name, then
    renamed: nothing is left there on error); returns its manifest (`allow_replicated`: see
    `neo_jax.sharding.logical_to_spec`)."""
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        tokenizer = load_tokenizer(checkpoint, tokenizer_dir)
        sids_dir = resolve_sids_dir(checkpoint, sids_dir, tokenizer_dir)
        sids = load_sid_output(sids_dir)
        layout_file = Path(checkpoint) / VOCAB_LAYOUT if tokenizer_dir is None else Path(tokenizer_dir) / LAYOUT_FILE
        check_sid_blocks(tokenizer.layout, sids, layout_file, sids_dir)
        if data_dir is None:
            data_dir = sid_data_dir(sids_dir)
            if data_dir is None:
                raise UserError(f"{sids_dir / CONFIG}: names no data directory that is still there to read the "
                                "items' titles from; pass --data")
        catalog = load_items(items_file(data_dir))
        model = load_model(checkpoint, mesh, allow_replicated=allow_replicated)
        source = {"checkpoint": checkpoint, "tokenizer": tokenizer_dir or Path(checkpoint) / TOKENIZER,
                  "sids": sids_dir, "data": data_dir}
        manifest = write_bundle(tmp, model, tokenizer, sids, catalog, dtype,
                                {part: str(Path(path).absolute()) for part, path in source.items()})
    return manifest


def run(args: argparse.Namespace) -> int:
    manifest = export_bundle(args.checkpoint, args.out_dir, mesh_from_arguments(args), args.dtype, args.sids,
                             args.tokenizer, args.data, args.overwrite, args.mesh_allow_replicated)
    files = manifest["files"].values()
    print(json.dumps({"bundle": str(args.out_dir), "params_dtype": manifest["params_dtype"], "files": len(files),
                      "bytes": sum(entry["bytes"] for entry in files)}))
    return 0
