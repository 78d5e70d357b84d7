"""`neo-jax bench trie`: build the SID trie of a synthetic catalog; time, bytes and peak memory.

The catalog has N items of one entity type with distinct SIDs drawn uniformly from
`codebook_size ** levels` codes (default 10M items, 4 levels of 256, NEO's shape).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from neo_jax.catalog.store import save_sid_trie
from neo_jax.catalog.table import build_trie
from neo_jax.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=10_000_000, help="catalog size (default 10M)")
    parser.add_argument("--levels", type=int, default=4, help="SID levels (default 4)")
    parser.add_argument("--codebook-size", type=int, default=256, help="codes per level (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic SIDs")
    parser.add_argument("--save", action="store_true", help="also time writing the trie with tensorstore")


def synthetic_codes(n_items: int, levels: int, codebook_size: int, seed: int) -> np.ndarray:
    """`[n_items, levels]` int32 distinct SIDs, uniform over the code space, in random item order."""
    space = codebook_size ** levels
    if n_items > space:
        raise UserError(f"{n_items} items cannot have distinct SIDs in {levels} levels of {codebook_size} codes")
    rng = np.random.default_rng(seed)
    flat = np.empty(0, np.int64)
    while flat.size < n_items:  # draw, drop repeats, top up the few lost to them
        flat = np.sort(np.concatenate([flat, rng.integers(0, space, size=n_items - flat.size, dtype=np.int64)]))
        flat = flat[np.append(True, flat[1:] != flat[:-1])]  # [<= n_items] distinct, sorted
    rng.shuffle(flat)  # [n_items] random item order
    codes = np.empty((n_items, levels), np.int32)  # [n_items, levels]
    for level in reversed(range(levels)):
        codes[:, level] = flat % codebook_size
        flat //= codebook_size
    return codes


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run(args: argparse.Namespace) -> int:
    if args.items < 1 or args.levels < 1 or args.codebook_size < 1:
        raise UserError("--items, --levels and --codebook-size must be positive")
    codes = synthetic_codes(args.items, args.levels, args.codebook_size, args.seed)
    item_types = np.zeros(args.items, np.int32)
    rss_inputs = _peak_rss_bytes()
    start = time.perf_counter()
    trie = build_trie(codes, item_types, (args.levels,))
    build_seconds = time.perf_counter() - start
    node_bytes = sum(a.nbytes for name, a in trie.arrays().items() if name not in ("codes", "item_types", "item_order"))
    result = {
        "benchmark": "trie",
        "items": args.items,
        "levels": args.levels,
        "codebook_size": args.codebook_size,
        "num_nodes": trie.num_nodes,
        "max_children": trie.max_children,
        "build_seconds": round(build_seconds, 3),
        "bytes_total": trie.nbytes,
        "bytes_nodes": node_bytes,
        "bytes_per_node": round(node_bytes / trie.num_nodes, 2),
        "bytes_items": trie.nbytes - node_bytes,
        "peak_rss_bytes_before_build": rss_inputs,
        "peak_rss_bytes": _peak_rss_bytes(),
    }
    if args.save:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            save_sid_trie(trie, Path(tmp) / "trie")
            result["save_seconds"] = round(time.perf_counter() - start, 3)
            result["saved_bytes_on_disk"] = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
        result["peak_rss_bytes"] = _peak_rss_bytes()
    json.dump(result, sys.stdout)
    print()
    return 0
