"""`neo-jax bench decode`: the cost of the on-device SID constraint in jitted beam search.

For each catalog size (synthetic SIDs, default 10k, 1M and 10M items of 4 levels of 256 codes, of
one entity type, or split evenly over `--types` types, each prompt asking for one of them in turn;
`--last-type-codebook-size 1024` gives the last type wider codebooks, as NEO's layout has) one
random decoder runs the same beam search loop three ways on the same prefilled prompts, in ID mode
(`[SID]`, one item's codes, `[/SID]`, EOS). `--sids DIR` times a real catalog instead, the one a
`neo-jax sids build` wrote to DIR (its entity types, each asked in turn, and its levels):
- `constrained`: `SidConstraint`, the trie as device bitmaps (one row per beam a step);
- `unconstrained`: `Unconstrained`, the no-op constraint in the same loop;
- `host_trie`: `HostTrieConstraint`, a Python dict trie consulted on the host every step
  through `jax.pure_callback`, as `prefix_allowed_tokens_fn` users do (skipped above
  `--host-trie-max-items`: building the dict takes minutes and gigabytes);
- `in_stock`: `SidConstraint` with an allowed-items subset (`--in-stock-share` of the items, seeded),
  its device side built by the first request set-up and taken from the `ItemSubsets` cache by
  every later one: `setup_first_call_ms` and `setup_cached_call_ms` (median) time `sid_requests`
  itself, against `setup_without_subset_ms` for the same requests with no subset, so the difference
  is what a cached subset costs each call; `out_of_stock_items` must be 0.
Time per step is a run's wall time over the loop iterations it ran (after a compiling warm-up;
the prefill is not timed). The variants take turns, one run each per round, for `--repeats`
rounds, so a shared machine's slow spells hit them alike: `*_ms_per_step` is the median over
rounds, `overhead_ratio` and `speedup_vs_host_trie` are medians of the per-round ratios (runs
seconds apart), and `*_overhead_ms_per_step` is the difference of the medians: the
constraint's own cost in the loop.
`invalid_items` counts decoded SIDs of the constrained run that name no catalog item, and
`wrong_type_items` those naming an item of another type than the prompt asked for (both must be 0).

At the smallest size, unless `--no-torch`, the same weights are exported as a Hugging Face
model and decoded by transformers `generate(num_beams, prefix_allowed_tokens_fn)` with the
host trie; `hf_topk_agreement` is the share of prompts whose top-K item sets match ours.
The text vocabulary is sized so the layout has no padding rows, which transformers could
not mask. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import jax
import numpy as np
from flax import nnx

from neo_jax.bench.host_trie import HostTrie, HostTrieConstraint
from neo_jax.bench.model import PRESETS, random_weights, usable_cores
from neo_jax.bench.trie import synthetic_codes
from neo_jax.catalog.sid_output import load_sid_output
from neo_jax.catalog.table import SidTrie, build_trie
from neo_jax.checkpoint import abstract_decoder, save_model
from neo_jax.decode.beam_search import beam_search
from neo_jax.decode.constraint import (Constraint, ItemSubsets, SidConstraint, SidRequests, Unconstrained,
                                       sid_requests)
from neo_jax.decode.generate import decoder_step, pack_prompts, prefill, split_sids
from neo_jax.decode.sid_tables import SidTables
from neo_jax.decode.state import DecodeResult
from neo_jax.errors import UserError
from neo_jax.model import Decoder
from neo_jax.sharding import add_mesh_arguments, load_sharded, mesh_from_arguments
from neo_jax.vocab import DEFAULT_SPECIALS, EntityType, VocabLayout

EOS_ID = 0  # a text token of the random model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", default="10000,1000000,10000000",
                        help="comma-separated catalog sizes (default 10000,1000000,10000000)")
    parser.add_argument("--sids", type=Path, default=None,
                        help="a `neo-jax sids build` directory: time its catalog (its entity types and SID "
                             "levels) instead of synthetic ones; --items, --levels, --codebook-size, --types "
                             "and --last-type-codebook-size are then not used")
    parser.add_argument("--levels", type=int, default=4, help="SID levels (default 4)")
    parser.add_argument("--codebook-size", type=int, default=256, help="codes per level (default 256)")
    parser.add_argument("--types", type=int, default=1,
                        help="entity types the items are split among evenly; prompt b asks for type b mod TYPES "
                             "(default 1: every prompt may name any item)")
    parser.add_argument("--last-type-codebook-size", type=int, default=0,
                        help="codes per level of the last type (default 0: --codebook-size)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="decoder shape, random weights (default small)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per batch (default 4)")
    parser.add_argument("--beams", type=int, default=8, help="beam size (default 8)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per random prompt (default 32)")
    parser.add_argument("--repeats", type=int, default=15,
                        help="timed rounds, one run of each variant per round; medians count (default 15)")
    parser.add_argument("--host-trie-max-items", type=int, default=1_000_000,
                        help="largest catalog for the host-side trie baseline (default 1000000)")
    parser.add_argument("--in-stock-share", type=float, default=0.5,
                        help="share of the items a seeded random in-stock subset keeps, timed as the `in_stock` "
                             "variant (default 0.5; 0: no in-stock variant)")
    parser.add_argument("--no-torch", action="store_true",
                        help="skip the transformers generate(prefix_allowed_tokens_fn) comparison")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and SIDs")
    add_mesh_arguments(parser)


def type_codebook_sizes(args: argparse.Namespace) -> list[int]:
    """Codes per level of each entity type."""
    return [args.codebook_size] * (args.types - 1) + [args.last_type_codebook_size or args.codebook_size]


def bench_layout(text_vocab: int, levels: int, codebook_sizes: list[int]) -> VocabLayout:
    """Entity types `item` (one) or `type0`, `type1`, ...; text ids fill the preset's vocabulary minus
    the specials."""
    names = ["item"] if len(codebook_sizes) == 1 else [f"type{t}" for t in range(len(codebook_sizes))]
    return VocabLayout(text_size=text_vocab - len(DEFAULT_SPECIALS), pad_multiple=1,
                       entity_types=tuple(EntityType(n, (size,) * levels) for n, size in zip(names, codebook_sizes)))


def synthetic_catalog(n_items: int, levels: int, codebook_sizes: list[int], seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """`(codes [n_items, levels], types [n_items])`: the items split evenly over the types, distinct
    SIDs within each."""
    counts = np.diff(np.linspace(0, n_items, len(codebook_sizes) + 1).astype(np.int64))  # [types]
    codes = np.concatenate([synthetic_codes(int(count), levels, size, seed + t)
                            for t, (count, size) in enumerate(zip(counts, codebook_sizes))])
    return codes, np.repeat(np.arange(len(counts), dtype=np.int32), counts)


def bench_model(args: argparse.Namespace, layout: VocabLayout, mesh, levels: int) -> Decoder:
    """A random decoder over `layout`, long enough for a prompt and an ID-mode answer of `levels` codes."""
    config = dataclasses.replace(PRESETS[args.preset], vocab_size=layout.padded_size, initializer_range=0.2,
                                 eos_token_id=EOS_ID, max_position_embeddings=args.prompt_len + levels + 3)
    return load_sharded(abstract_decoder(config), random_weights(config, args.seed), mesh,
                        allow_replicated=args.mesh_allow_replicated)


prefill_cache = nnx.jit(prefill, static_argnames="max_new_tokens")


@nnx.jit(static_argnames=("beams", "max_new_tokens", "eos_id"))
def search(model: Decoder, cache, last, lengths, constraint: Constraint, beams: int, max_new_tokens: int,
           eos_id: int) -> DecodeResult:
    return beam_search(decoder_step(model), cache, last, lengths, constraint=constraint, beam_size=beams,
                       max_new_tokens=max_new_tokens, eos_id=eos_id)


def interleaved_ms_per_step(runs: dict, repeats: int, label: str) -> tuple[dict, dict]:
    """Wall milliseconds per loop iteration of each run, `repeats` rounds taking turns, after one
    compiling run each: `({name: [ms per round]}, {name: last result})`."""
    results = {name: jax.block_until_ready(run()) for name, run in runs.items()}
    times = {name: [] for name in runs}
    for i in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = jax.block_until_ready(run())
            times[name].append((time.perf_counter() - start) * 1e3 / max(int(results[name].steps), 1))
        print(f"bench decode: {label}: round {i + 1}/{repeats}: "
              + ", ".join(f"{name} {t[-1]:.3f}" for name, t in times.items()) + " ms/step", file=sys.stderr, flush=True)
    return times, results


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(n / d for n, d in zip(numerator, denominator))


def item_rows(result: DecodeResult, layout: VocabLayout, trie: SidTrie) -> tuple[list[list[int | None]], int]:
    """Per prompt, the catalog row of each finished beam's SID (None: no such item); and the count of Nones."""
    rows, invalid = [], 0
    tokens, lengths, finished = np.asarray(result.tokens), np.asarray(result.lengths), np.asarray(result.finished)
    for b in range(tokens.shape[0]):
        found = []
        for k in np.flatnonzero(finished[b]):
            for piece in split_sids(tokens[b, k, : lengths[b, k]].tolist(), layout, trie):
                if not isinstance(piece, tuple):
                    found.append(piece.row)
                    invalid += piece.row is None
        rows.append(found)
    return rows, invalid


