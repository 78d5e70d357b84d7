"""Read a dataset from a user's files: JSONL or TSV, or the Amazon 2014 benchmark layout.

A data directory holds
- `items.jsonl` or `items.tsv`: `item_id`, optional `entity_type` (one type,
  `item`, when absent), any text columns (title, brand, categories, description...),
  optional `embedding` (a JSON list of numbers);
- optionally `embeddings.npy` `[n, dim]` with `embedding_ids.txt` (one item id a line,
  in the rows' order) instead of an inline `embedding` column (memory-mapped, see `load_embeddings`);
- `interactions.jsonl` or `interactions.tsv`: `user_id`, `item_id`, `timestamp`
  (a number or an ISO 8601 date), optional `rating` and `feedback` (`positive`/`neutral`/`negative`);
- optionally `queries.jsonl` or `queries.tsv`: `query` and `item_ids` (a JSON list in
  JSONL, space-separated ids in TSV).
A directory with `sequences.txt` is read as the Amazon 2014 layout instead (see
`load_amazon2014`). Every problem is a `UserError` naming the file, the line and what is wrong.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from neo_jax.data.schema import NEGATIVE, NEUTRAL, POSITIVE, Catalog, Dataset, Interactions, Queries
from neo_jax.errors import UserError

DEFAULT_ENTITY_TYPE = "item"
AMAZON_ENTITY_TYPE = "product"
_ITEM_KEYS = ("item_id", "entity_type", "embedding")
_FEEDBACK_VALUES = {"positive": POSITIVE, "pos": POSITIVE, "1": POSITIVE,
                    "neutral": NEUTRAL, "0": NEUTRAL,
                    "negative": NEGATIVE, "neg": NEGATIVE, "-1": NEGATIVE}


# -- reading lines and records ----------------------------------------------------------------

def _read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """`(line number, text)` of each non-blank line, decoded as strict UTF-8 (a leading byte-order
    mark and CRLF line ends are accepted)."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{line_number}: not valid UTF-8 text "
                                f"(byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if line_number == 1:
                text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark, as some editors write
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_number, text


