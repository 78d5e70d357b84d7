"""Generation with the decoder: prompts in, ranked continuations out, each SID resolved to a catalog item.

Text level: `Generator(model, tokenizer, sids, eos_id, titles).generate(prompts, settings)`; for
ranking, `Generator.rank_items(prompts, settings)` gives the `[prompt, beam]` catalog rows alone.
Token level:

    packed = pack_prompts(prompt_ids, max_context=..., max_new_tokens=settings.max_new_tokens,
                          vocab_limit=layout.size, width_multiple=SHAPE_MULTIPLE)
    result = decode(model, packed, constraint, settings, eos_id)    # one jitted prefill + loop
    beams = resolve(result, layout, trie)                          # [batch][beam] Continuation

Prompts are LEFT padded (the layout of `neo_jax.model.kv_cache`): the prefill writes every
prompt but its last token into the cache, and the decoding loop feeds that last token first.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Collection, Literal, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neo_jax.catalog.item_ids import ItemIds
from neo_jax.catalog.sid_output import SidOutput
from neo_jax.catalog.table import SidTrie
from neo_jax.decode.beam_search import beam_search, check_beam_settings
from neo_jax.decode.constraint import Constraint, ItemSubsets, SidConstraint, Unconstrained, sid_requests
from neo_jax.decode.sampling import check_sampling_settings, sample
from neo_jax.decode.sid_tables import SidTables
from neo_jax.decode.state import DecodeResult, TokensToLogits, is_alive
from neo_jax.errors import UserError
from neo_jax.model.config import ModelConfig
from neo_jax.model.decoder import Decoder
from neo_jax.model.kv_cache import KVCache, SharedPromptCache
from neo_jax.sharding import batch_sharding
from neo_jax.tasks.builders import ANY_TYPE, parse_header
from neo_jax.tokenizer import MixedTokenizer
from neo_jax.vocab import VocabLayout, format_sid


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to decode: `beam` search, or `sample` (temperature 0 is greedy)."""

    method: Literal["beam", "sample"] = "beam"
    max_new_tokens: int = 32
    beam_size: int = 4  # beams, or samples per prompt
    alpha: float = 0.0  # beam search length penalty
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if self.method not in ("beam", "sample"):
            raise UserError(f"unknown decoding method {self.method!r}; choose beam or sample")
        check_beam_settings(self.beam_size, self.max_new_tokens, self.alpha)
        check_sampling_settings(self.temperature, self.top_k, self.top_p)


@dataclasses.dataclass(frozen=True)
class PackedPrompts:
    tokens: np.ndarray  # [batch, padded_len] int32, left padded with 0
    segment_ids: np.ndarray  # [batch, padded_len] int32: 1 on prompt tokens, 0 on padding
    positions: np.ndarray  # [batch, padded_len] int32: counted from each prompt's first token
    lengths: np.ndarray  # [batch] int32


# Prompt widths and exclusion-list widths are rounded up to this, so a stream of batches compiles
# the decoder a few times, not once per batch.
SHAPE_MULTIPLE = 32


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _exclusion_width(longest: int) -> int:
    """Width of a batch's exclusion lists: a power of two, at least `SHAPE_MULTIPLE`, so that
    histories of any length compile the decoder a few times (32, 64, 128, ...)."""
    return max(SHAPE_MULTIPLE, 1 << (longest - 1).bit_length())