def request_setups(args, trie: SidTrie, layout: VocabLayout, tables: SidTables, asked: list
                   ) -> tuple[np.ndarray, Callable[[], SidRequests], Callable[[], SidRequests]]:
    """`(in_stock [n_items] bool over catalog rows, set_up_in_stock, set_up)`: a seeded subset keeping
    `--in-stock-share` of the items, the per-call request set-up that names it (its device side cached
    in one `ItemSubsets`), and the same set-up without a subset."""
    in_stock = np.random.default_rng(args.seed + 1).random(trie.n_items) < args.in_stock_share  # [n_items]
    in_stock.flags.writeable = False  # as `Generator` hands its masks over: digested once
    subsets = ItemSubsets(trie, tables)
    set_up = lambda **subset: lambda: jax.block_until_ready(sid_requests(  # noqa: E731
        trie, layout, tables, entity_types=asked, output_formats=["ids"] * args.batch, beam_size=args.beams,
        **subset))
    return in_stock, set_up(allowed_rows=in_stock, subsets=subsets), set_up()


def setup_ms(set_up: Callable[[], object], repeats: int) -> tuple[float, float]:
    """`(first call, median of the next `repeats` calls)`, wall milliseconds."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        set_up()
        times.append((time.perf_counter() - start) * 1e3)
    return times[0], statistics.median(times[1:])


def bench_catalog(args, model: Decoder, layout: VocabLayout, trie: SidTrie, prompts, mesh) -> dict:
    """Time the variants over `trie`; with several entity types, prompt b asks for type b mod types."""
    start = time.perf_counter()
    n_items, n_types = trie.n_items, len(trie.levels_per_type)
    tables = SidTables.from_trie(trie, layout, mesh)
    names = [t.name for t in layout.entity_types]
    asked = [None] * args.batch if n_types == 1 else [[names[b % n_types]] for b in range(args.batch)]
    requests = sid_requests(trie, layout, tables, entity_types=asked,
                            output_formats=["ids"] * args.batch, beam_size=args.beams)
    constrained = SidConstraint.create(tables, requests, layout, EOS_ID)
    print(f"bench decode: {n_items} items: trie of {trie.num_nodes} nodes on the devices in "
          f"{time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)

    max_new_tokens = max(trie.levels_per_type) + 3
    cache = prefill_cache(model, prompts.tokens, prompts.segment_ids, prompts.positions, max_new_tokens)
    last, lengths = prompts.tokens[:, -1], prompts.lengths

    host_trie = None
    if n_items <= args.host_trie_max_items:
        start = time.perf_counter()
        host_trie = HostTrie(trie, layout, EOS_ID)
        print(f"bench decode: {n_items} items: host dict trie built in {time.perf_counter() - start:.1f}s",
              file=sys.stderr, flush=True)

    def run(constraint: Constraint, eos_id: int = EOS_ID):
        return lambda: search(model, cache, last, lengths, constraint, args.beams, max_new_tokens, eos_id)

    # Every ID-mode beam ends at step `max_new_tokens`; the unconstrained run gets an EOS id no
    # token has, so it also runs exactly `max_new_tokens` steps.
    runs = {"constrained": run(constrained), "unconstrained": run(Unconstrained(layout.size), eos_id=-1)}
    if host_trie is not None:
        runs["host_trie"] = run(HostTrieConstraint(host_trie))
    if args.in_stock_share > 0:
        in_stock, set_up_in_stock, set_up = request_setups(args, trie, layout, tables, asked)
        first_ms, cached_ms = setup_ms(set_up_in_stock, args.repeats)
        plain_ms = setup_ms(set_up, args.repeats)[1]
        runs["in_stock"] = run(SidConstraint.create(tables, set_up_in_stock(), layout, EOS_ID))
    times, results = interleaved_ms_per_step(runs, args.repeats, f"{n_items} items")
    if int(results["constrained"].steps) != int(results["unconstrained"].steps):
        raise AssertionError(f"the runs took {int(results['constrained'].steps)} and "
                             f"{int(results['unconstrained'].steps)} steps; the comparison needs equal counts")
    ms = {name: statistics.median(t) for name, t in times.items()}
    rows, invalid = item_rows(results["constrained"], layout, trie)
    wrong_type = sum(int(trie.item_types[row] != b % n_types) for b, found in enumerate(rows) for row in found
                     if row is not None)
    out = {"items": n_items, "num_nodes": trie.num_nodes, "max_children": trie.max_children,
           "table_bytes": sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tables)),  # one device's copy
           "bitmap_bytes": int(tables.child_bits.nbytes + tables.bits_start.nbytes),
           "steps_per_run": int(results["constrained"].steps),
           "constrained_ms_per_step": round(ms["constrained"], 4),
           "unconstrained_ms_per_step": round(ms["unconstrained"], 4),
           "overhead_ratio": round(median_ratio(times["constrained"], times["unconstrained"]), 4),
           "invalid_items": invalid, "wrong_type_items": wrong_type,
           "constraint_overhead_ms_per_step": round(ms["constrained"] - ms["unconstrained"], 4),
           "items_decoded": sum(len(r) for r in rows), "host_trie_ms_per_step": None, "speedup_vs_host_trie": None,
           "host_trie_overhead_ms_per_step": None}
    if args.in_stock_share > 0:
        stock_rows, stock_invalid = item_rows(results["in_stock"], layout, trie)
        out["in_stock"] = {
            "share": args.in_stock_share, "ms_per_step": round(statistics.median(times["in_stock"]), 4),
            "overhead_ratio": round(median_ratio(times["in_stock"], times["unconstrained"]), 4),
            "setup_first_call_ms": round(first_ms, 3), "setup_cached_call_ms": round(cached_ms, 3),
            "setup_without_subset_ms": round(plain_ms, 3),
            "invalid_items": stock_invalid,
            "out_of_stock_items": sum(int(not in_stock[row]) for found in stock_rows for row in found
                                      if row is not None)}
    if host_trie is not None:
        out.update(host_trie_ms_per_step=round(ms["host_trie"], 4),
                   speedup_vs_host_trie=round(median_ratio(times["host_trie"], times["constrained"]), 2),
                   host_trie_overhead_ms_per_step=round(ms["host_trie"] - ms["unconstrained"], 4))
    return out, host_trie, rows


def hf_comparison(model: Decoder, layout: VocabLayout, trie: SidTrie, host_trie: HostTrie, prompts,
                  our_rows: list[list[int | None]], beams: int, levels: int, mesh,
                  allow_replicated: tuple[str, ...]) -> dict:
    """Decode the same exported weights with transformers beam search and the host trie; compare top-K items."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise UserError(f"the comparison needs torch and transformers ({e}); install them with "
                        "`pip install -e .[test]` or pass --no-torch") from None
    from neo_jax.hf.export_hf import export_checkpoint

    torch.set_num_threads(usable_cores())
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "ckpt", model)
        export_checkpoint(Path(tmp) / "ckpt", Path(tmp) / "hf", mesh, allow_replicated=allow_replicated)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    agree, seconds, steps = 0, 0.0, 0
    for b in range(prompts.tokens.shape[0]):
        prompt = prompts.tokens[b, prompts.tokens.shape[1] - prompts.lengths[b]:]
        start = time.perf_counter()
        with torch.no_grad():
            out = hf_model.generate(
                torch.as_tensor(prompt[None], dtype=torch.long), num_beams=beams, num_return_sequences=beams,
                max_new_tokens=levels + 3, do_sample=False, length_penalty=0.0, early_stopping=True,
                eos_token_id=EOS_ID, pad_token_id=EOS_ID,
                prefix_allowed_tokens_fn=lambda _, ids: host_trie.allowed(ids[len(prompt):].tolist()))
        seconds += time.perf_counter() - start
        steps += out.shape[1] - len(prompt)
        hf_rows = {p.row for seq in out[:, len(prompt):].tolist()
                   for p in split_sids([t for t in seq if t != EOS_ID], layout, trie) if not isinstance(p, tuple)}
        agree += hf_rows == set(our_rows[b])
        print(f"bench decode: transformers: prompt {b + 1}/{prompts.tokens.shape[0]}", file=sys.stderr, flush=True)
    return {"hf_topk_agreement": round(agree / prompts.tokens.shape[0], 4),
            "hf_ms_per_step": round(seconds * 1e3 / max(steps, 1), 4), "hf_prompts": int(prompts.tokens.shape[0]),
            "transformers_version": transformers.__version__}