def read_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, record)` of a `.jsonl` file (one object a line) or a `.tsv` file with a header."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        for line_number, text in _read_lines(path):
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_number}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record
    elif path.suffix == ".tsv":
        lines = _read_lines(path)
        header_line = next(lines, None)
        if header_line is None:
            raise UserError(f"{path}: empty file; expected a header row")
        header = header_line[1].split("\t")
        for line_number, text in lines:
            fields = text.split("\t")
            if len(fields) != len(header):
                raise UserError(f"{path}:{line_number}: {len(fields)} tab-separated fields, "
                                f"the header has {len(header)}")
            yield line_number, dict(zip(header, fields))
    else:
        raise UserError(f"{path}: unknown file type {path.suffix!r}; use .jsonl or .tsv")


def _require(path: Path, line_number: int, record: dict, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in record or record[c] is None]
    if missing:
        raise UserError(f"{path}:{line_number}: missing column(s) {missing}")


def _identifier(path: Path, line_number: int, record: dict, column: str) -> str:
    value = str(record[column]).strip()
    if not value or any(c.isspace() for c in value):
        raise UserError(f"{path}:{line_number}: {column} {record[column]!r} must be non-empty with no spaces")
    return value


def _as_text(value: Any) -> str:
    """A field value as one line of text: lists are joined with `, `, whitespace is collapsed."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = ", ".join(_as_text(v) for v in value)
    return " ".join(str(value).split())


def _find(data_dir: Path, stem: str, required: bool = True) -> Path | None:
    candidates = [data_dir / f"{stem}{suffix}" for suffix in (".jsonl", ".tsv")]
    found = [p for p in candidates if p.is_file()]
    if len(found) > 1:
        raise UserError(f"{data_dir}: both {found[0].name} and {found[1].name} exist; keep one")
    if not found and required:
        raise UserError(f"{data_dir}: no {stem}.jsonl or {stem}.tsv")
    return found[0] if found else None


# -- items ----------------------------------------------------------------------------------

def _embedding_row(path: Path, line_number: int, value: Any, dim: int | None) -> np.ndarray:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{line_number}: embedding is not a JSON list of numbers") from None
    try:
        row = np.asarray(value, np.float32)
    except (TypeError, ValueError):
        raise UserError(f"{path}:{line_number}: embedding is not a list of numbers") from None
    if row.ndim != 1 or row.size == 0:
        raise UserError(f"{path}:{line_number}: embedding must be a non-empty flat list of numbers")
    if dim is not None and row.size != dim:
        raise UserError(f"{path}:{line_number}: embedding has width {row.size}, earlier items have {dim}")
    if not np.isfinite(row).all():
        raise UserError(f"{path}:{line_number}: embedding has a NaN or infinite value")
    return row


def load_items(path: str | Path, default_type: str = DEFAULT_ENTITY_TYPE) -> Catalog:
    """The catalog in a JSONL or TSV items file."""
    path = Path(path)
    item_ids: list[str] = []
    type_of: list[str] = []
    fields: dict[str, dict[int, str]] = {}  # field -> row -> text, fields in first-seen order
    embeddings: list[np.ndarray] = []
    first_line_of: dict[str, int] = {}
    for line_number, record in read_records(path):
        _require(path, line_number, record, ("item_id",))
        item_id = _identifier(path, line_number, record, "item_id")
        if item_id in first_line_of:
            raise UserError(f"{path}:{line_number}: duplicate item id {item_id!r} "
                            f"(first on line {first_line_of[item_id]})")
        first_line_of[item_id] = line_number
        row = len(item_ids)
        item_ids.append(item_id)
        entity_type = record.get("entity_type") or default_type
        type_of.append(_identifier(path, line_number, {"entity_type": entity_type}, "entity_type"))
        has_embedding = record.get("embedding") not in (None, "")
        if has_embedding != bool(embeddings) and row > 0:
            raise UserError(f"{path}:{line_number}: item {item_id!r} "
                            f"{'has' if has_embedding else 'has no'} embedding, unlike the items before it")
        if has_embedding:
            dim = embeddings[0].size if embeddings else None
            embeddings.append(_embedding_row(path, line_number, record["embedding"], dim))
        for field, value in record.items():
            if field not in _ITEM_KEYS:
                fields.setdefault(field, {})[row] = _as_text(value)
    if not item_ids:
        raise UserError(f"{path}: no items")
    type_names = tuple(dict.fromkeys(type_of))
    index = {name: i for i, name in enumerate(type_names)}
    return Catalog(
        item_ids=item_ids,
        type_names=type_names,
        item_types=np.array([index[t] for t in type_of], np.int32),
        texts={field: [by_row.get(r, "") for r in range(len(item_ids))] for field, by_row in fields.items()},
        embeddings=np.stack(embeddings) if embeddings else None,
    )


def load_embeddings(npy_path: str | Path, ids_path: str | Path, catalog: Catalog,
                    expected_dim: int | None = None) -> Catalog:
    """The catalog with embeddings from `npy_path` `[n, dim]`, whose row i belongs to line i of `ids_path`.

    The file is memory-mapped. When its rows are already in the catalog's order (as `neo-jax data`
    writes them) the catalog keeps the read-only memory map, in the file's dtype (float16 or float32,
    say), and nothing is read until used: a 10M-row file is never whole in memory. Otherwise the rows
    are copied into catalog order as float32 `[n_items, dim]`."""
    npy_path, ids_path = Path(npy_path), Path(ids_path)
    try:
        matrix = np.load(npy_path, mmap_mode="r", allow_pickle=False)  # [n, dim], nothing read yet
    except FileNotFoundError:
        raise UserError(f"{npy_path}: file not found") from None
    except ValueError as e:
        raise UserError(f"{npy_path}: not a numpy .npy array ({e})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise UserError(f"{npy_path}: expected a 2-D numeric array [items, dim], got shape {matrix.shape}")
    if expected_dim is not None and matrix.shape[1] != expected_dim:
        raise UserError(f"{npy_path}: embeddings have width {matrix.shape[1]}, expected {expected_dim}")
    lines = list(_read_lines(ids_path))
    if len(lines) != matrix.shape[0]:
        raise UserError(f"{ids_path}: {len(lines)} ids for {matrix.shape[0]} rows of {npy_path}")
    rows = np.empty(len(lines), np.int64)  # [n] catalog row of each file row
    for source_row, (line_number, item_id) in enumerate(lines):
        row = catalog.row_of.get(item_id.strip())
        if row is None:
            raise UserError(f"{ids_path}:{line_number}: unknown item id {item_id.strip()!r}")
        rows[source_row] = row
    counts = np.bincount(rows, minlength=len(catalog))  # [n_items]
    if counts.max(initial=0) > 1:
        raise UserError(f"{ids_path}: item id {catalog.item_ids[int(counts.argmax())]!r} is listed "
                        f"{int(counts.max())} times")
    if len(lines) == len(catalog) and np.array_equal(rows, np.arange(len(catalog))):
        return catalog.with_embeddings(matrix)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise UserError(f"{ids_path}: no embedding for {missing.size} item(s), "
                        f"e.g. {catalog.item_ids[missing[0]]!r}")
    embeddings = np.empty((len(catalog), matrix.shape[1]), np.float32)  # [n_items, dim]
    embeddings[rows] = matrix
    return catalog.with_embeddings(embeddings)


# -- interactions ---------------------------------------------------------------------------

def _timestamp(path: Path, line_number: int, value: Any) -> int:
    """Seconds since 1970 (or any increasing count from 0) from a number or an ISO 8601 date."""
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):
            raise UserError(f"{path}:{line_number}: timestamp {value!r} is not finite")
        seconds = int(number)
    else:
        try:
            moment = datetime.datetime.fromisoformat(text)
        except ValueError:
            raise UserError(f"{path}:{line_number}: timestamp {value!r} is neither a number "
                            "nor an ISO 8601 date") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        seconds = int(moment.timestamp())
    if seconds < 0:
        raise UserError(f"{path}:{line_number}: timestamp {value!r} is before 1970; give seconds since "
                        "1970-01-01 or an ISO 8601 date")
    return seconds


def _rating(path: Path, line_number: int, value: Any) -> float:
    if value in (None, ""):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}:{line_number}: rating {value!r} is not a number") from None


def _feedback(path: Path, line_number: int, value: Any) -> int:
    if value in (None, ""):
        return POSITIVE
    key = str(value).strip().lower()
    if key not in _FEEDBACK_VALUES:
        raise UserError(f"{path}:{line_number}: feedback {value!r} is not positive, neutral or negative")
    return _FEEDBACK_VALUES[key]


def load_interactions(path: str | Path, catalog: Catalog) -> Interactions:
    """The events of a JSONL or TSV interactions file; every item must be in `catalog`."""
    path = Path(path)
    user_index: dict[str, int] = {}
    users, items, timestamps, ratings, feedback = [], [], [], [], []
    saw_rating = saw_feedback = False
    for line_number, record in read_records(path):
        _require(path, line_number, record, ("user_id", "item_id", "timestamp"))
        user_id = _identifier(path, line_number, record, "user_id")
        item_id = str(record["item_id"]).strip()
        row = catalog.row_of.get(item_id)
        if row is None:
            raise UserError(f"{path}:{line_number}: unknown item {item_id!r} (not in the items file)")
        users.append(user_index.setdefault(user_id, len(user_index)))
        items.append(row)
        timestamps.append(_timestamp(path, line_number, record["timestamp"]))
        ratings.append(_rating(path, line_number, record.get("rating")))
        feedback.append(_feedback(path, line_number, record.get("feedback")))
        saw_rating |= record.get("rating") not in (None, "")
        saw_feedback |= record.get("feedback") not in (None, "")
    if not users:
        raise UserError(f"{path}: no interactions")
    return Interactions(
        user_ids=list(user_index),
        users=np.array(users, np.int32),
        items=np.array(items, np.int32),
        timestamps=np.array(timestamps, np.int64),
        ratings=np.array(ratings, np.float32) if saw_rating else None,
        feedback=np.array(feedback, np.int8) if saw_feedback else None,
    )


# -- queries --------------------------------------------------------------------------------

def load_queries(path: str | Path, catalog: Catalog) -> Queries:
    """Search queries of a JSONL or TSV file, with the catalog rows relevant to each."""
    path = Path(path)
    texts, relevant = [], []
    for line_number, record in read_records(path):
        _require(path, line_number, record, ("query", "item_ids"))
        query = _as_text(record["query"])
        ids = record["item_ids"]
        ids = ids.split() if isinstance(ids, str) else [str(i) for i in ids]
        if not query:
            raise UserError(f"{path}:{line_number}: empty query text")
        if not ids:
            raise UserError(f"{path}:{line_number}: query {query!r} has no relevant items")
        unknown = [i for i in ids if i not in catalog.row_of]
        if unknown:
            raise UserError(f"{path}:{line_number}: unknown item {unknown[0]!r} (not in the items file)")
        texts.append(query)
        relevant.append(np.array([catalog.row_of[i] for i in ids], np.int32))
    return Queries(texts, relevant)


# -- whole directories ----------------------------------------------------------------------

def _amazon_field_name(column: str) -> str:
    """`attributes(brand+categories, S3Rec core=5)` -> `attributes`; `idgenrec_keywords` -> `keywords`."""
    return column.split("(")[0].strip().removeprefix("idgenrec_")


def load_amazon2014(data_dir: str | Path) -> Dataset:
    """The Amazon 2014 layout: `items.tsv` (header; `item_id`, `asin`, text columns) and
    `sequences.txt` (`user item item ...`, 1-based ids in time order). One entity type, `product`.
    Users are named `u<id>`: the file numbers users and items alike from 1, and a user SID shares
    `sids.tsv` with the items, keyed by id."""
    data_dir = Path(data_dir)
    items_path, sequences_path = data_dir / "items.tsv", data_dir / "sequences.txt"
    catalog = load_items(items_path, default_type=AMAZON_ENTITY_TYPE)
    texts = {_amazon_field_name(field): values for field, values in catalog.texts.items() if field != "asin"}
    catalog = dataclasses.replace(catalog, texts=texts)
    user_ids, users, items, positions = [], [], [], []
    for line_number, text in _read_lines(sequences_path):
        user_id, *sequence = text.split()
        if not sequence:
            raise UserError(f"{sequences_path}:{line_number}: user {user_id!r} has an empty history")
        unknown = [i for i in sequence if i not in catalog.row_of]
        if unknown:
            raise UserError(f"{sequences_path}:{line_number}: unknown item {unknown[0]!r} (not in {items_path.name})")
        users.extend([len(user_ids)] * len(sequence))
        items.extend(catalog.row_of[i] for i in sequence)
        positions.extend(range(len(sequence)))
        user_ids.append(f"u{user_id}")
    if not user_ids:
        raise UserError(f"{sequences_path}: no users")
    interactions = Interactions(user_ids, np.array(users, np.int32), np.array(items, np.int32),
                                np.array(positions, np.int64))
    return Dataset(catalog, interactions)


def load_dataset(data_dir: str | Path) -> Dataset:
    """Every file of a data directory (see the module docstring for the layout)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"{data_dir}: not a directory")
    if (data_dir / "sequences.txt").is_file():
        return load_amazon2014(data_dir)
    catalog = load_items(_find(data_dir, "items"))
    if (data_dir / "embeddings.npy").is_file():
        if catalog.embeddings is not None:
            raise UserError(f"{data_dir}: embeddings.npy and an inline embedding column both exist; keep one")
        catalog = load_embeddings(data_dir / "embeddings.npy", data_dir / "embedding_ids.txt", catalog)
    interactions = load_interactions(_find(data_dir, "interactions"), catalog)
    queries_path = _find(data_dir, "queries", required=False)
    queries = load_queries(queries_path, catalog) if queries_path else None
    return Dataset(catalog, interactions, queries)
