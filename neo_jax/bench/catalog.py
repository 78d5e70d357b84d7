"""`neo-jax bench catalog`: a catalog of millions of items through the real commands, on one machine.

    neo-jax bench catalog --items 10000000 --types 4 [--users 10000] [--workers 2] [--out DIR]

First a synthetic catalog is written to `OUT/data` (phase `data`, in this process, a chunk of rows at
a time): `--items` items split evenly over `--types` entity types; float16 embeddings
(`embeddings.npy` with `embedding_ids.txt`, in catalog order) with a hierarchy of clusters in a
narrow latent space (each type's items in topics of `--topic-size`, 256 topics to a group), and `--duplicate-share` of the items exact copies of
their neighbour (as items with the same text are); and `--users` users whose histories (5 to 40
items) walk through neighbouring topics of one type. Then each step
runs as its own `neo-jax` process, so each has its own peak resident memory (from the kernel when the
process ends):
- `sids`: `neo-jax sids build` from the embeddings (memory-mapped, never whole in memory): mini-batch
  residual k-means (on one device), 3 levels of 256 codes, the last type
  `--last-type-codebook-size` codes a level (NEO's layout has one type of 1024), collisions by the
  capped extra level;
- `tasks`: `neo-jax data tasks` window examples (`--window` items) of the users;
- `tokenizer`: `neo-jax tokenizer build --train` (a sentencepiece model of the examples' text);
- `records`: `neo-jax data records --workers W` (packed records, fitted to `--max-length`);
- `decode`: `neo-jax bench decode --sids` (the tiny preset, every type asked in turn).
Prints one JSON object: for each phase its wall seconds, peak RSS and the bytes it wrote, then the
figures of the steps themselves (collision rates and levels per type, the trie's bytes, examples and
tokens written, the decode step's overhead ratio, invalid and wrong-type items).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from neo_jax.errors import UserError
from neo_jax.progress import Progress

CHUNK_ROWS = 1 << 20  # rows of the catalog written at a time
TOPICS_PER_GROUP = 256  # the embeddings' cluster hierarchy: topics of `--topic-size` items, groups of topics
# The width the hierarchy lives in before its projection to `--dim` (real embeddings are far from filling
# their width: in a full 64 wide Gaussian hierarchy 3 levels of 256 codes left 74% of 250k items colliding).
LATENT_DIM = 8
MAX_LENGTH = 257  # the records' length limit: a training seq_len of 256, plus one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=10_000_000, help="catalog items (default 10,000,000)")
    parser.add_argument("--types", type=int, default=4, help="entity types, items split evenly (default 4)")
    parser.add_argument("--last-type-codebook-size", type=int, default=1024,
                        help="codes per level of the last type's SIDs (default 1024; the others 256)")
    parser.add_argument("--dim", type=int, default=64, help="embedding width (default 64)")
    parser.add_argument("--topic-size", type=int, default=40, help="items per topic (default 40)")
    parser.add_argument("--duplicate-share", type=float, default=0.01,
                        help="share of items that copy their neighbour's embedding (default 0.01)")
    parser.add_argument("--kmeans-steps", type=int, default=300,
                        help="mini-batches per SID level and type (`sids.quantiser.minibatch.steps`, default 300)")
    parser.add_argument("--users", type=int, default=10_000, help="users with histories (default 10,000)")
    parser.add_argument("--window", type=int, default=20, help="items per window example (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="`data records --workers` (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="`bench decode --repeats` (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="`bench decode --batch` (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the catalog, the users and the SIDs")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default runs/bench_catalog/ITEMS)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _check(args: argparse.Namespace) -> None:
    if min(args.items, args.types, args.dim, args.topic_size, args.kmeans_steps, args.users, args.window,
           args.repeats, args.batch) < 1 or args.workers < 0:
        raise UserError("--items, --types, --dim, --topic-size, --kmeans-steps, --users, --window, --repeats and "
                        "--batch must be positive, --workers 0 or more")
    if args.items // args.types < 2 * args.topic_size:
        raise UserError(f"{args.items} items over {args.types} types leave fewer than two topics of "
                        f"{args.topic_size} items a type; lower --topic-size")
    if not 0 <= args.duplicate_share < 0.5:
        raise UserError(f"--duplicate-share must be in [0, 0.5), got {args.duplicate_share}")


def _type_bounds(n_items: int, n_types: int) -> np.ndarray:
    """`[types + 1]` first catalog row of each type, then `n_items`: the types take contiguous blocks."""
    return np.linspace(0, n_items, n_types + 1).astype(np.int64)


def _centres(args: argparse.Namespace, keys: np.ndarray) -> np.ndarray:
    """`[len(keys), LATENT_DIM]` a seeded random centre for each key, the same wherever it is asked for."""
    return np.stack([np.random.default_rng([args.seed, int(k)]).normal(size=LATENT_DIM) for k in keys])


def _chunk_embeddings(args: argparse.Namespace, bounds: np.ndarray, start: int, stop: int) -> np.ndarray:
    """`[stop - start, dim]` float16 embeddings of catalog rows `start:stop`: a hierarchy of clusters in
    a `LATENT_DIM`-wide space (each type's items in topics of `--topic-size`, `TOPICS_PER_GROUP` topics
    to a group; an item at its group's centre + half its topic's + a quarter of noise), mapped to `dim`
    by a fixed random projection; a `--duplicate-share` of the rows (never two neighbours) copy the row
    before them."""
    rows = np.arange(start, stop)  # [chunk]
    types = np.searchsorted(bounds, rows, side="right") - 1  # [chunk]
    topics = (rows - bounds[types]) // args.topic_size  # [chunk] topic within the type
    groups = topics // TOPICS_PER_GROUP  # [chunk]
    latent = np.zeros((rows.size, LATENT_DIM))  # [chunk, latent]
    for keys, scale in ((types * (1 << 40) + groups, 1.0), (types * (1 << 40) + (1 << 39) + topics, 0.5)):
        unique, inverse = np.unique(keys, return_inverse=True)
        latent += scale * _centres(args, unique)[inverse]
    rng = np.random.default_rng([args.seed, start])
    latent += 0.25 * rng.normal(size=latent.shape)
    projection = np.random.default_rng([args.seed, 2]).normal(size=(LATENT_DIM, args.dim)) / np.sqrt(LATENT_DIM)
    x = latent @ projection  # [chunk, dim]
    copies = rng.random(rows.size) < args.duplicate_share  # [chunk]
    copies[0] = False
    copies[1:] &= ~copies[:-1]  # a copied row is never itself a copy
    copies &= np.append(False, types[1:] == types[:-1])  # only within a type
    x[copies] = x[np.flatnonzero(copies) - 1]
    return x.astype(np.float16)


def _user_histories(args: argparse.Namespace, bounds: np.ndarray) -> list[np.ndarray]:
    """Each user's items in time order: one type, a walk over neighbouring topics, no repeats."""
    rng = np.random.default_rng([args.seed, 1])
    histories = []
    for user in range(args.users):
        first, end = bounds[user % args.types], bounds[user % args.types + 1]
        topics = (end - first) // args.topic_size
        length = int(min(5 + rng.geometric(1 / 10), 40))
        steps = np.cumsum(rng.integers(-1, 2, length))  # topic moves of -1, 0 or +1
        topic = (rng.integers(topics) + steps) % topics  # [length]
        items = first + topic * args.topic_size + rng.integers(args.topic_size, size=length)
        _, first = np.unique(items, return_index=True)
        histories.append(items[np.sort(first)])  # repeats dropped, first occurrences in order
    return histories


