"""Natural-language tokenizers behind one small interface: sentencepiece models and Hugging Face `tokenizer.json`.

`encode` never adds bos/eos (callers place them), and `decode(encode(text)) == text` exactly for the
tokenizers built here (byte fallback / byte-level BPE, no lossy normalisation). A tokenizer saves
itself into a directory (its model file plus `text_tokenizer.json` naming the kind) and
`load_text_tokenizer` reads that directory back, or any model file a user points at.
"""

from __future__ import annotations

import abc
import io
import json
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import sentencepiece as spm
import tokenizers

from neo_jax.atomic import atomic_write_bytes, atomic_write_text
from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object
from neo_jax.tokenizer.hf_files import sentencepiece_to_tokenizers

META_FILE = "text_tokenizer.json"


class TextTokenizer(abc.ABC):
    """Text <-> token ids of one vocabulary (ids `0 .. vocab_size-1`)."""

    kind: ClassVar[str]
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; special tokens are written out, not skipped."""

    @abc.abstractmethod
    def save(self, directory: Path) -> None:
        """Write the model file and `META_FILE` into `directory` (which exists)."""

    @abc.abstractmethod
    def to_tokenizers(self) -> tokenizers.Tokenizer:
        """A new `tokenizers.Tokenizer` that encodes text to the same ids (for a `tokenizer.json`)."""

    def _write_meta(self, directory: Path, **fields: Any) -> None:
        atomic_write_text(directory / META_FILE, json.dumps({"kind": self.kind, **fields}, indent=2))


class SentencePieceTokenizer(TextTokenizer):
    kind = "sentencepiece"
    MODEL_FILE = "tokenizer.model"

    def __init__(self, model_proto: bytes, source: str):
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError as e:
            raise UserError(f"{source}: not a sentencepiece model ({e})") from None
        self._model_proto = model_proto
        self.source = source
        self.bos_id, self.eos_id, self.pad_id = (i if i >= 0 else None
                                                 for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id()))

    @classmethod
    def from_file(cls, path: str | Path) -> "SentencePieceTokenizer":
        path = Path(path)
        try:
            return cls(path.read_bytes(), str(path))
        except FileNotFoundError:
            raise UserError(f"{path}: sentencepiece model file not found") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def save(self, directory: Path) -> None:
        atomic_write_bytes(directory / self.MODEL_FILE, self._model_proto)
        self._write_meta(directory, file=self.MODEL_FILE)

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        return sentencepiece_to_tokenizers(self._model_proto, self.source)


class HFTokenizer(TextTokenizer):
    """A `tokenizers.Tokenizer` (Hugging Face `tokenizer.json`), with its bos/eos/pad ids."""

    kind = "huggingface"
    JSON_FILE = "tokenizer.json"

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_id: int | None = None, eos_id: int | None = None,
                 pad_id: int | None = None):
        self._tokenizer = tokenizer
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id

    @classmethod
    def from_file(cls, path: str | Path) -> "HFTokenizer":
        """A `tokenizer.json`; bos/eos/pad come from a `tokenizer_config.json` beside it, if there is one."""
        path = Path(path)
        tokenizer = _read_tokenizer_json(path)
        special = _special_token_ids(tokenizer, path.parent / "tokenizer_config.json")
        return cls(tokenizer, special.get("bos_token"), special.get("eos_token"), special.get("pad_token"))

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / self.JSON_FILE, self._tokenizer.to_str())
        self._write_meta(directory, file=self.JSON_FILE, bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)

    def to_tokenizers(self) -> tokenizers.Tokenizer:
        return tokenizers.Tokenizer.from_str(self._tokenizer.to_str())


def _read_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    if not path.is_file():
        raise UserError(f"{path}: tokenizer.json not found")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises bare `Exception` on malformed files
        raise UserError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None


def _special_token_ids(tokenizer: tokenizers.Tokenizer, config_path: Path) -> dict[str, int]:
    """`{"bos_token": id, ...}` from a Hugging Face `tokenizer_config.json` (absent file: no ids)."""
    if not config_path.is_file():
        return {}
    config = read_json_object(config_path)
    ids = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            ids[key] = tokenizer.token_to_id(token)
    return ids


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str | Path,
                        model_type: str = "bpe") -> SentencePieceTokenizer:
    """Train a sentencepiece model on `texts` (for from-scratch configs) and write it to `out_path`.

    Settings keep `decode(encode(text)) == text`: identity normalisation, whitespace kept as is, byte
    fallback for unseen characters; digits are split one by one. Ids: unk 0, bos 1, eos 2.
    `vocab_size` is an upper bound: text with fewer distinct pieces (e.g. prompt headers alone)
    gets a smaller vocabulary instead of an error.
    """
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
            split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            hard_vocab_limit=False, minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"training a sentencepiece model of {vocab_size} tokens for {out_path} failed: "
                        f"{str(e).splitlines()[0].split('] ')[-1][:200]}") from None
    atomic_write_bytes(out_path, model.getvalue())
    return SentencePieceTokenizer(model.getvalue(), str(out_path))


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """A text tokenizer from a saved directory, a `.model` file, a `tokenizer.json` (or its directory), or a `.gguf`."""
    path = Path(path)
    if path.is_dir():
        if (path / META_FILE).is_file():
            return _load_saved(path)
        if (path / HFTokenizer.JSON_FILE).is_file():
            return HFTokenizer.from_file(path / HFTokenizer.JSON_FILE)
        raise UserError(f"{path}: directory holds neither {META_FILE} nor {HFTokenizer.JSON_FILE}")
    if path.suffix == ".model":
        return SentencePieceTokenizer.from_file(path)
    if path.suffix == ".json":
        return HFTokenizer.from_file(path)
    if path.suffix == ".gguf":
        from neo_jax.hf.gguf import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    raise UserError(f"{path}: not a tokenizer (expected a directory, .model, tokenizer.json or .gguf)")


def _load_saved(directory: Path) -> TextTokenizer:
    meta_path = directory / META_FILE
    meta = read_json_object(meta_path)
    try:
        kind, file = meta["kind"], directory / meta["file"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not a valid tokenizer description ({e!r})") from None
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer.from_file(file)
    if kind == HFTokenizer.kind:
        return HFTokenizer(_read_tokenizer_json(file), meta.get("bos_id"), meta.get("eos_id"), meta.get("pad_id"))
    raise UserError(f"{meta_path}: unknown tokenizer kind {kind!r} "
                    f"(known: {SentencePieceTokenizer.kind!r}, {HFTokenizer.kind!r})")
