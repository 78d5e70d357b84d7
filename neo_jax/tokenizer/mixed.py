"""Text interleaved with SIDs <-> token ids of the extended vocabulary.

A mixed string such as `Try [SID]<product_0_17><product_1_3>[/SID] next.` is cut at the layout's
special tokens and at SID code tokens in their text form (`neo_jax.vocab.SID_CODE_PATTERN`). Those
map to their layout ids; the text between them goes through the text tokenizer, one piece at a time.
Decoding mirrors that: each run of text ids is decoded on its own, so `decode(encode(s)) == s`
whenever the text tokenizer round-trips each piece (all tokenizers in `neo_jax.tokenizer.text` do).
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Sequence

from neo_jax.atomic import atomic_write_text
from neo_jax.errors import UserError
from neo_jax.tokenizer.text import TextTokenizer, load_text_tokenizer
from neo_jax.vocab import PAD, SID_CODE_PATTERN, VocabLayout, sid_code_string

LAYOUT_FILE = "vocab_layout.json"
SOURCES_FILE = "sources.json"  # {"sids": the `sids build` directory the layout was made from}


def sids_source(directory: str | Path) -> Path | None:
    """The SID directory a tokenizer directory was built from, as `tokenizer build` recorded it."""
    path = Path(directory) / SOURCES_FILE
    if not path.is_file():
        return None
    try:
        sids = json.loads(path.read_text(encoding="utf-8")).get("sids")
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{path}: not a JSON object naming the tokenizer's SID directory") from None
    return None if not isinstance(sids, str) else Path(sids)


class MixedTokenizer:
    """Encodes and decodes text with specials and typed SID code tokens, by one `VocabLayout`."""

    def __init__(self, text: TextTokenizer, layout: VocabLayout):
        if text.vocab_size > layout.text_size:
            raise UserError(f"the text tokenizer has {text.vocab_size} tokens but the vocabulary layout "
                            f"reserves only {layout.text_size} text ids")
        self.text = text
        self.layout = layout
        self._special_ids = {name: layout.special_id(name) for name in layout.specials}
        self._type_index = {t.name: i for i, t in enumerate(layout.entity_types)}
        self._block_offsets = layout.block_offsets()
        # (type index, level, code) of every SID code token, in id order from `layout.sid_start`.
        self._sid_codes = [(t, level, code)
                           for t, entity in enumerate(layout.entity_types)
                           for level, size in enumerate(entity.codebook_sizes)
                           for code in range(size)]
        # The text form of every non-text id, from `layout.specials_start`.
        self._token_strings = list(layout.specials) + [
            sid_code_string(layout.entity_types[t].name, level, code) for t, level, code in self._sid_codes]
        specials = sorted(layout.specials, key=len, reverse=True)  # longest first: no special shadows another
        self._token_pattern = re.compile("|".join([re.escape(s) for s in specials] + [SID_CODE_PATTERN.pattern]))

    @property
    def bos_id(self) -> int | None:
        return self.text.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.text.eos_id

    @property
    def pad_id(self) -> int | None:
        """The layout's `[PAD]` if it has one, else the text tokenizer's pad."""
        return self._special_ids.get(PAD, self.text.pad_id)

    @property
    def non_text_tokens(self) -> list[str]:
        """The text form of every id from `layout.specials_start` up to `layout.size`: specials, then SID codes."""
        return self._token_strings

    # -- encoding -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of a mixed string (no bos/eos added)."""
        ids: list[int] = []
        position = 0
        for match in self._token_pattern.finditer(text):
            if match.start() > position:
                ids.extend(self.text.encode(text[position:match.start()]))
            ids.append(self._token_id(match))
            position = match.end()
        if position < len(text):
            ids.extend(self.text.encode(text[position:]))
        return ids

    def _token_id(self, match: re.Match) -> int:
        token = match.group(0)
        if token in self._special_ids:
            return self._special_ids[token]
        type_name, level, code = match.group(1), int(match.group(2)), int(match.group(3))
        if type_name not in self._type_index:
            raise UserError(f"SID token {token!r}: unknown entity type {type_name!r} "
                            f"(the vocabulary has {sorted(self._type_index)})")
        t = self._type_index[type_name]
        sizes = self.layout.entity_types[t].codebook_sizes
        if level >= len(sizes):
            raise UserError(f"SID token {token!r}: type {type_name!r} has only {len(sizes)} levels")
        if code >= sizes[level]:
            raise UserError(f"SID token {token!r}: code {code} is outside level {level} of type {type_name!r} "
                            f"(codebook size {sizes[level]})")
        return self._block_offsets[t][level] + code

    # -- decoding -------------------------------------------------------------------------
    def decode(self, ids: Sequence[int]) -> str:
        """The mixed string of `ids`; specials and SID codes are written in their text form."""
        pieces = []
        for is_text, run in itertools.groupby((int(i) for i in ids), key=lambda i: i < self.layout.text_size):
            run = list(run)
            if is_text:
                pieces.append(self.text.decode(self._checked_text_ids(run)))
            else:
                pieces.extend(self._token_string(i) for i in run)
        return "".join(pieces)

    def _checked_text_ids(self, run: list[int]) -> list[int]:
        bad = [i for i in run if not 0 <= i < self.text.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is not a text token (the text tokenizer has {self.text.vocab_size})")
        return run

    def _token_string(self, token_id: int) -> str:
        if token_id >= self.layout.size:
            raise UserError(f"token id {token_id} is outside the vocabulary ({self.layout.size} tokens; "
                            "the rest are padding)")
        return self._token_strings[token_id - self.layout.specials_start]

    def extract_sids(self, ids: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
        """`(entity type, codes)` of every complete, well-formed `[SID] ... [/SID]` span in `ids`.

        A span counts if it holds one code token per level of one type, in level order; anything
        else (truncated output, text inside the span, mixed types) is skipped.
        """
        sids = []
        span: list[tuple[int, int, int]] | None = None  # (type, level, code) seen since `[SID]`
        for token_id in (int(i) for i in ids):
            if token_id == self.layout.sid_open_id:
                span = []
            elif token_id == self.layout.sid_close_id:
                if span and self._is_complete(span):
                    sids.append((self.layout.entity_types[span[0][0]].name, tuple(code for _, _, code in span)))
                span = None
            elif span is not None:
                if self.layout.sid_start <= token_id < self.layout.sid_end:
                    span.append(self._sid_codes[token_id - self.layout.sid_start])
                else:
                    span = None
        return sids

    def _is_complete(self, span: list[tuple[int, int, int]]) -> bool:
        t = span[0][0]
        levels = self.layout.entity_types[t].num_levels
        return [(tt, level) for tt, level, _ in span] == [(t, level) for level in range(levels)]

    # -- persistence ----------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """Write the text tokenizer's files and the layout JSON into `directory` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.text.save(directory)
        atomic_write_text(directory / LAYOUT_FILE, self.layout.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> "MixedTokenizer":
        directory = Path(directory)
        return cls(load_text_tokenizer(directory), VocabLayout.load(directory / LAYOUT_FILE))