def pack_prompts(prompts: Sequence[Sequence[int]], *, max_context: int, max_new_tokens: int,
                 vocab_limit: int, width_multiple: int = 1) -> PackedPrompts:
    """Left-pad token prompts into one batch; refuse empty prompts, unknown ids and overlong requests.

    The padded width is the longest prompt rounded up to `width_multiple` (never past what the
    context leaves for `max_new_tokens`), so batches of similar prompts share one compiled decoder.
    """
    if not prompts:
        raise UserError("no prompts to decode")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(prompt) + max_new_tokens > max_context:
            raise UserError(f"prompt {i} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it "
                            f"exceeds the model's context of {max_context} tokens")
        bad = [t for t in prompt if not 0 <= int(t) < vocab_limit]
        if bad:
            raise UserError(f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{vocab_limit - 1})")
    lengths = np.array([len(p) for p in prompts], np.int32)  # [batch]
    width = min(_round_up(int(lengths.max()), width_multiple), max_context - max_new_tokens)
    pad = width - lengths  # [batch]
    column = np.arange(width, dtype=np.int32)[None, :]  # [1, padded_len]
    segment_ids = (column >= pad[:, None]).astype(np.int32)  # [batch, padded_len]
    tokens = np.zeros((len(prompts), width), np.int32)  # [batch, padded_len]
    for i, prompt in enumerate(prompts):
        tokens[i, pad[i]:] = prompt
    positions = np.maximum(column - pad[:, None], 0).astype(np.int32)  # [batch, padded_len]
    return PackedPrompts(tokens, segment_ids, positions, lengths)


def decoder_step(model: Decoder) -> TokensToLogits:
    """The decoding loops' model callback for a `Decoder` and its cache (`prefill`'s `SharedPromptCache`)."""

    def tokens_to_logits(tokens: jax.Array, cache: KVCache | SharedPromptCache, positions: jax.Array,
                         item_ids: jax.Array | None = None):
        logits, cache = model(tokens, positions, None, cache, item_ids=item_ids)  # [batch*beams, 1, vocab]
        return logits[:, 0], cache

    return tokens_to_logits


def prefill(model: Decoder, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
            max_new_tokens: int, item_ids: jax.Array | None = None) -> SharedPromptCache:
    """A cache holding every prompt token but the last (the decoding loop feeds that one first),
    shared by the sequences the loop decodes from it, with room for `max_new_tokens` each."""
    batch, width = tokens.shape
    cache = model.init_cache(batch, width - 1)
    if width > 1:
        _, cache = model(tokens[:, :-1], positions[:, :-1], segment_ids[:, :-1], cache,
                         item_ids=None if item_ids is None else item_ids[:, :-1])
    return SharedPromptCache.after_prefill(cache, max_new_tokens)


@nnx.jit(static_argnames=("settings", "eos_id"))
def _decode(model: Decoder, tokens: jax.Array, segment_ids: jax.Array, positions: jax.Array,
            lengths: jax.Array, item_ids: jax.Array, rng: jax.Array, constraint: Constraint,
            settings: DecodeSettings, eos_id: int) -> DecodeResult:
    cache = prefill(model, tokens, segment_ids, positions, settings.max_new_tokens, item_ids)
    last, last_item = tokens[:, -1], item_ids[:, -1]  # [batch] each
    step = decoder_step(model)
    if settings.method == "beam":
        return beam_search(step, cache, last, lengths, constraint=constraint, beam_size=settings.beam_size,
                           max_new_tokens=settings.max_new_tokens, eos_id=eos_id, alpha=settings.alpha,
                           last_prompt_item=last_item)
    return sample(step, cache, last, lengths, rng, constraint=constraint, max_new_tokens=settings.max_new_tokens,
                  eos_id=eos_id, num_samples=settings.beam_size, temperature=settings.temperature,
                  top_k=settings.top_k, top_p=settings.top_p, last_prompt_item=last_item)


def _decode_arguments(model: Decoder, prompts: PackedPrompts, constraint: Constraint, settings: DecodeSettings,
                      eos_id: int, mesh: Mesh | None, seed: int, item_ids: np.ndarray | None) -> tuple:
    """`_decode`'s arguments, the prompts placed on the mesh."""
    settings.check()
    if item_ids is None:
        item_ids = np.zeros(prompts.tokens.shape, np.int32)
    arrays = (prompts.tokens, prompts.segment_ids, prompts.positions, prompts.lengths, item_ids)
    if mesh is not None:
        split = prompts.lengths.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
        placement = batch_sharding if split else lambda m, ndim: NamedSharding(m, PartitionSpec())
        arrays = tuple(jax.device_put(a, placement(mesh, a.ndim)) for a in arrays)
    return (model, *arrays, jax.random.key(seed), constraint, settings, int(eos_id))


