"""SID-constrained generation with transformers, over the directory `neo-jax export-hf` writes.

Pure Python and numpy: this module reads `sid_catalog.json` and imports nothing else of neo_jax,
nor torch or transformers, so it can be copied into a serving stack on its own. The file holds the
vocabulary's text size, the ids of `[SID]`, `[/SID]` and EOS, and the token ids of every catalog
item's SID; `SidCatalog` builds the trie of those paths.

`SidLogitsProcessor` constrains `generate` as `neo_jax.decode` does: inside a `[SID] ... [/SID]` span
only the children of the trie node reached (level 0: of the asked entity types), and `[/SID]` only at
an item's last code, so every SID is a real catalog item; outside a span, by output format, `text`:
any text token, EOS among them; `mixed`: text and `[SID]`; `ids`: EOS alone after the answer's item,
whose `[SID]` ends the prompt. It also renormalises the scores over the real tokens: transformers
cannot mask the padding rows of the exported vocabulary, and their share of the softmax would
otherwise differ from beam to beam. `SidAnswerComplete` ends an `ids` answer at its item's last code,
so beams are ranked by the codes' probability alone, as `neo_jax.decode` ranks them:

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from neo_jax.hf.sid_logits import SidAnswerComplete, SidCatalog, SidLogitsProcessor

    model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR)
    tokenizer = AutoTokenizer.from_pretrained(EXPORT_DIR)
    catalog = SidCatalog.load(EXPORT_DIR)
    prompt = "task: recommend | type: product | format: ids\\nHistory: [SID]<product_0_3><product_1_7>[/SID]"
    ids = torch.tensor([tokenizer(prompt)["input_ids"] + [catalog.sid_open_id]])  # BOS, prompt, `[SID]`
    out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=10, num_return_sequences=10,
                         do_sample=False, length_penalty=0.0, max_new_tokens=catalog.max_levels,
                         logits_processor=[SidLogitsProcessor(catalog, ["product"], "ids")],
                         stopping_criteria=[SidAnswerComplete(catalog)], pad_token_id=catalog.eos_id)
    ranked = [catalog.item_of(row[ids.shape[1]:]) for row in out.tolist()]  # item ids, best first

Both take transformers' PyTorch tensors and give them back on the same device; the masks are built
on the host, one row (beam) at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

SID_CATALOG = "sid_catalog.json"
FORMAT = "neo_jax SID catalog"
FORMAT_VERSION = 1
OUTPUT_FORMATS = ("ids", "text", "mixed")
_FIELDS = ("text_size", "vocab_size", "sid_open_id", "sid_close_id", "eos_id", "entity_types", "item_ids",
           "item_types", "item_tokens")


class SidCatalog:
    """The catalog's SID paths as token ids, and the trie over them."""

    def __init__(self, values: dict, source: str):
        if values.get("format") != FORMAT or values.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: not a {FORMAT} of version {FORMAT_VERSION}")
        missing = [key for key in _FIELDS if key not in values]
        if missing:
            raise ValueError(f"{source}: the SID catalog lacks {missing[0]!r}")
        self.text_size, self.vocab_size = int(values["text_size"]), int(values["vocab_size"])  # vocab: real tokens
        self.sid_open_id, self.sid_close_id = int(values["sid_open_id"]), int(values["sid_close_id"])
        self.eos_id = int(values["eos_id"])
        self.entity_types = list(values["entity_types"])
        self._item_of = {tuple(tokens): item_id for item_id, tokens in zip(values["item_ids"], values["item_tokens"])}
        self.max_levels = max(len(tokens) for tokens in self._item_of)
        # The allowed next tokens after each proper prefix of a path below the root; after a whole path, `[/SID]`.
        children: dict[tuple[int, ...], set[int]] = {}
        self._roots: list[set[int]] = [set() for _ in self.entity_types]  # [type] its items' level-0 tokens
        for path, item_type in zip(self._item_of, values["item_types"]):
            self._roots[item_type].add(path[0])
            for level in range(1, len(path)):
                children.setdefault(path[:level], set()).add(path[level])
            children[path] = {self.sid_close_id}
        self._children = {prefix: sorted(tokens) for prefix, tokens in children.items()}

    @classmethod
    def load(cls, directory: str | Path) -> "SidCatalog":
        path = Path(directory) / SID_CATALOG
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot read the SID catalog ({e})") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: not a JSON object")
        return cls(values, str(path))

    def root_tokens(self, entity_types: Sequence[str] | None) -> list[int]:
        """The level-0 tokens of the items of `entity_types` (None: every type)."""
        names = self.entity_types if entity_types is None else list(entity_types)
        unknown = [name for name in names if name not in self.entity_types]
        if unknown or not names:
            raise ValueError(f"entity types {names} must be a non-empty list of the catalog's {self.entity_types}")
        return sorted(set().union(*(self._roots[self.entity_types.index(name)] for name in names)))

    def next_tokens(self, prefix: tuple[int, ...]) -> list[int]:
        """The tokens allowed after the codes `prefix` (not empty) of an open span: none off the trie."""
        return self._children.get(prefix, [])

    def open_span(self, tokens: Sequence[int]) -> tuple[int, ...] | None:
        """The tokens after the last `[SID]` of `tokens` if no `[/SID]` closes it, else None."""
        for back, token in enumerate(reversed(tokens)):
            if token in (self.sid_open_id, self.sid_close_id):
                return tuple(tokens[len(tokens) - back:]) if token == self.sid_open_id else None
        return None

    def names_item(self, codes: tuple[int, ...]) -> bool:
        """Whether `codes` are exactly the code tokens of one item's SID."""
        return codes in self._item_of

    def item_of(self, tokens: Sequence[int]) -> str | None:
        """The item whose SID's code tokens begin `tokens` (what follows its `[SID]`); None if there is none."""
        tokens = tuple(int(t) for t in tokens)
        return next((self._item_of[tokens[:k]] for k in range(1, self.max_levels + 1) if tokens[:k] in self._item_of),
                    None)


