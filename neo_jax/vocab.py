"""The layout of the extended vocabulary: `[text tokens | specials | SID blocks | padding]`.

Text ids are the pre-trained tokenizer's own (`0 .. text_size-1`) and keep their
embedding rows. New special tokens follow, then one block of SID code tokens per
(entity type, level), each of that level's codebook size, then padding rows so the
vocabulary shards evenly. The layout is the single source of truth for token ids:
the model's embedding extension, the tokenizer, the task builders and the decoder's
SID masks all read it. It is saved as JSON beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object

SID_OPEN = "[SID]"
SID_CLOSE = "[/SID]"
PAD = "[PAD]"
DEFAULT_SPECIALS = (SID_OPEN, SID_CLOSE, PAD)

# The text form of one SID code token: `<{type}_{level}_{code}>`, e.g. `<product_0_17>`.
# A whole SID is written `[SID]<product_0_17><product_1_3><product_2_0>[/SID]`.
SID_CODE_PATTERN = re.compile(r"<([^<>\s]+)_(\d+)_(\d+)>")


def sid_code_string(entity_type: str, level: int, code: int) -> str:
    return f"<{entity_type}_{level}_{code}>"


def format_sid(entity_type: str, codes) -> str:
    """The text form of one item's SID, as task examples and decoded outputs write it."""
    inner = "".join(sid_code_string(entity_type, level, int(c)) for level, c in enumerate(codes))
    return f"{SID_OPEN}{inner}{SID_CLOSE}"


@dataclasses.dataclass(frozen=True)
class EntityType:
    """An entity type and the codebook size of each of its SID levels."""

    name: str
    codebook_sizes: tuple[int, ...]

    def __post_init__(self):
        if not self.name or any(c.isspace() for c in self.name):
            raise UserError(f"entity type name {self.name!r} must be non-empty with no spaces")
        if not self.codebook_sizes or any(int(s) < 1 for s in self.codebook_sizes):
            raise UserError(f"entity type {self.name!r}: codebook sizes must be positive, got {self.codebook_sizes}")

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    text_size: int
    entity_types: tuple[EntityType, ...] = ()
    specials: tuple[str, ...] = DEFAULT_SPECIALS
    pad_multiple: int = 128

    def __post_init__(self):
        names = [t.name for t in self.entity_types]
        if len(set(names)) != len(names):
            raise UserError(f"entity type names repeat: {names}")
        if len(set(self.specials)) != len(self.specials):
            raise UserError(f"special tokens repeat: {self.specials}")
        if self.text_size < 1 or self.pad_multiple < 1:
            raise UserError("text_size and pad_multiple must be positive")

    # -- ids -------------------------------------------------------------------------
    @property
    def specials_start(self) -> int:
        return self.text_size

    def special_id(self, name: str) -> int:
        if name not in self.specials:
            raise UserError(f"unknown special token {name!r}; the layout has {list(self.specials)}")
        return self.text_size + self.specials.index(name)

    @property
    def sid_open_id(self) -> int:
        return self.special_id(SID_OPEN)

    @property
    def sid_close_id(self) -> int:
        return self.special_id(SID_CLOSE)

    @property
    def sid_start(self) -> int:
        """First SID code token id."""
        return self.text_size + len(self.specials)

    def type_index(self, name: str) -> int:
        for i, t in enumerate(self.entity_types):
            if t.name == name:
                return i
        raise UserError(f"unknown entity type {name!r}; the catalog has {[t.name for t in self.entity_types]}")

    def block_offsets(self) -> list[list[int]]:
        """`offsets[type][level]`: the id of code 0 of that block."""
        offsets, next_id = [], self.sid_start
        for t in self.entity_types:
            row = []
            for size in t.codebook_sizes:
                row.append(next_id)
                next_id += int(size)
            offsets.append(row)
        return offsets

    def block_offset_table(self) -> np.ndarray:
        """`[num_types, max_levels]` int32 table of block offsets (-1 where a type has fewer levels)."""
        max_levels = max((t.num_levels for t in self.entity_types), default=0)
        table = np.full((len(self.entity_types), max_levels), -1, np.int32)
        for i, row in enumerate(self.block_offsets()):
            table[i, : len(row)] = row
        return table

    def code_level_table(self) -> np.ndarray:
        """`[padded_size]` int32: the SID level of each token id, -1 for text, special and padding ids."""
        table = np.full(self.padded_size, -1, np.int32)
        for t, row in enumerate(self.block_offsets()):
            for level, offset in enumerate(row):
                table[offset:offset + self.entity_types[t].codebook_sizes[level]] = level
        return table

    def sid_token(self, entity_type: str | int, level: int, code: int) -> int:
        t = entity_type if isinstance(entity_type, int) else self.type_index(entity_type)
        sizes = self.entity_types[t].codebook_sizes
        if not 0 <= level < len(sizes) or not 0 <= code < sizes[level]:
            raise UserError(f"SID code {code} at level {level} is outside type {self.entity_types[t].name!r} "
                            f"(codebook sizes {sizes})")
        return self.block_offsets()[t][level] + int(code)

    @property
    def sid_end(self) -> int:
        """One past the last SID code token id."""
        return self.sid_start + sum(int(s) for t in self.entity_types for s in t.codebook_sizes)

    @property
    def size(self) -> int:
        """Number of real tokens (text + specials + SID codes)."""
        return self.sid_end

    @property
    def padded_size(self) -> int:
        """Rows of the embedding and output head: `size` rounded up to `pad_multiple`."""
        return -(-self.size // self.pad_multiple) * self.pad_multiple

    def decode_sid_token(self, token_id: int) -> tuple[int, int, int]:
        """`(type index, level, code)` of a SID code token id."""
        if not self.sid_start <= token_id < self.sid_end:
            raise UserError(f"token {token_id} is not a SID code token")
        for t, row in enumerate(self.block_offsets()):
            for level, offset in enumerate(row):
                if offset <= token_id < offset + self.entity_types[t].codebook_sizes[level]:
                    return t, level, token_id - offset
        raise AssertionError("unreachable: id lies inside the SID range")

    # -- persistence ------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict) -> "VocabLayout":
        return cls(
            text_size=int(d["text_size"]),
            entity_types=tuple(EntityType(t["name"], tuple(int(s) for s in t["codebook_sizes"]))
                               for t in d.get("entity_types", ())),
            specials=tuple(d.get("specials", DEFAULT_SPECIALS)),
            pad_multiple=int(d.get("pad_multiple", 128)),
        )

    @classmethod
    def load(cls, path: str | Path) -> "VocabLayout":
        values = read_json_object(path)
        try:
            return cls.from_dict(values)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}: not a valid vocabulary layout ({e})") from None
