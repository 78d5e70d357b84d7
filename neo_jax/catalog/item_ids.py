"""Item identity inputs: the catalog item each `[/SID]` token of a sequence closes.

A model with item-identity rows (`ModelConfig.num_item_ids`) adds a learned vector per catalog
item to the input of every `[/SID]` that closes that item's SID, so the positions after it see
the item itself and not only its codes, which similar items share (SASRec's item embedding,
beside the SID). The vector joins at `[/SID]`, where the whole SID is known, so the input stays
causal. Ids are 0 where no item closes (every other token, a prefix no item has, a stray
`[/SID]`) and 1 + the item's catalog row otherwise.

The table has `table_rows(items)` rows: one per item and row 0, padded to a multiple of 128 so
its rows split over the mesh as the token table's do (`neo_jax.sharding`).

`ItemIds` computes them on the host for whole sequences (training batches, preference groups,
decoding prompts); during decoding, `SidConstraint.item_ids` gives them for the tokens the beams
generate.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from neo_jax.catalog.table import SidTokenIndex, SidTrie
from neo_jax.errors import UserError
from neo_jax.vocab import VocabLayout

ROW_MULTIPLE = 128  # the table's rows are padded to a multiple of this (every power-of-two split up to 128)


def table_rows(num_items: int) -> int:
    """Rows of the item-identity table of a catalog of `num_items` items (`ModelConfig.num_item_ids`)."""
    return -(-(num_items + 1) // ROW_MULTIPLE) * ROW_MULTIPLE


@dataclasses.dataclass(frozen=True)
class ItemIds:
    index: SidTokenIndex
    sid_open: int
    sid_close: int
    max_levels: int  # the longest SID (codes between `[SID]` and `[/SID]`)
    num_items: int

    @classmethod
    def build(cls, trie: SidTrie, layout: VocabLayout) -> "ItemIds":
        return cls(SidTokenIndex.build(trie, layout), layout.sid_open_id, layout.sid_close_id,
                   max(t.num_levels for t in layout.entity_types), trie.n_items)

    def check_model(self, num_item_ids: int, what: str) -> None:
        """A model's identity table must be this catalog's (`table_rows`)."""
        if num_item_ids != table_rows(self.num_items):
            raise UserError(f"{what} has {num_item_ids} item-identity rows but a catalog of {self.num_items} items "
                            f"needs {table_rows(self.num_items)}; use the SIDs it was trained with")

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        """`[..., len]` token ids -> `[..., len]` int32 item ids (0, or 1 + catalog row at a `[/SID]`)."""
        tokens = np.asarray(tokens)
        flat = tokens.reshape(-1, tokens.shape[-1])  # [rows, len]
        position = np.arange(flat.shape[1])  # [len]
        last_open = np.maximum.accumulate(np.where(flat == self.sid_open, position, -1), axis=1)  # [rows, len]
        rows, closes = np.nonzero(flat == self.sid_close)  # [spans] each
        opened = last_open[rows, closes]  # [spans]: the `[SID]` before each `[/SID]`, -1 if none
        lengths = closes - opened - 1  # [spans]
        lengths = np.where((opened >= 0) & (lengths <= self.max_levels), lengths, 0)  # [spans]
        columns = np.minimum(opened[:, None] + 1 + np.arange(self.max_levels), flat.shape[1] - 1)  # [spans, levels]
        catalog_rows = self.index.rows(flat[rows[:, None], columns], lengths)  # [spans]
        ids = np.zeros(flat.shape, np.int32)  # [rows, len]
        ids[rows, closes] = catalog_rows + 1
        return ids.reshape(tokens.shape)