class SidLogitsProcessor:
    """A transformers logits processor: only tokens the SID constraint allows keep their score (see the module doc)."""

    def __init__(self, catalog: SidCatalog, entity_types: Sequence[str] | None = None, output_format: str = "ids"):
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format {output_format!r} is not one of {', '.join(OUTPUT_FORMATS)}")
        self.catalog, self.output_format = catalog, output_format
        self._root = catalog.root_tokens(entity_types)
        text = np.arange(catalog.text_size)  # [text]
        self._outside = {"ids": np.array([catalog.eos_id]), "text": text,
                         "mixed": np.append(text, catalog.sid_open_id)}[output_format]

    def allowed(self, tokens: Sequence[int]) -> Sequence[int]:
        """The token ids allowed after the sequence `tokens` (prompt and generated tokens)."""
        span = self.catalog.open_span(tokens)
        if span is None:
            return self._outside
        return self._root if not span else self.catalog.next_tokens(span)

    def __call__(self, input_ids, scores):
        """`input_ids` `[rows, length]`, `scores` `[rows, vocab]` (log-probabilities in beam search, else
        logits) -> the scores as log-probabilities over the real tokens, -inf where not allowed."""
        values = scores.detach().float().cpu().numpy()  # [rows, vocab]
        real = values[:, : self.catalog.vocab_size]  # [rows, real]
        top = real.max(axis=1, keepdims=True)  # [rows, 1]
        log_probs = real - (top + np.log(np.exp(real - top).sum(axis=1, keepdims=True)))  # [rows, real]
        out = np.full(values.shape, -np.inf, np.float32)  # [rows, vocab]
        for row, tokens in enumerate(input_ids.tolist()):
            allowed = self.allowed(tokens)
            out[row, allowed] = log_probs[row, allowed]
        return scores.new_tensor(out)


class SidAnswerComplete:
    """A transformers stopping criterion: a row is done when its open span holds a whole item's SID."""

    def __init__(self, catalog: SidCatalog):
        self.catalog = catalog

    def __call__(self, input_ids, scores, **kwargs):
        """`input_ids` `[rows, length]` -> `[rows]` bool, on `input_ids`' device."""
        spans = [self.catalog.open_span(tokens) for tokens in input_ids.tolist()]
        return input_ids.new_tensor([span is not None and self.catalog.names_item(span) for span in spans]).bool()
