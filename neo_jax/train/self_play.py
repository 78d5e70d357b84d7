"""Self-play negatives for preference alignment: the model's own beams, binned by difficulty.

Align3GR's progressive softmax-DPO trains on rejected completions the model itself ranks high,
easy to hard. A recommendation prompt is ranked by constrained beam search
(`Generator.rank_items`: every beam a real catalog item of the asked type); the target is dropped
and each other beam becomes a rejected item, binned by how many leading SID codes it shares with
the target:

    bin 0 (easy):   no shared code              bin 1 (medium): the first code only
    bin 2 (hard):   two codes or more

    rows = generator.rank_items(prompts, settings, excluded_ids=...)   # [prompt, beam]
    negatives = bin_negatives(rows, targets, trie.codes)                # [prompt, bin, beam]
"""

from __future__ import annotations

import numpy as np

from neo_jax.errors import UserError

DIFFICULTY_BINS = ("easy", "medium", "hard")  # shared SID prefix length 0, 1, >= 2


def shared_prefix_lengths(codes: np.ndarray, rows: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """`[prompt, beam]` how many leading SID codes each of `rows` shares with its prompt's target.

    `codes` `[items, levels]` (-1 past an item's depth, so items of different depths never share
    a padded level), `rows` `[prompt, beam]` catalog rows (>= 0), `targets` `[prompt]`."""
    equal = codes[rows] == codes[targets][:, None, :]  # [prompt, beam, levels]
    equal &= codes[rows] >= 0
    return np.cumprod(equal, axis=2).sum(axis=2)  # leading run of equal codes


def bin_negatives(rows: np.ndarray, targets: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """`[prompt, bin, beam]` rejected catalog rows per difficulty bin (`DIFFICULTY_BINS`), in beam
    order and left-aligned, -1 where a bin has fewer.

    `rows` `[prompt, beam]` ranked catalog rows (-1: a filler beam, dropped), `targets` `[prompt]`
    each prompt's chosen item (dropped from its beams), `codes` `[items, levels]` the SID codes by
    catalog row (`SidTrie.codes`)."""
    rows, targets = np.asarray(rows, np.int64), np.asarray(targets, np.int64)
    if rows.ndim != 2 or targets.shape != rows.shape[:1]:
        raise UserError(f"beam rows must be [prompt, beam] and targets [prompt]; got {rows.shape} and {targets.shape}")
    if (targets < 0).any() or (targets >= len(codes)).any() or (rows >= len(codes)).any():
        raise UserError(f"rows and targets must be catalog rows below {len(codes)}")
    kept = (rows >= 0) & (rows != targets[:, None])  # [prompt, beam]
    bins = np.minimum(shared_prefix_lengths(codes, np.maximum(rows, 0), targets), len(DIFFICULTY_BINS) - 1)
    binned = np.full((rows.shape[0], len(DIFFICULTY_BINS), rows.shape[1]), -1, np.int64)  # [prompt, bin, beam]
    for b in range(len(DIFFICULTY_BINS)):
        in_bin = kept & (bins == b)  # [prompt, beam]
        order = np.argsort(~in_bin, axis=1, kind="stable")  # the bin's beams first, in beam order
        binned[:, b] = np.where(np.take_along_axis(in_bin, order, axis=1), np.take_along_axis(rows, order, axis=1), -1)
    return binned
