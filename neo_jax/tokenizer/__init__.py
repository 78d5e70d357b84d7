"""Tokenizers: natural-language text models, the GGUF-stored vocabulary, and text mixed with SID tokens.

- `text`: `TextTokenizer` (sentencepiece, Hugging Face `tokenizer.json`), `train_sentencepiece`,
  `load_text_tokenizer`.
- `gguf_vocab`: the byte-level BPE a GGUF file stores, rebuilt with `tokenizers`.
- `mixed`: `MixedTokenizer`, which adds the vocabulary layout's specials and SID code tokens.
"""

from neo_jax.tokenizer.mixed import LAYOUT_FILE, SOURCES_FILE, MixedTokenizer, sids_source
from neo_jax.tokenizer.text import (
    HFTokenizer,
    SentencePieceTokenizer,
    TextTokenizer,
    load_text_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "HFTokenizer",
    "LAYOUT_FILE",
    "MixedTokenizer",
    "SOURCES_FILE",
    "SentencePieceTokenizer",
    "TextTokenizer",
    "load_text_tokenizer",
    "sids_source",
    "train_sentencepiece",
]
