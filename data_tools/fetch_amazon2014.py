"""Download the Amazon 2014 Beauty and Sports benchmarks into the layout `neo_jax.data.loaders` reads.

    python data_tools/fetch_amazon2014.py OUT_DIR [--datasets beauty,sports]

writes `OUT_DIR/{beauty,sports}/sequences.txt` (`user item item ...`, 1-based ids in time
order) and `items.tsv` (header; `item_id`, `asin`, text columns), the layout described in
`../shared/data/amazon2014/README.md`. Sources (public, pinned to the commits named there):
- sequences: RUCAIBox/CIKM2020-S3Rec `data/Beauty.txt`, `data/Sports_and_Outdoors.txt`;
- item id <-> ASIN: the P5 `datamaps.json` (`item2id`) in WangXFng/RDRec;
- keyword text: agiresearch/IDGenRec `rec_datasets/*/item_generative_indexing_phase_0.txt`;
- Beauty brand and categories: the UCSD metadata `meta_Beauty.json.gz` (J. McAuley), written
  as `brand; category; ...` without the root category. This rebuilds the attribute column
  from its original source rather than from the S3Rec attribute files, so a few items may
  differ from the copy in `../shared`.
Needs network access; everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import sys
import urllib.request
from pathlib import Path

from neo_jax.atomic import atomic_output_dir

S3REC = "https://github.com/RUCAIBox/CIKM2020-S3Rec/raw/2a81540/data/{name}.txt"
P5_DATAMAPS = "https://github.com/WangXFng/RDRec/raw/2200ad9f/data/{name}/datamaps.json"
IDGENREC = "https://github.com/agiresearch/IDGenRec/raw/a297185a/rec_datasets/{name}/item_generative_indexing_phase_0.txt"
UCSD_META = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_{name}.json.gz"

# dataset -> names of its files in each source
DATASETS = {
    "beauty": {"s3rec": "Beauty", "p5": "beauty", "idgenrec": "Beauty", "meta": "Beauty"},
    "sports": {"s3rec": "Sports_and_Outdoors", "p5": "sports", "idgenrec": "Sports", "meta": None},
}
ATTRIBUTES_COLUMN = "attributes(brand+categories, S3Rec core=5)"
KEYWORDS_COLUMN = "idgenrec_keywords"


def download(url: str) -> bytes:
    print(f"downloading {url}", file=sys.stderr, flush=True)
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def keywords_by_asin(text: str) -> dict[str, str]:
    """`ASIN keyword keyword ...` lines -> {asin: keywords}."""
    pairs = (line.split(maxsplit=1) for line in text.splitlines() if line.strip())
    return {p[0]: (p[1] if len(p) > 1 else "") for p in pairs}


def attributes_by_asin(meta_gz: bytes, wanted: set[str]) -> dict[str, str]:
    """Brand and categories (root dropped, first occurrence kept) of the wanted ASINs."""
    attributes = {}
    for line in gzip.decompress(meta_gz).decode("utf-8").splitlines():
        record = ast.literal_eval(line)  # the 2014 metadata is Python dict literals, not JSON
        if record.get("asin") not in wanted:
            continue
        values = [record.get("brand", "")] + [c for path in record.get("categories", []) for c in path[1:]]
        attributes[record["asin"]] = "; ".join(dict.fromkeys(v.strip() for v in values if v and v.strip()))
    return attributes


def tsv_cell(text: str) -> str:
    return " ".join(text.split())


def fetch(name: str, directory: Path) -> None:
    sources = DATASETS[name]
    sequences = download(S3REC.format(name=sources["s3rec"])).decode("utf-8")
    item2id = json.loads(download(P5_DATAMAPS.format(name=sources["p5"])))["item2id"]
    asin_of = {int(item_id): asin for asin, item_id in item2id.items()}
    keywords = keywords_by_asin(download(IDGENREC.format(name=sources["idgenrec"])).decode("utf-8"))
    columns = ["item_id", "asin"]
    attributes = None
    if sources["meta"] is not None:
        attributes = attributes_by_asin(download(UCSD_META.format(name=sources["meta"])), set(item2id))
        columns.append(ATTRIBUTES_COLUMN)
    columns.append(KEYWORDS_COLUMN)
    rows = ["\t".join(columns)]
    for item_id in sorted(asin_of):
        asin = asin_of[item_id]
        cells = [str(item_id), asin]
        if attributes is not None:
            cells.append(tsv_cell(attributes.get(asin, "")))
        cells.append(tsv_cell(keywords.get(asin, "")))
        rows.append("\t".join(cells))
    directory.mkdir()
    (directory / "sequences.txt").write_text(sequences, encoding="utf-8")
    (directory / "items.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    print(f"{name}: {len(asin_of)} items, {len(sequences.splitlines())} users", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="output directory (must not exist)")
    parser.add_argument("--datasets", default="beauty,sports", help="comma-separated: beauty, sports")
    args = parser.parse_args()
    names = [n for n in args.datasets.split(",") if n]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; choose from {list(DATASETS)}")
    with atomic_output_dir(args.out_dir) as tmp:
        for name in names:
            fetch(name, tmp / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
