"""`neo-jax sids build --config configs/sids_beauty.yaml key=value ...`: give every catalog item a semantic ID.

Loads the data (`data`: a data directory of JSONL/TSV files or the Amazon 2014 layout, or
`synthetic` for the generated multi-type catalog), computes item embeddings (`embedding.*`),
quantises them per entity type (`sids.*`: codebook sizes per level, per type if wanted;
residual k-means or RQ-VAE), resolves collisions so every SID is distinct, builds the SID
trie and writes OUTPUT/{trie/, sids.tsv, summary.json, config.json} all at once (nothing
is left at OUTPUT on error). With `users.enabled=true` the users get SIDs too, as their own entity
type (`users.entity_type`, rows after the catalog's in sids.tsv): items and users are quantised from
the vectors of fusion networks trained on their semantic and collaborative inputs with a user-to-item
alignment loss (`neo_jax.catalog.dual`), and the summary holds each side's figures. Prints the
summary as one JSON object; progress goes to stderr.
Example overrides: `output=runs/sids seed=1 sids.codebook_sizes=[64,64] sids.collisions=balanced`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from neo_jax.atomic import atomic_output_dir
from neo_jax.catalog.dual import UserSidConfig, dual_vectors
from neo_jax.catalog.embeddings import EmbeddingConfig, dual_inputs, item_embeddings
from neo_jax.catalog.sid_output import SidOutput, write_sid_output
from neo_jax.catalog.sids import SidConfig, assign_sids
from neo_jax.catalog.table import build_trie
from neo_jax.config import load_config, to_dict
from neo_jax.data.loaders import load_dataset
from neo_jax.data.schema import Dataset
from neo_jax.data.splits import leave_one_out
from neo_jax.data.synthetic import SynthConfig, generate
from neo_jax.errors import UserError

SYNTHETIC = "synthetic"


@dataclasses.dataclass(frozen=True)
class SidsBuildConfig:
    data: str = SYNTHETIC  # a data directory, or `synthetic`
    output: str = "runs/sids"
    overwrite: bool = False
    seed: int = 0
    synthetic: SynthConfig = SynthConfig()  # the generated catalog when `data: synthetic`
    embedding: EmbeddingConfig = EmbeddingConfig()
    sids: SidConfig = SidConfig()
    users: UserSidConfig = UserSidConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "semantic IDs for a catalog"
    commands = parser.add_subparsers(dest="sids_command", metavar="SUBCOMMAND", required=True)
    build = commands.add_parser("build", help="embed, quantise and index a catalog's items (see --help)",
                                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--config", default=None, help="a YAML config (see configs/sids_*.yaml); "
                                                      "without one every setting takes its default")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="settings that replace the file's")
    build.set_defaults(sids_run=build_command)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _load_data(config: SidsBuildConfig) -> Dataset:
    if config.data == SYNTHETIC:
        return generate(config.synthetic)
    return load_dataset(config.data)


def training_popularity(dataset: Dataset) -> np.ndarray:
    """`[n_items]` events per item in the training parts of the leave-one-out split (no validation
    or test target counts)."""
    train = leave_one_out(dataset.interactions.sequences()).train_sequences
    events = np.concatenate([np.asarray(s, np.int64) for s in train]) if train else np.zeros(0, np.int64)
    return np.bincount(events, minlength=len(dataset.catalog))


@dataclasses.dataclass(frozen=True)
class SidRows:
    """What gets SIDs: the catalog's items, then (with `users.enabled`) the users."""

    ids: list[str]  # by row
    embeddings: np.ndarray  # [rows, dim]
    types: np.ndarray  # [rows] int32 entity type index
    type_names: tuple[str, ...]
    popularity: np.ndarray  # [rows] training events (the disambiguation order)
    sids: SidConfig  # with the users' codebook sizes when they are a type
    source: str  # of the embeddings
    fusion: dict | None  # the fusion networks' figures (`neo_jax.catalog.dual`)