def decode(model: Decoder, prompts: PackedPrompts, constraint: Constraint, settings: DecodeSettings,
           eos_id: int, mesh: Mesh | None = None, seed: int = 0, item_ids: np.ndarray | None = None) -> DecodeResult:
    """Prefill and decode a batch of packed prompts in one jitted call (`seed`: sampling only);
    `item_ids` `[batch, padded_len]`: the items the prompts' `[/SID]` tokens close (`ItemIds`; None: none).

    With a `mesh` (the one the model lives on), prompts are split over its batch axes when
    the batch divides evenly, else replicated; the beams of a request stay on its devices.
    """
    return _decode(*_decode_arguments(model, prompts, constraint, settings, eos_id, mesh, seed, item_ids))


def lower_decode(model: Decoder, prompts: PackedPrompts, constraint: Constraint, settings: DecodeSettings,
                 eos_id: int, mesh: Mesh | None = None, seed: int = 0, item_ids: np.ndarray | None = None):
    """`decode`'s jitted call lowered, not run (`.compile().as_text()`: the partitioned program)."""
    return _decode.lower(*_decode_arguments(model, prompts, constraint, settings, eos_id, mesh, seed, item_ids))


@dataclasses.dataclass(frozen=True)
class ItemRef:
    """A SID span of the output, resolved: the catalog row (None if no item has this SID)."""

    row: int | None
    entity_type: str
    codes: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Continuation:
    tokens: tuple[int, ...]  # the generated ids, EOS included when finished
    pieces: tuple[tuple[int, ...] | ItemRef, ...]  # runs of text/other ids and resolved SIDs, in order
    log_prob: float
    score: float
    finished: bool

    @property
    def items(self) -> list[ItemRef]:
        return [p for p in self.pieces if isinstance(p, ItemRef)]


def split_sids(tokens: Sequence[int], layout: VocabLayout, trie: SidTrie) -> tuple[tuple[int, ...] | ItemRef, ...]:
    """Cut ids into text runs and `[SID]...[/SID]` spans, each span resolved to its catalog row.

    An unclosed span at the end (a continuation cut by `max_new_tokens`) stays a run of ids.
    """
    pieces, run, span = [], [], None
    for token in tokens:
        if span is None and token == layout.sid_open_id:
            span = []
        elif span is not None and token == layout.sid_close_id:
            if run:
                pieces.append(tuple(run))
                run = []
            pieces.append(_resolve_span(span, layout, trie))
            span = None
        elif span is not None:
            span.append(int(token))
        else:
            run.append(int(token))
    if span is not None:
        run += [layout.sid_open_id] + span
    if run:
        pieces.append(tuple(run))
    return tuple(pieces)


def _resolve_span(span: list[int], layout: VocabLayout, trie: SidTrie) -> ItemRef:
    decoded = [layout.decode_sid_token(t) if layout.sid_start <= t < layout.sid_end else None for t in span]
    types = {d[0] for d in decoded if d is not None}
    if not span or None in decoded or len(types) != 1 or [d[1] for d in decoded] != list(range(len(span))):
        return ItemRef(row=None, entity_type="?", codes=tuple(span))
    type_index = types.pop()
    codes = tuple(d[2] for d in decoded)
    return ItemRef(row=trie.find_item(type_index, codes), entity_type=layout.entity_types[type_index].name,
                   codes=codes)