def _catalogs(args: argparse.Namespace, text_vocab: int) -> tuple[VocabLayout, Iterator[SidTrie], int, int]:
    """`(layout, the tries one at a time, levels at most, items of the smallest type in the smallest
    catalog)`: the `--sids` directory's catalog, or synthetic ones of the `--items` sizes."""
    if args.sids is not None:
        output = load_sid_output(args.sids)
        layout = VocabLayout(text_size=text_vocab - len(DEFAULT_SPECIALS), entity_types=output.entity_types,
                             pad_multiple=128)  # rows that shard over a mesh; never decoded
        smallest_type = int(np.bincount(output.trie.item_types).min())
        return layout, iter([output.trie]), max(output.trie.levels_per_type), smallest_type
    try:
        sizes = sorted(int(s) for s in args.items.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--items must be comma-separated integers, got {args.items!r}") from None
    if not sizes or sizes[0] < 1 or args.types < 1 or args.last_type_codebook_size < 0:
        raise UserError("--items and --types must be positive, --last-type-codebook-size 0 (--codebook-size) or "
                        "positive")
    sizes_per_type = type_codebook_sizes(args)
    layout = bench_layout(text_vocab, args.levels, sizes_per_type)
    tries = (build_trie(*synthetic_catalog(n, args.levels, sizes_per_type, args.seed), (args.levels,) * args.types)
             for n in sizes)
    return layout, tries, args.levels, sizes[0] // args.types


def run(args: argparse.Namespace) -> int:
    if min(args.batch, args.beams, args.repeats, args.prompt_len) < 1:
        raise UserError("--batch, --beams, --repeats and --prompt-len must be positive")
    if not 0 <= args.in_stock_share <= 1:
        raise UserError(f"--in-stock-share must be in [0, 1], got {args.in_stock_share}")
    layout, tries, levels, smallest_type = _catalogs(args, PRESETS[args.preset].vocab_size)
    if args.beams > smallest_type:
        raise UserError(f"--beams {args.beams} is more than the {smallest_type} items of the smallest catalog's "
                        "smallest type")
    mesh = mesh_from_arguments(args)
    model = bench_model(args, layout, mesh, levels)
    rng = np.random.default_rng(args.seed)
    prompt_ids = rng.integers(1, layout.text_size, (args.batch, args.prompt_len)).tolist()
    prompts = pack_prompts(prompt_ids, max_context=model.config.max_position_embeddings,
                           max_new_tokens=levels + 3, vocab_limit=layout.size)

    result = {"benchmark": "decode", "preset": args.preset, "batch": args.batch, "beams": args.beams,
              "sids": None if args.sids is None else str(args.sids), "levels": levels,
              "types": len(layout.entity_types),
              "type_codebook_sizes": {t.name: list(t.codebook_sizes) for t in layout.entity_types},
              "prompt_len": args.prompt_len,
              "vocab_size": layout.size, "devices": len(mesh.devices.flat), "platform": jax.devices()[0].platform,
              "catalogs": []}
    for index, trie in enumerate(tries):
        row, host_trie, our_rows = bench_catalog(args, model, layout, trie, prompts, mesh)
        if not args.no_torch and index == 0:
            row.update(hf_comparison(model, layout, trie, host_trie or HostTrie(trie, layout, EOS_ID), prompts,
                                     our_rows, args.beams, levels, mesh, args.mesh_allow_replicated))
        result["catalogs"].append(row)
    result["max_overhead_ratio"] = max(c["overhead_ratio"] for c in result["catalogs"])
    for variant in ("constrained", "unconstrained"):  # largest / smallest over the sizes: machine noise moves both
        per_step = [c[f"{variant}_ms_per_step"] for c in result["catalogs"]]
        result[f"{variant}_ms_per_step_growth"] = round(max(per_step) / min(per_step), 4)
    result["invalid_items"] = sum(c["invalid_items"] for c in result["catalogs"])
    result["wrong_type_items"] = sum(c["wrong_type_items"] for c in result["catalogs"])
    json.dump(result, sys.stdout)
    print()
    return 0
