"""A serving bundle: everything constrained generation needs, in one directory, verified when loaded.

    BUNDLE/
      manifest.json       the format version, the parameters' dtype, the inputs it was exported from,
                          and per file (every other file of the bundle) its sha256 and byte size, and
                          for a parameter its shape and dtype
      model_config.json   `ModelConfig` (architecture, vocabulary rows, compute dtype, ...)
      params/             one file per parameter, named by its path in the model (for example
                          params/layers/0/attn/q_kernel.bin): its values in C order, raw float32 or
                          bfloat16 in the host's (little-endian) byte order
      tokenizer/          a `MixedTokenizer` directory: the text model and vocab_layout.json
      sids/               a `sids build` directory (trie/, sids.tsv, summary.json; config.json is
                          empty, the build's settings stay with its source)
      catalog.jsonl       one line per SID item, in catalog row order: {"id", "type", "title",
                          "fields"}, `fields` the item's non-empty text fields from the data directory

`write_bundle` fills a directory the caller obtains from `neo_jax.atomic.atomic_output_dir`.
`load_bundle` checks, before it uses anything: the format version; every file against the manifest
(present, its size, its sha256, and no file the manifest does not list); every parameter's shape and
dtype against the model in model_config.json; the tokenizer's SID blocks against the trie. Each
refusal is one `UserError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from neo_jax.atomic import atomic_write_text
from neo_jax.catalog.sid_output import SidOutput, load_sid_output, write_sid_output
from neo_jax.checkpoint import MODEL_CONFIG, abstract_decoder
from neo_jax.data.loaders import read_records
from neo_jax.data.schema import Catalog
from neo_jax.decode.generate import Generator, eos_token_id
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object
from neo_jax.model.config import DTYPES, ModelConfig
from neo_jax.model.decoder import Decoder
from neo_jax.sharding import load_sharded
from neo_jax.tokenizer import LAYOUT_FILE, MixedTokenizer
from neo_jax.vocab import VocabLayout

FORMAT = "neo_jax serving bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARAMS = "params"
TOKENIZER = "tokenizer"
SIDS = "sids"
CATALOG = "catalog.jsonl"


def _param_file(path: tuple) -> str:
    """The bundle file of the parameter at `path` in the model's state, e.g. `params/layers/0/attn/q_kernel.bin`."""
    return "/".join([PARAMS, *map(str, path)]) + ".bin"


def write_bundle(directory: str | Path, model: Decoder, tokenizer: MixedTokenizer, sids: SidOutput,
                 catalog: Catalog, dtype: str, source: dict[str, str]) -> dict[str, Any]:
    """Fill `directory` with the bundle of these parts, parameters stored in `dtype`; returns the manifest.

    `source` (the directories exported from) is recorded in the manifest. The parameters are fetched
    from the devices one at a time, so at most one of them is held on the host.
    """
    if dtype not in DTYPES:
        raise UserError(f"parameter dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    directory = Path(directory)
    tensors = _write_params(directory, model, np.dtype(jnp.dtype(dtype)))
    atomic_write_text(directory / MODEL_CONFIG, model.config.to_json())
    tokenizer.save(directory / TOKENIZER)
    write_sid_output(directory / SIDS, sids, config={})
    _write_catalog(directory / CATALOG, sids, catalog)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        files[name] = {"sha256": _sha256(path), "bytes": path.stat().st_size, **tensors.get(name, {})}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "params_dtype": dtype, "source": source,
                "files": files}
    atomic_write_text(directory / MANIFEST, json.dumps(manifest, indent=2))
    return manifest


def _write_params(directory: Path, model: Decoder, dtype: np.dtype) -> dict[str, dict[str, Any]]:
    """Write every parameter of `model` as raw `dtype` values; returns `{file: {"shape", "dtype"}}`."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        host = np.asarray(multihost_utils.process_allgather(variable.get_value(), tiled=True)).astype(dtype)
        name = _param_file(path)
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(np.ascontiguousarray(host).tobytes())
        tensors[name] = {"shape": list(host.shape), "dtype": dtype.name}
    return tensors


def _write_catalog(path: Path, sids: SidOutput, catalog: Catalog) -> None:
    """One JSON line per SID item: its id, type, title and text fields (title null, no fields, for an
    item the data directory does not have)."""
    lines = []
    for item_id, type_index in zip(sids.item_ids, sids.trie.item_types.tolist()):
        row = catalog.row_of.get(item_id)
        fields = {} if row is None else {field: values[row] for field, values in catalog.texts.items() if values[row]}
        lines.append(json.dumps({"id": item_id, "type": sids.entity_types[type_index].name,
                                 "title": None if row is None else catalog.title(row), "fields": fields},
                                ensure_ascii=False))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sid_blocks(layout: VocabLayout, sids: SidOutput, layout_file: Path, sids_dir: Path) -> None:
    """Refuse a vocabulary layout whose SID blocks (entity types, their levels and codebook sizes) are
    not those of the SID catalog: its token ids would name other codes than the trie's."""
    problem = next(_sid_block_mismatches(layout, sids), None)
    if problem is not None:
        raise UserError(f"{layout_file}: the tokenizer's SID blocks do not match the SID catalog {sids_dir}: "
                        f"{problem}")


