"""The directory `neo-jax sids build` writes, and its reader.

    OUT/
      trie/          the SID trie and the codes (`neo_jax.catalog.store`, tensorstore zarr v3)
      sids.tsv       item_id, entity_type, level_0 .. level_{L-1} (blank past a type's depth)
      summary.json   the build's figures, plus `entity_types` [{name, codebook_sizes}] for the vocabulary
      config.json    the resolved configuration
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from neo_jax.catalog.store import load_sid_trie, save_sid_trie
from neo_jax.catalog.table import SidTrie
from neo_jax.errors import UserError
from neo_jax.vocab import EntityType
from neo_jax.json_file import read_json_object

TRIE_DIR = "trie"
SIDS_TSV = "sids.tsv"
SUMMARY = "summary.json"
CONFIG = "config.json"


@dataclasses.dataclass(frozen=True)
class SidOutput:
    trie: SidTrie  # codes and item types by catalog row
    item_ids: list[str]  # by catalog row
    entity_types: tuple[EntityType, ...]  # by type index: the vocabulary's SID blocks
    summary: dict[str, Any]


def sids_tsv(item_ids: Sequence[str], type_names: Sequence[str], item_types: np.ndarray, codes: np.ndarray) -> str:
    header = "\t".join(["item_id", "entity_type", *(f"level_{level}" for level in range(codes.shape[1]))])
    lines = [header]
    for item_id, type_index, row in zip(item_ids, item_types.tolist(), codes.tolist()):
        lines.append("\t".join([item_id, type_names[type_index], *("" if c < 0 else str(c) for c in row)]))
    return "\n".join(lines) + "\n"


def write_sid_output(directory: str | Path, output: SidOutput, config: dict[str, Any]) -> None:
    """Fill `directory` (from `atomic_output_dir`, so a failure leaves nothing behind)."""
    directory = Path(directory)
    save_sid_trie(output.trie, directory / TRIE_DIR)
    type_names = [t.name for t in output.entity_types]
    (directory / SIDS_TSV).write_text(sids_tsv(output.item_ids, type_names, output.trie.item_types,
                                               output.trie.codes), encoding="utf-8")
    summary = {**output.summary, "entity_types": [dataclasses.asdict(t) for t in output.entity_types]}
    (directory / SUMMARY).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    (directory / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def sid_data_dir(directory: str | Path) -> Path | None:
    """The data directory a `sids build` directory was made from (its `config.json`), if it is one."""
    path = Path(directory) / CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8")).get("data")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return Path(data) if isinstance(data, str) and Path(data).is_dir() else None


def load_sid_output(directory: str | Path) -> SidOutput:
    """Read a `sids build` directory; the item ids come from `sids.tsv` (one line per trie item)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory}: not a directory; give the directory `neo-jax sids build` wrote")
    summary_path, tsv_path = directory / SUMMARY, directory / SIDS_TSV
    summary = read_json_object(summary_path, f"is {directory} the output of `neo-jax sids build`?")
    try:
        entity_types = tuple(EntityType(t["name"], tuple(t["codebook_sizes"])) for t in summary["entity_types"])
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{summary_path}: not a valid SID summary ({e!r})") from None
    trie = load_sid_trie(directory / TRIE_DIR)
    try:
        lines = tsv_path.read_text(encoding="utf-8").splitlines()[1:]
    except FileNotFoundError:
        raise UserError(f"{tsv_path}: not found") from None
    item_ids = [line.split("\t", 1)[0] for line in lines]
    if len(item_ids) != trie.n_items:
        raise UserError(f"{tsv_path}: {len(item_ids)} items, but the trie in {directory / TRIE_DIR} has {trie.n_items}")
    return SidOutput(trie, item_ids, entity_types, summary)
