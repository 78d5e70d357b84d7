"""Rebuild the tokenizer a GGUF file describes (`tokenizer.ggml.*` metadata) as a `tokenizers` BPE.

A GGUF carries the vocabulary, the merges, each token's type and the special ids, plus a `pre` name
for the pre-tokenizer llama.cpp applies before BPE. The pre-tokenizers below follow llama.cpp's
`llama-vocab.cpp`: the `smollm` family splits every digit off first (`\\p{N}`) and then applies the
GPT-2 regex, which is what SmolLM2's own `tokenizer.json` does (`Digits(individual_digits=True)`
then `ByteLevel`).
"""

from __future__ import annotations

from typing import Any, Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from neo_jax.errors import UserError
from neo_jax.tokenizer.text import HFTokenizer

CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL: `<|im_start|>` and the like
USER_DEFINED_TOKEN_TYPE = 4  # added tokens matched whole in text, not special

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


# `tokenizer.ggml.pre` -> pre-tokenizer, grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "refact": _digits_then_gpt2,
    "codeshell": _digits_then_gpt2,
    "llama-bpe": _llama3,
    "llama3": _llama3,
}


def _merge_pairs(merges: list[str], source: str) -> list[tuple[str, str]]:
    pairs = []
    for index, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise UserError(f"{source}: tokenizer.ggml.merges[{index}] = {merge!r} is not two tokens")
        pairs.append((parts[0], parts[1]))
    return pairs


def tokenizer_from_gguf_metadata(metadata: dict[str, Any], source: str) -> HFTokenizer:
    """The byte-level BPE tokenizer stored in a GGUF's metadata; `source` names the file in errors."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in metadata:
        raise UserError(f"{source}: the GGUF file holds no tokenizer (no tokenizer.ggml.model / tokens)")
    if model != "gpt2":
        raise UserError(f"{source}: GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: {sorted(PRE_TOKENIZERS)})")

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise UserError(f"{source}: tokenizer.ggml.tokens repeats {len(tokens) - len(vocab)} tokens")
    merges = _merge_pairs(metadata.get("tokenizer.ggml.merges", []), source)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()

    # Control and user-defined tokens are matched whole in text (as llama.cpp does), not cut by BPE.
    token_types = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, token_types) if kind == CONTROL_TOKEN_TYPE])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, token_types) if kind == USER_DEFINED_TOKEN_TYPE])

    def special_id(key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    return HFTokenizer(tokenizer, special_id("bos_token_id"), special_id("eos_token_id"),
                       special_id("padding_token_id"))