def resolve(result: DecodeResult, layout: VocabLayout, trie: SidTrie, codes_only: Sequence[bool] | None = None,
            eos_id: int | None = None) -> list[list[Continuation]]:
    """`[batch][beam]` continuations (filler beams dropped), best first for beam search.

    `codes_only[b]`: request b decoded just its item's codes (`SidConstraint.ids_codes_only`);
    its continuations get back the forced tokens around them, `[SID]` before and, when
    finished, `[/SID]` and `eos_id` after, so they read as any ID-mode answer."""
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    log_probs, scores, finished = np.asarray(result.log_probs), np.asarray(result.scores), np.asarray(result.finished)
    alive = np.asarray(is_alive(result.scores)) | finished  # [batch, beams]
    out = []
    for b in range(tokens.shape[0]):
        row = []
        for k in np.flatnonzero(alive[b]):
            ids = tuple(int(t) for t in tokens[b, k, : lengths[b, k]])
            if codes_only is not None and codes_only[b]:
                ids = (layout.sid_open_id,) + ids + ((layout.sid_close_id, eos_id) if finished[b, k] else ())
            row.append(Continuation(ids, split_sids(ids, layout, trie), float(log_probs[b, k]),
                                    float(scores[b, k]), bool(finished[b, k])))
        out.append(row)
    return out


def sid_answer_tokens(layout: VocabLayout) -> int:
    """New tokens an answer of one SID takes: `[SID]`, the codes of the deepest type, `[/SID]`, EOS."""
    return max(t.num_levels for t in layout.entity_types) + 3


def eos_token_id(tokenizer: MixedTokenizer, config: ModelConfig) -> int:
    """The id that ends an answer: the tokenizer's EOS, else the model config's (the first, if it lists several)."""
    eos_id = tokenizer.eos_id if tokenizer.eos_id is not None else config.eos_token_id
    if eos_id is None:
        raise UserError("neither the tokenizer nor the model config names an EOS token")
    return int(eos_id[0] if isinstance(eos_id, tuple) else eos_id)


@dataclasses.dataclass(frozen=True)
class GeneratedItem:
    item_id: str
    entity_type: str
    title: str | None  # None without a catalog to read titles from

    def to_dict(self) -> dict:
        return {"id": self.item_id, "type": self.entity_type, "title": self.title}


@dataclasses.dataclass(frozen=True)
class GeneratedText:
    raw: str  # the mixed string, SIDs in their token form
    text: str  # the same with each SID replaced by `[type item_id "title"]`
    items: tuple[GeneratedItem | None, ...]  # the SIDs in order (None: names no catalog item)
    score: float
    log_prob: float
    finished: bool

    def to_dict(self) -> dict:
        return {"text": self.text, "raw": self.raw, "items": [None if i is None else i.to_dict() for i in self.items],
                "score": self.score, "log_prob": self.log_prob, "finished": self.finished}