def write_catalog(args: argparse.Namespace, data_dir: Path) -> dict:
    """The synthetic catalog and users as a data directory (`neo_jax.data.loaders`)."""
    data_dir.mkdir(parents=True)
    bounds = _type_bounds(args.items, args.types)
    names = [f"type{t}" for t in range(args.types)]
    embeddings = np.lib.format.open_memmap(data_dir / "embeddings.npy", mode="w+", dtype=np.float16,
                                           shape=(args.items, args.dim))
    progress = Progress(args.items, label="bench catalog: writing items", unit="item")
    with (data_dir / "items.tsv").open("w", encoding="utf-8") as items, \
            (data_dir / "embedding_ids.txt").open("w", encoding="utf-8") as ids:
        items.write("item_id\tentity_type\n")
        for start in range(0, args.items, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, args.items)
            types = np.searchsorted(bounds, np.arange(start, stop), side="right") - 1
            items.write("".join(f"i{row}\t{names[t]}\n" for row, t in zip(range(start, stop), types.tolist())))
            ids.write("".join(f"i{row}\n" for row in range(start, stop)))
            embeddings[start:stop] = _chunk_embeddings(args, bounds, start, stop)
            progress.update(stop, force=stop == args.items)
    progress.close()
    embeddings.flush()
    del embeddings
    histories = _user_histories(args, bounds)
    with (data_dir / "interactions.tsv").open("w", encoding="utf-8") as events:
        events.write("user_id\titem_id\ttimestamp\n")
        for user, items in enumerate(histories):
            events.write("".join(f"u{user}\ti{item}\t{step}\n" for step, item in enumerate(items.tolist())))
    return {"users": len(histories), "events": int(sum(h.size for h in histories))}


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def run_step(name: str, argv: list[str], out: Path) -> tuple[dict, dict | None]:
    """Run `neo-jax ARGV` as its own process: `({seconds, peak_rss_gb, bytes of out}, its printed JSON)`."""
    print(f"bench catalog: {name}: neo-jax {' '.join(argv)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "neo_jax.cli", *argv], stdout=subprocess.PIPE)
    printed = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise UserError(f"bench catalog: step {name!r} failed with exit code {process.returncode} (its message "
                        "is above)")
    text = printed.decode("utf-8").strip()
    try:
        figures = json.loads(text) if text else None
    except json.JSONDecodeError:
        figures = None
    return {"seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3),
            "bytes": _bytes_under(out)}, figures


def run(args: argparse.Namespace) -> int:
    _check(args)
    root = args.out or Path("runs") / "bench_catalog" / str(args.items)
    if root.exists():
        if not args.overwrite:
            raise UserError(f"{root} exists; pass --overwrite to replace it, or --out elsewhere")
        shutil.rmtree(root)
    start = time.perf_counter()
    users = write_catalog(args, root / "data")
    phases = {"data": {"seconds": round(time.perf_counter() - start, 1),
                       "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                       "bytes": _bytes_under(root / "data")}}
    sizes = {f"type{t}": [256, 256, 256] for t in range(args.types - 1)}
    sizes[f"type{args.types - 1}"] = [args.last_type_codebook_size] * 3
    steps = [
        ("sids", ["sids", "build", f"data={root / 'data'}", f"output={root / 'sids'}", "embedding.source=catalog",
                  "sids.quantiser.method=minibatch_kmeans", f"sids.quantiser.minibatch.steps={args.kmeans_steps}",
                  "sids.disambiguation_order=catalog",
                  "sids.type_codebook_sizes=" + json.dumps(sizes).replace('"', ""), f"seed={args.seed}"],
         root / "sids"),
        ("tasks", ["data", "tasks", str(root / "data"), str(root / "sids" / "sids.tsv"), str(root / "tasks"),
                   "--tasks", "recommend", "--window", str(args.window), "--seed", str(args.seed)], root / "tasks"),
        ("tokenizer", ["tokenizer", "build", str(root / "tokenizer"), "--sids", str(root / "sids"),
                       "--train", str(root / "tasks"), "--vocab-size", "512"], root / "tokenizer"),
        ("records", ["data", "records", str(root / "tasks"), str(root / "tokenizer"), str(root / "records"),
                     "--workers", str(args.workers), "--max-length", str(MAX_LENGTH)], root / "records"),
        ("decode", ["bench", "decode", "--sids", str(root / "sids"), "--preset", "tiny", "--no-torch",
                    "--batch", str(args.batch), "--repeats", str(args.repeats), "--host-trie-max-items", "0"],
         root / "none"),
    ]
    figures = {}
    for name, argv, out in steps:
        phases[name], figures[name] = run_step(name, argv, out)
    sids, decode = figures["sids"] or {}, figures["decode"] or {}
    catalog = decode.get("catalogs", [{}])[0]
    result = {
        "benchmark": "catalog", "items": args.items, "types": args.types, "dim": args.dim, **users,
        "out": str(root), "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_gb": max(p["peak_rss_gb"] for p in phases.values()),
        "bytes": _bytes_under(root), "phases": phases,
        "sids": {key: sids.get(key) for key in ("collision_rate_before", "collision_rate_after",
                                                 "max_items_per_leaf_before", "levels", "codebook_sizes", "trie")},
        "records": (figures["records"] or {}).get("splits"),
        "decode": {key: catalog.get(key) for key in ("constrained_ms_per_step", "unconstrained_ms_per_step",
                                                     "overhead_ratio", "invalid_items", "wrong_type_items", "in_stock")}
        | {"devices": decode.get("devices")},
    }
    json.dump(result, sys.stdout)
    print()
    return 0
