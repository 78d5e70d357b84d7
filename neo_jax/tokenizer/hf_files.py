"""A tokenizer as the files transformers' `AutoTokenizer` loads: `tokenizer.json` and `tokenizer_config.json`.

The text part is the text tokenizer rebuilt with the `tokenizers` library. A sentencepiece BPE model
becomes a `tokenizers` BPE model whose merges are ranked as sentencepiece merges pieces (by the
merged piece's score, highest first), a unigram model a `tokenizers` Unigram model, both with
sentencepiece's byte fallback; the normalizer prepends `▁` and writes spaces as `▁`, as sentencepiece
does, and with its BOS the post-processor starts an encoding with it (`tokenizer(prompt)` is BOS and
the prompt, as `neo_jax.decode` feeds a prompt). A `tokenizer.json` text tokenizer is kept as it is.

The vocabulary layout's specials and SID code tokens are added tokens at their layout ids, after
placeholders for any text ids the text tokenizer leaves unused. Added tokens are cut out of the raw
text before normalisation and each text segment between them is normalised on its own, as
`MixedTokenizer` encodes each piece of text on its own, so transformers encodes a mixed string to
`MixedTokenizer.encode`'s ids. Specials are special tokens (`skip_special_tokens` drops them), code
tokens are not. Two differences remain, both at the edges: transformers also reads the text
tokenizer's BOS and EOS (`<s>`, `</s>`) where they appear literally in the text, which ours reads as
characters; and its `decode` keeps the `▁` sentencepiece prepends to a text segment that follows an
SID token, as a space, where ours drops it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, models, normalizers, processors

from neo_jax.atomic import atomic_write_text
from neo_jax.errors import UserError

if TYPE_CHECKING:
    from neo_jax.tokenizer.mixed import MixedTokenizer
    from neo_jax.tokenizer.text import TextTokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_SPACE = "▁"  # how sentencepiece writes a space
_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
_ModelType = sentencepiece_model_pb2.TrainerSpec


def sentencepiece_to_tokenizers(model_proto: bytes, source: str) -> tokenizers.Tokenizer:
    """The sentencepiece model `model_proto` as a `tokenizers.Tokenizer` that encodes text to the same ids."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
    _check_rebuildable(proto, source)
    pieces, trainer = list(proto.pieces), proto.trainer_spec
    if trainer.model_type == _ModelType.BPE:
        model = models.BPE(vocab={p.piece: i for i, p in enumerate(pieces)}, merges=_bpe_merges(pieces),
                           unk_token=pieces[trainer.unk_id].piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    else:
        model = models.Unigram([(p.piece, p.score) for p in pieces], trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    tokenizer = tokenizers.Tokenizer(model)
    prefix = proto.normalizer_spec.add_dummy_prefix
    tokenizer.normalizer = normalizers.Sequence(([normalizers.Prepend(_SPACE)] if prefix else [])
                                                + [normalizers.Replace(" ", _SPACE)])
    tokenizer.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    if trainer.bos_id >= 0:
        bos = pieces[trainer.bos_id].piece
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                                 special_tokens=[(bos, trainer.bos_id)])
    return tokenizer


def _check_rebuildable(proto, source: str) -> None:
    """Refuse a sentencepiece model whose encoding the rebuilt tokenizer would not reproduce."""
    normalizer, trainer = proto.normalizer_spec, proto.trainer_spec
    problems = {
        f"model type {_ModelType.ModelType.Name(trainer.model_type)} (only BPE and UNIGRAM are rebuilt)":
            trainer.model_type not in (_ModelType.BPE, _ModelType.UNIGRAM),
        f"normalization rule {normalizer.name!r} (only 'identity' is rebuilt)":
            normalizer.name != "identity" or bool(normalizer.precompiled_charsmap),
        "remove_extra_whitespaces": normalizer.remove_extra_whitespaces,
        "escape_whitespaces off": not normalizer.escape_whitespaces,
        "treat_whitespace_as_suffix": trainer.treat_whitespace_as_suffix,
        "user-defined symbols": any(p.type == _Piece.USER_DEFINED for p in proto.pieces),
    }
    problem = next((name for name, present in problems.items() if present), None)
    if problem is not None:
        raise UserError(f"{source}: this sentencepiece model cannot be written as a tokenizer.json: it uses {problem}")


def _bpe_merges(pieces) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, ranked as sentencepiece merges: by the merged
    piece's score, highest first (ties by the merged piece's id, then the parts' ids)."""
    ids = {p.piece: i for i, p in enumerate(pieces) if p.type == _Piece.NORMAL}
    ranked = []
    for merged, i in ids.items():
        for cut in range(1, len(merged)):
            left, right = merged[:cut], merged[cut:]
            if left in ids and right in ids:
                ranked.append((-pieces[i].score, i, ids[left], ids[right], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def mixed_to_tokenizers(mixed: MixedTokenizer) -> tokenizers.Tokenizer:
    """The text tokenizer rebuilt with the layout's specials and SID code tokens added at their ids."""
    tokenizer, layout = mixed.text.to_tokenizers(), mixed.layout
    unused = range(tokenizer.get_vocab_size(with_added_tokens=True), layout.text_size)
    tokenizer.add_special_tokens([AddedToken(f"<unused_text_{i}>", normalized=False) for i in unused])
    tokenizer.add_special_tokens([AddedToken(s, normalized=False) for s in layout.specials])
    tokenizer.add_tokens([AddedToken(s, normalized=False, special=False)
                          for s in mixed.non_text_tokens[len(layout.specials):]])
    for token_id, token in enumerate(mixed.non_text_tokens, start=layout.specials_start):
        if tokenizer.token_to_id(token) != token_id:
            raise UserError(f"token {token!r} of the vocabulary layout would be id {tokenizer.token_to_id(token)} "
                            f"in tokenizer.json, not its layout id {token_id} (the text tokenizer has it already)")
    return tokenizer


def write_hf_tokenizer(directory: str | Path, text: TextTokenizer, mixed: MixedTokenizer | None,
                       model_max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` of `mixed` (None: of `text` alone) into `directory`."""
    directory = Path(directory)
    tokenizer = text.to_tokenizers() if mixed is None else mixed_to_tokenizers(mixed)
    ids = text if mixed is None else mixed
    named = {key: tokenizer.id_to_token(token_id) for key, token_id in
             (("bos_token", ids.bos_id), ("eos_token", ids.eos_id), ("pad_token", ids.pad_id)) if token_id is not None}
    # The generic class: a model-specific one (LlamaTokenizer, ...) may rebuild the normalizer its own way.
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **named, "model_max_length": model_max_length,
              "clean_up_tokenization_spaces": False}
    atomic_write_text(directory / TOKENIZER_JSON, tokenizer.to_str(pretty=True))
    atomic_write_text(directory / TOKENIZER_CONFIG, json.dumps(config, indent=2))