def _sid_block_mismatches(layout: VocabLayout, sids: SidOutput):
    """What differs between the layout's SID blocks and the catalog's, in words, first difference first."""
    if len(layout.entity_types) != len(sids.entity_types):
        yield f"{len(layout.entity_types)} entity type(s) there, {len(sids.entity_types)} in the trie"
    for ours, theirs, levels in zip(layout.entity_types, sids.entity_types, sids.trie.levels_per_type):
        if ours.name != theirs.name:
            yield f"entity type {ours.name!r} there is {theirs.name!r} in the trie"
        elif ours.num_levels != levels:
            yield f"type {ours.name!r} has {ours.num_levels} level(s) there, {levels} in the trie"
        elif ours.codebook_sizes != theirs.codebook_sizes:
            yield (f"type {ours.name!r} has codebook sizes {list(ours.codebook_sizes)} there, "
                   f"{list(theirs.codebook_sizes)} in the trie")


def load_bundle(directory: str | Path, mesh: Mesh, allow_replicated: Iterable[str] = ()) -> Generator:
    """The bundle at `directory`, verified (see the module docstring), as a `Generator` on `mesh`
    (`allow_replicated`: see `neo_jax.sharding.logical_to_spec`).

    The model holds float32 parameters (a bfloat16 bundle's are widened exactly) and computes in
    its config's dtype.
    """
    directory = Path(directory)
    manifest = _verify_files(directory)
    config = ModelConfig.load(directory / MODEL_CONFIG)
    dtype = _check_params(directory, manifest, config)
    tokenizer = MixedTokenizer.load(directory / TOKENIZER)
    sids = load_sid_output(directory / SIDS)
    check_sid_blocks(tokenizer.layout, sids, directory / TOKENIZER / LAYOUT_FILE, directory / SIDS)
    titles = _read_titles(directory / CATALOG, sids.item_ids)
    model = load_sharded(abstract_decoder(config),
                         lambda path, shape: np.fromfile(directory / _param_file(path), dtype).reshape(shape), mesh,
                         allow_replicated=allow_replicated)
    return Generator(model, tokenizer, sids, eos_token_id(tokenizer, config), titles, mesh)


def _verify_files(directory: Path) -> dict[str, Any]:
    """The bundle's manifest, once its format version is known and every file matches it."""
    if not directory.is_dir():
        raise UserError(f"{directory}: not a directory; give the bundle directory `neo-jax export` wrote")
    path = directory / MANIFEST
    manifest = read_json_object(path, f"is {directory} a bundle written by `neo-jax export`?")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: bundle format version {version!r}; this neo_jax reads version {FORMAT_VERSION}")
    if manifest.get("params_dtype") not in DTYPES:
        raise UserError(f"{path}: params_dtype {manifest.get('params_dtype')!r} is not one of {', '.join(DTYPES)}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise UserError(f"{path}: no 'files' object listing the bundle's files")
    for name, entry in files.items():
        _verify_file(directory, name, entry)
    unlisted = sorted({p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
                      - set(files) - {MANIFEST})
    if unlisted:
        raise UserError(f"{directory / unlisted[0]}: not listed in {MANIFEST} ({len(unlisted)} unlisted file(s))")
    return manifest


def _verify_file(directory: Path, name: str, entry: Any) -> None:
    """Refuse a listed file that is missing, or whose size or sha256 is not the manifest's."""
    if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("bytes"), int) or Path(name).is_absolute() or ".." in Path(name).parts):
        raise UserError(f"{directory / MANIFEST}: entry {name!r} is not a bundle file with 'sha256' and 'bytes'")
    path = directory / name
    if not path.is_file():
        raise UserError(f"{path}: missing from the bundle ({MANIFEST} lists it)")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UserError(f"{path}: {size} bytes, {MANIFEST} lists {entry['bytes']} (truncated or changed)")
    if _sha256(path) != entry["sha256"]:
        raise UserError(f"{path}: its sha256 is not the one {MANIFEST} lists (the file changed)")


def _check_params(directory: Path, manifest: dict[str, Any], config: ModelConfig) -> np.dtype:
    """Refuse parameter files whose names, shapes or dtypes are not those of `config`'s model;
    returns the dtype they are stored in."""
    files, dtype = manifest["files"], manifest["params_dtype"]
    itemsize = np.dtype(jnp.dtype(dtype)).itemsize
    extra = {name for name, entry in files.items() if "shape" in entry or "dtype" in entry}
    for path, variable in nnx.to_flat_state(nnx.state(abstract_decoder(config), nnx.Param)):
        name = _param_file(path)
        shape, where = list(variable.get_value().shape), directory / name
        entry = files.get(name)
        if name not in extra:
            raise UserError(f"{where}: {MANIFEST} lists no such parameter, which the model in {MODEL_CONFIG} has")
        extra.discard(name)
        if entry.get("dtype") != dtype:
            raise UserError(f"{where}: dtype {entry.get('dtype')!r} in {MANIFEST}, not the bundle's "
                            f"parameter dtype {dtype!r}")
        if entry.get("shape") != shape:
            raise UserError(f"{where}: shape {entry.get('shape')} in {MANIFEST}, but the model in {MODEL_CONFIG} "
                            f"has {shape}")
        if entry["bytes"] != math.prod(shape) * itemsize:
            raise UserError(f"{where}: {entry['bytes']} bytes, not those of a {dtype} array of shape {shape}")
    if extra:
        first = sorted(extra)[0]
        raise UserError(f"{directory / first}: a parameter the model in {MODEL_CONFIG} does not have "
                        f"({len(extra)} extra)")
    return np.dtype(jnp.dtype(dtype))


def _read_titles(path: Path, item_ids: list[str]) -> dict[str, str | None]:
    """`{item id: title}` from `catalog.jsonl`, which must list the SID catalog's items in its order."""
    records = [record for _, record in read_records(path)]
    if [record.get("id") for record in records] != list(item_ids):
        raise UserError(f"{path}: its {len(records)} items are not the {len(item_ids)} items of the SID "
                        "catalog, in its order")
    return {record["id"]: record.get("title") for record in records}
