"""Write a `Dataset` as the JSONL files `loaders.load_dataset` reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from neo_jax.data.schema import FEEDBACK_NAMES, Catalog, Dataset, Queries


def _write_jsonl(path: Path, records) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_dataset(dataset: Dataset, directory: str | Path) -> None:
    """Write `items.jsonl`, `interactions.jsonl`, `queries.jsonl` (if any) and
    `embeddings.npy` + `embedding_ids.txt` (if the catalog has embeddings) into an existing directory."""
    directory = Path(directory)
    catalog, events = dataset.catalog, dataset.interactions
    _write_jsonl(directory / "items.jsonl", (
        {"item_id": item_id, "entity_type": catalog.type_name(row),
         **{field: values[row] for field, values in catalog.texts.items() if values[row]}}
        for row, item_id in enumerate(catalog.item_ids)))
    if catalog.embeddings is not None:
        np.save(directory / "embeddings.npy", catalog.embeddings)
        (directory / "embedding_ids.txt").write_text("".join(f"{i}\n" for i in catalog.item_ids), encoding="utf-8")

    def event(n: int) -> dict:
        record = {"user_id": events.user_ids[events.users[n]], "item_id": catalog.item_ids[events.items[n]],
                  "timestamp": int(events.timestamps[n])}
        if events.ratings is not None and not np.isnan(events.ratings[n]):
            record["rating"] = float(events.ratings[n])
        if events.feedback is not None:
            record["feedback"] = FEEDBACK_NAMES[int(events.feedback[n])]
        return record

    _write_jsonl(directory / "interactions.jsonl", (event(n) for n in range(len(events))))
    if dataset.queries is not None:
        write_queries(directory / "queries.jsonl", dataset.queries, catalog)


def write_queries(path: str | Path, queries: Queries, catalog: Catalog) -> None:
    _write_jsonl(Path(path), ({"query": text, "item_ids": [catalog.item_ids[r] for r in rows]}
                              for text, rows in zip(queries.texts, queries.relevant)))
