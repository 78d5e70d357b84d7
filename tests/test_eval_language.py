"""The language-side measures: word F1, the type and format checks of an unconstrained beam,
re-headed prompts, and the perplexity of plain text (against a hand computation)."""

import math

import numpy as np
import pytest

from neo_jax.decode.generate import GeneratedItem, GeneratedText
from neo_jax.errors import UserError
from neo_jax.eval.language import check_beam, outside_sids, perplexity, read_text_lines, with_format, word_f1
from neo_jax.model.config import ModelConfig
from neo_jax.tasks.builders import TaskExample

SID = "[SID]<product_0_3><product_1_1>[/SID]"
PRODUCT, BRAND = GeneratedItem("p3", "product", None), GeneratedItem("b1", "brand", None)


def beam(raw: str, items) -> GeneratedText:
    return GeneratedText(raw, raw, tuple(items), score=0.0, log_prob=0.0, finished=True)


def test_word_f1_matches_hand_values():
    assert word_f1("Red lipstick", "red lipstick") == 1.0
    # 2 common words; precision 2/3, recall 2/4 -> F1 = 2 * (2/3 * 1/2) / (2/3 + 1/2) = 4/7
    assert word_f1("red matte lipstick", "red lipstick by brand") == pytest.approx(4 / 7)
    assert word_f1("shampoo", "lipstick") == 0.0
    assert word_f1("", "") == 1.0 and word_f1("", "lipstick") == 0.0


def test_outside_sids_keeps_words_and_flags_stray_codes():
    assert outside_sids(f"{SID} Red lipstick") == ("Red lipstick", False)
    assert outside_sids(f"{SID}{SID}") == ("", False)
    assert outside_sids("Red <product_0_3> lipstick") == ("Red lipstick", True)
    assert outside_sids("Red [SID]<product_0_3>") == ("Red", True)  # a span cut before its end


@pytest.mark.parametrize("raw, items, output_format, asked_type, asked_format", [
    (SID, [PRODUCT], "ids", True, True),
    (SID, [BRAND], "ids", False, True),  # the format asked, the wrong type
    (SID, [None], "ids", False, True),  # a SID naming no catalog item is not of the asked type
    (f"{SID}{SID}", [PRODUCT, PRODUCT], "ids", True, False),  # two items where one was asked
    (f"{SID} Red lipstick", [PRODUCT], "ids", True, False),
    ("Red lipstick", [], "ids", False, False),
    ("Red lipstick", [], "text", None, True),  # a text answer names no item: no type to check
    (SID, [PRODUCT], "text", None, False),
    ("Red <product_0_3>", [], "text", None, False),
    (f"{SID} Red lipstick", [PRODUCT], "mixed", True, True),
    (SID, [PRODUCT], "mixed", True, False),
    (f"{SID} and {SID} both", [PRODUCT, BRAND], "mixed", False, True),
])
def test_beam_checks_follow_the_asked_type_and_format(raw, items, output_format, asked_type, asked_format):
    check = check_beam(beam(raw, items), "product", output_format)
    assert (check.asked_type, check.asked_format) == (asked_type, asked_format)
    assert check.sids == len(items) and check.valid_sids == sum(i is not None for i in items)


def test_with_format_rewrites_only_the_header():
    example = TaskExample("recommend", "product", "ids", "task: recommend | type: product | format: ids\n" + SID, SID)
    assert with_format(example, "mixed") == "task: recommend | type: product | format: mixed\n" + SID


class CharTokenizer:
    """Each character its own id (0-49), BOS 50, EOS 51: enough to tokenize the test lines."""
    bos_id, eos_id = 50, 51

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 50 for c in text]


@pytest.fixture(scope="module")
def model(random_decoder):
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=128)
    return random_decoder(config, seed=3)


def hand_nll(model, ids: list[int]) -> float:
    """Sum of -log p(next token) over one unpadded sequence, by a plain forward pass."""
    import jax.numpy as jnp

    tokens = jnp.asarray([ids], jnp.int32)
    logits, _ = model(tokens, jnp.arange(len(ids), dtype=jnp.int32)[None])
    log_probs = np.asarray(logits[0] - jnp.log(jnp.sum(jnp.exp(logits[0]), axis=-1, keepdims=True)))
    return -sum(log_probs[i, ids[i + 1]] for i in range(len(ids) - 1))


def test_perplexity_is_the_exponent_of_the_mean_token_nll_whatever_the_batching(model):
    texts = ["a short line", "a much longer line of plain text, with punctuation.", "x"]
    tokenizer = CharTokenizer()
    sequences = [[50] + tokenizer.encode(t) + [51] for t in texts]
    expected = math.exp(sum(hand_nll(model, s) for s in sequences) / sum(len(s) - 1 for s in sequences))
    for batch_size in (1, 2, 4):
        result = perplexity(model, tokenizer, texts, batch_size=batch_size, length_multiple=16)
        assert result["tokens"] == sum(len(s) - 1 for s in sequences)
        assert result["perplexity"] == pytest.approx(expected, rel=1e-4)


def test_text_file_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_text_lines(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="blank.txt: no non-empty line"):
        read_text_lines(tmp_path / "blank.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt: not UTF-8"):
        read_text_lines(tmp_path / "latin1.txt")
