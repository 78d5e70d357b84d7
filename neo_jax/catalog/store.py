"""Save and load a `SidTrie` (its arrays and the SID codes) with tensorstore.

Layout of a trie directory:
    trie.json          levels_per_type, max_children, and each array's dtype and shape
    <array name>/      one zarr v3 array per `SidTrie` array field (zstd-compressed chunks)
Callers that need an all-or-nothing write wrap the directory in `atomic_output_dir`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorstore as ts

from neo_jax.catalog.table import SidTrie
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object

META_FILE = "trie.json"
FORMAT_VERSION = 1
_CHUNK_ROWS = 1 << 20  # rows per zarr chunk (4 MiB of int32 for a 1-D array)
_CODEC = ts.CodecSpec({"driver": "zarr3", "codecs": [{"name": "bytes"},
                                                      {"name": "zstd", "configuration": {"level": 3}}]})


def _array_spec(path: Path) -> dict:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def save_sid_trie(trie: SidTrie, directory: str | Path) -> None:
    """Write every array of `trie` and its metadata into `directory` (created if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = trie.arrays()
    writes = []
    for name, array in arrays.items():
        chunk = [min(_CHUNK_ROWS, max(1, array.shape[0])), *array.shape[1:]]
        store = ts.open(_array_spec(directory / name), create=True, delete_existing=True,
                        dtype=ts.dtype(array.dtype.name), shape=array.shape,
                        chunk_layout=ts.ChunkLayout(chunk_shape=chunk), codec=_CODEC).result()
        writes.append(store.write(array))
    for write in writes:
        write.result()
    meta = {
        "format_version": FORMAT_VERSION,
        "levels_per_type": list(trie.levels_per_type),
        "max_children": trie.max_children,
        "arrays": {name: {"dtype": a.dtype.name, "shape": list(a.shape)} for name, a in arrays.items()},
    }
    (directory / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")


def load_sid_trie(directory: str | Path) -> SidTrie:
    """Read a trie written by `save_sid_trie`; a missing or inconsistent file is a `UserError`."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    meta = read_json_object(meta_path, f"is {directory} a SID trie directory (`neo-jax sids build`)?")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path}: format version {meta.get('format_version')!r}; "
                        f"this neo_jax reads version {FORMAT_VERSION}")
    arrays = {}
    for name, expected in meta["arrays"].items():
        try:
            store = ts.open(_array_spec(directory / name), open=True).result()
        except ValueError as e:
            raise UserError(f"{directory / name}: cannot open trie array {name!r} ({e})") from None
        if store.dtype.numpy_dtype.name != expected["dtype"] or list(store.shape) != expected["shape"]:
            raise UserError(f"{directory / name}: array {name!r} is {store.dtype.numpy_dtype.name}{list(store.shape)}, "
                            f"{META_FILE} says {expected['dtype']}{expected['shape']}")
        arrays[name] = store.read().result()
    expected_fields = set(SidTrie.__dataclass_fields__) - {"levels_per_type", "max_children"}
    if set(arrays) != expected_fields:
        raise UserError(f"{meta_path}: lists arrays {sorted(arrays)}, expected {sorted(expected_fields)}")
    return SidTrie(levels_per_type=tuple(int(d) for d in meta["levels_per_type"]),
                   max_children=int(meta["max_children"]), **{k: np.asarray(v) for k, v in arrays.items()})