class Generator:
    """Text prompts in, ranked continuations out, each SID resolved to its catalog item.

    A prompt that starts with a task header (`task: recommend | type: product | format: ids`)
    chooses its target entity type and output format; other prompts use the defaults given to
    `generate`. The trie is moved to the devices once, here.
    """

    def __init__(self, model: Decoder, tokenizer: MixedTokenizer, sids: SidOutput, eos_id: int,
                 titles: Mapping[str, str] | None = None, mesh: Mesh | None = None):
        layout = tokenizer.layout
        if model.config.vocab_size < layout.size:
            raise UserError(f"the model has {model.config.vocab_size} vocabulary rows but the tokenizer's layout "
                            f"needs {layout.size}; use the tokenizer the model was trained with")
        self.model, self.tokenizer, self.sids, self.eos_id = model, tokenizer, sids, int(eos_id)
        self.titles, self.mesh = titles, mesh
        self.tables = SidTables.from_trie(sids.trie, layout, mesh)
        self.row_of_id = {item_id: row for row, item_id in enumerate(sids.item_ids)}
        self.subsets = ItemSubsets(sids.trie, self.tables)  # in-stock subsets on the device, once each
        self._last_mask: tuple[Collection[str], np.ndarray] | None = None  # (allowed ids, their mask)
        self.item_ids = ItemIds.build(sids.trie, layout)
        self.token_index = self.item_ids.index
        if model.config.num_item_ids:
            self.item_ids.check_model(model.config.num_item_ids, "the model")

    def with_model(self, model: Decoder) -> "Generator":
        """The same tokenizer, catalog and device tables with another model of the same vocabulary
        (a later state of a training run), so the trie is not moved to the devices again."""
        if model.config.vocab_size != self.model.config.vocab_size:
            raise UserError(f"the new model has {model.config.vocab_size} vocabulary rows, "
                            f"not {self.model.config.vocab_size}")
        if model.config.num_item_ids:
            self.item_ids.check_model(model.config.num_item_ids, "the new model")
        generator = copy.copy(self)
        generator.model = model
        return generator

    def generate(self, prompts: Sequence[str], settings: DecodeSettings, *,
                 excluded_ids: Sequence[Sequence[str]] | None = None, allowed_ids: Collection[str] | None = None,
                 default_types: Sequence[str] | None = None, default_format: str = "mixed",
                 constrained: bool = True, seed: int = 0) -> list[list[GeneratedText]]:
        """`[prompt][beam]` continuations. `excluded_ids[i]`: items prompt i must not name (its history);
        `allowed_ids`: the only items any prompt may name (in stock)."""
        headers = self._targets(prompts, default_types, default_format)
        # Constrained ID mode names one item: its prompt ends with `[SID]` and it decodes just the codes.
        codes_only = [constrained and output_format == "ids" for _, output_format in headers]
        result = self._decode(prompts, headers, codes_only, settings, excluded_ids, allowed_ids, constrained, seed)
        return [[self._to_text(c) for c in beams]
                for beams in resolve(result, self.tokenizer.layout, self.sids.trie, codes_only, self.eos_id)]

    def rank_items(self, prompts: Sequence[str], settings: DecodeSettings, *,
                   excluded_ids: Sequence[Sequence[str]] | None = None) -> np.ndarray:
        """`[prompt, beam]` catalog rows named by constrained ID-mode beam search, best first (-1: a
        filler beam, where fewer items were found): `generate`'s ranking without its text, resolved
        for the whole batch at once. Every prompt must ask for the `ids` format in its header."""
        if settings.method != "beam":
            raise UserError(f"ranking items needs beam search, not {settings.method!r}")
        headers = self._targets(prompts, None, "")
        for i, (_, output_format) in enumerate(headers):
            if output_format != "ids":
                raise UserError(f"prompt {i}: ranking items needs a task header asking for the 'ids' format, "
                                + (f"it asks for {output_format!r}" if output_format else "it has no header"))
        result = self._decode(prompts, headers, [True] * len(prompts), settings, excluded_ids, None, True, 0)
        lengths = np.asarray(result.lengths)  # [batch, beams]
        real = np.asarray(is_alive(result.scores)) | np.asarray(result.finished)  # [batch, beams]
        rows = self.token_index.rows(np.asarray(result.tokens), lengths)  # [batch, beams]
        return np.where(real, rows, -1)

    def _decode(self, prompts: Sequence[str], headers, codes_only: Sequence[bool], settings: DecodeSettings,
                excluded_ids: Sequence[Sequence[str]] | None, allowed_ids: Collection[str] | None,
                constrained: bool, seed: int) -> DecodeResult:
        """Tokenise, pack, constrain and decode one batch; `headers[i]`: prompt i's (types, format)."""
        layout = self.tokenizer.layout
        bos = [] if self.tokenizer.bos_id is None else [self.tokenizer.bos_id]
        packed = pack_prompts([bos + self.tokenizer.encode(p) + ([layout.sid_open_id] if codes else []) if p else []
                               for p, codes in zip(prompts, codes_only)],
                              max_context=self.model.config.max_position_embeddings,
                              max_new_tokens=settings.max_new_tokens, vocab_limit=layout.size,
                              width_multiple=SHAPE_MULTIPLE)
        if constrained:
            excluded = None if excluded_ids is None else [self._rows(ids, "excluded") for ids in excluded_ids]
            requests = sid_requests(
                self.sids.trie, layout, self.tables, entity_types=[types for types, _ in headers],
                output_formats=[output_format for _, output_format in headers], beam_size=settings.beam_size,
                excluded_rows=excluded,
                max_excluded=None if excluded is None else _exclusion_width(max([1] + [len(r) for r in excluded])),
                allowed_rows=None if allowed_ids is None else self._mask(allowed_ids), subsets=self.subsets)
            constraint = SidConstraint.create(self.tables, requests, layout, self.eos_id, ids_codes_only=True)
        else:
            constraint = Unconstrained(layout.size)
        return decode(self.model, packed, constraint, settings, self.eos_id, self.mesh, seed,
                      self.item_ids(packed.tokens))

    def _targets(self, prompts: Sequence[str], default_types: Sequence[str] | None, default_format: str):
        """`[(entity types or None, output format)]` of each prompt (`_prompt_target`)."""
        targets = []
        for i, prompt in enumerate(prompts):
            try:
                targets.append(_prompt_target(prompt, default_types, default_format, self.tokenizer.layout))
            except UserError as e:
                raise UserError(f"request {i}: {e}") from None
        return targets

    def _rows(self, item_ids: Sequence[str], what: str) -> list[int]:
        unknown = [i for i in item_ids if i not in self.row_of_id]
        if unknown:
            raise UserError(f"{what} item id {unknown[0]!r} is not in the SID catalog")
        return [self.row_of_id[i] for i in item_ids]

    def _mask(self, item_ids: Collection[str]) -> np.ndarray:
        """`[n_items]` bool over catalog rows; the same collection as the last call's (a file of in-stock
        ids given to every batch) reuses its mask instead of looking every id up again."""
        if self._last_mask is not None and self._last_mask[0] is item_ids:
            return self._last_mask[1]
        mask = np.zeros(len(self.sids.item_ids), bool)  # [n_items] over catalog rows
        mask[self._rows(list(item_ids), "allowed")] = True
        mask.flags.writeable = False  # so `ItemSubsets` can reuse its digest when it comes again
        self._last_mask = (item_ids, mask)
        return mask

    def _to_text(self, continuation: Continuation) -> GeneratedText:
        raw, text, items = [], [], []
        for piece in continuation.pieces:
            if isinstance(piece, ItemRef):
                sid = format_sid(piece.entity_type, piece.codes)
                item = None if piece.row is None else GeneratedItem(
                    self.sids.item_ids[piece.row], piece.entity_type,
                    None if self.titles is None else self.titles.get(self.sids.item_ids[piece.row]))
                raw.append(sid)
                text.append(sid if item is None else f'[{item.entity_type} {item.item_id} "{item.title or ""}"]')
                items.append(item)
            else:
                words = self.tokenizer.decode([t for t in piece if t != self.eos_id])
                raw.append(words)
                text.append(words)
        return GeneratedText("".join(raw), "".join(text), tuple(items), continuation.score, continuation.log_prob,
                             continuation.finished)


def _prompt_target(prompt: str, default_types: Sequence[str] | None, default_format: str, layout: VocabLayout):
    """`(entity types or None for all, output format)` of a prompt: from its header, else the defaults.

    In `ids` the one item named is the header's type; in `mixed` the header's type is the target's,
    and the text may mention items of any type the request allows (`default_types`, else all):
    an explanation cites history items of other types. `any` (user-level tasks) allows every type."""
    if not prompt.startswith("task:"):
        return (None if default_types is None else tuple(default_types)), default_format
    header = parse_header(prompt)
    if header.entity_type != ANY_TYPE:
        layout.type_index(header.entity_type)  # an unknown type is an error in every format
    if header.entity_type == ANY_TYPE or header.output_format == "mixed":
        return (None if default_types is None else tuple(default_types)), header.output_format
    return (header.entity_type,), header.output_format