def _item_rows(dataset: Dataset, config: SidsBuildConfig) -> SidRows:
    catalog = dataset.catalog
    embeddings, source = item_embeddings(dataset, config.embedding, config.seed, _log)
    return SidRows(list(catalog.item_ids), embeddings, catalog.item_types, tuple(catalog.type_names),
                   training_popularity(dataset), config.sids, source, None)


def _dual_rows(dataset: Dataset, config: SidsBuildConfig) -> SidRows:
    """Items and users, from the fusion networks' vectors."""
    catalog, users = dataset.catalog, config.users
    if users.entity_type in catalog.type_names:
        raise UserError(f"users.entity_type {users.entity_type!r} is an entity type of the catalog; name the users' "
                        "type otherwise")
    shared = set(catalog.item_ids).intersection(dataset.interactions.user_ids)
    if shared:
        raise UserError(f"user id {sorted(shared)[0]!r} is also an item id; user and item ids must differ to share "
                        "sids.tsv")
    split = leave_one_out(dataset.interactions.sequences())
    vectors = dual_vectors(dual_inputs(dataset, config.embedding, config.seed, _log), split.train_sequences,
                           {example.user: example.target for example in split.valid}, users, config.seed, _log)
    _log(f"users: {len(split.train_sequences)} users; fusion {vectors.summary}")
    user_type = len(catalog.type_names)
    sids = dataclasses.replace(config.sids, type_codebook_sizes={**config.sids.type_codebook_sizes,
                                                                 users.entity_type: users.codebook_sizes})
    return SidRows(list(catalog.item_ids) + list(dataset.interactions.user_ids),
                   np.concatenate([vectors.items, vectors.users]),
                   np.concatenate([catalog.item_types, np.full(len(split.train_sequences), user_type, np.int32)]),
                   (*catalog.type_names, users.entity_type),
                   np.concatenate([training_popularity(dataset), [len(s) for s in split.train_sequences]]),
                   sids, "dual", vectors.summary)


def build_sids(config: SidsBuildConfig) -> dict:
    """Run the whole build for `config`; returns the printed summary."""
    start = time.perf_counter()
    with atomic_output_dir(config.output, overwrite=config.overwrite, overwrite_option="overwrite=true") as out_dir:
        dataset = _load_data(config)
        catalog = dataset.catalog
        _log(f"sids: {len(catalog)} items of types {list(catalog.type_names)} from {config.data}")
        rows = _dual_rows(dataset, config) if config.users.enabled else _item_rows(dataset, config)
        assignment = assign_sids(rows.embeddings, rows.types, rows.type_names, rows.sids, config.seed, _log,
                                 popularity=rows.popularity)
        trie = build_trie(assignment.codes, assignment.item_types, assignment.levels_per_type)
        summary = {
            **assignment.summary(),
            "embedding": {"source": rows.source, "dim": int(rows.embeddings.shape[1])},
            **({} if rows.fusion is None else {"fusion": rows.fusion}),
            "quantiser": config.sids.quantiser.method,
            "collisions": config.sids.collisions,
            "seed": config.seed,
            "trie": {"num_nodes": trie.num_nodes, "max_children": trie.max_children, "bytes": trie.nbytes},
            "output": config.output,
        }
        summary["seconds"] = round(time.perf_counter() - start, 3)
        data = config.data if config.data == SYNTHETIC else str(Path(config.data).resolve())  # for `generate`'s titles
        write_sid_output(out_dir, SidOutput(trie, rows.ids, assignment.entity_types(), summary),
                         {**to_dict(config), "data": data})
    return summary


def build_command(args: argparse.Namespace) -> int:
    summary = build_sids(load_config(SidsBuildConfig, args.config, args.overrides))
    print(json.dumps(summary))
    return 0


def run(args: argparse.Namespace) -> int:
    return args.sids_run(args)
