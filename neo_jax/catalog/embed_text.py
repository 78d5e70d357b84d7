"""Item embeddings from text.

Two encoders:
- `hashed_tfidf_embeddings` (built in, no model needed): the text is lower-cased and split
  into words; its features are word unigrams and bigrams and the character trigrams of
  each word (with `<` `>` word boundaries), each hashed (CRC-32) into `hash_buckets`
  buckets. A feature's weight is TF-IDF, `(1 + log count) * (log((1 + N) / (1 + df)) + 1)`
  over the N texts given. The sparse vector is projected to `dim` dimensions by a seeded
  Gaussian random projection (row b of the projection is drawn from `fold_in(key, b)`,
  so a bucket's row does not depend on the catalog) and L2-normalised. Cosine similarity
  of the outputs approximates that of the TF-IDF vectors (Johnson-Lindenstrauss).
- `backbone_embeddings`: mean-pooled final hidden states of a `neo_jax.model.Decoder`
  over each text's tokens (the pre-trained backbone as a text encoder), L2-normalised.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections import Counter
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from neo_jax.checkpoint import TOKENIZER, load_model
from neo_jax.config import MeshConfig
from neo_jax.errors import UserError
from neo_jax.model.decoder import Decoder
from neo_jax.sharding import make_mesh
from neo_jax.tokenizer.text import TextTokenizer, load_text_tokenizer

_WORD = re.compile(r"\w+", re.UNICODE)
_PROJECTION_CHUNK = 1 << 15  # sparse entries per step of the projection scan


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    dim: int = 256  # output width
    hash_buckets: int = 1 << 20
    char_ngram: int = 3  # character n-grams of each word (0: none)


def text_features(text: str, char_ngram: int) -> list[str]:
    """The hashed features of one text: word unigrams, word bigrams, character n-grams of words."""
    words = _WORD.findall(text.lower())
    features = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
    if char_ngram > 0:
        for word in words:
            padded = f"<{word}>"
            features += [f"c:{padded[i:i + char_ngram]}" for i in range(max(1, len(padded) - char_ngram + 1))]
    return features


def sparse_tfidf(texts: Sequence[str], config: TextEncoderConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF-IDF of hashed features as COO entries: `(text index [nnz], bucket [nnz], weight [nnz])`."""
    rows, buckets, counts = [], [], []
    for row, text in enumerate(texts):
        bag = Counter(zlib.crc32(f.encode("utf-8")) % config.hash_buckets for f in text_features(text, config.char_ngram))
        rows.extend([row] * len(bag))
        buckets.extend(bag.keys())
        counts.extend(bag.values())
    rows, buckets = np.asarray(rows, np.int32), np.asarray(buckets, np.int64)  # [nnz]
    document_frequency = np.bincount(buckets, minlength=config.hash_buckets)  # [hash_buckets]
    idf = np.log((1 + len(texts)) / (1 + document_frequency[buckets])) + 1  # [nnz]
    weights = (1 + np.log(np.asarray(counts, np.float64))) * idf  # [nnz]
    return rows, buckets, weights.astype(np.float32)


@functools.partial(jax.jit, static_argnames=("n_texts", "dim"))
def _project(rows, local_buckets, weights, bucket_ids, key, n_texts: int, dim: int) -> jax.Array:
    """`[n_texts, dim]` random projection of the sparse entries `[chunks, chunk]`, then L2-normalised."""
    projection = jax.vmap(lambda b: jax.random.normal(jax.random.fold_in(key, b), (dim,)))(bucket_ids)  # [u, dim]
    projection = projection / jnp.sqrt(dim)

    def add_chunk(total, chunk):
        chunk_rows, chunk_buckets, chunk_weights = chunk  # [chunk] each
        contribution = chunk_weights[:, None] * projection[chunk_buckets]  # [chunk, dim]
        return total + jax.ops.segment_sum(contribution, chunk_rows, num_segments=n_texts), None

    total, _ = jax.lax.scan(add_chunk, jnp.zeros((n_texts, dim), jnp.float32), (rows, local_buckets, weights))
    norms = jnp.linalg.norm(total, axis=-1, keepdims=True)  # [n_texts, 1]
    return total / jnp.maximum(norms, 1e-12)


def hashed_tfidf_embeddings(texts: Sequence[str], seed: int, config: TextEncoderConfig = TextEncoderConfig()) -> np.ndarray:
    """`[len(texts), config.dim]` float32 L2-normalised embeddings (a text with no words maps to zeros)."""
    if config.dim < 1 or config.hash_buckets < 1:
        raise UserError(f"text encoder: dim and hash_buckets must be positive, got {config.dim}, {config.hash_buckets}")
    rows, buckets, weights = sparse_tfidf(texts, config)
    bucket_ids, local = np.unique(buckets, return_inverse=True)  # [u], [nnz]
    pad = -rows.size % _PROJECTION_CHUNK  # zero-weight entries fill the last chunk
    chunked = [np.pad(a, (0, pad)).reshape(-1, _PROJECTION_CHUNK)
               for a in (rows, local.astype(np.int32), weights)]  # [chunks, chunk] each
    key = jax.random.key(seed)
    return np.asarray(_project(*chunked, jnp.asarray(bucket_ids, jnp.uint32), key, n_texts=len(texts), dim=config.dim))


@dataclasses.dataclass(frozen=True)
class BackboneEncoderConfig:
    checkpoint: str | None = None  # a `neo_jax` model checkpoint directory with a `tokenizer/`
    batch_size: int = 16
    max_len: int = 64  # tokens kept per text


@nnx.jit
def _mean_pooled(model: Decoder, tokens: jax.Array, segments: jax.Array) -> jax.Array:
    """`[batch, hidden]` L2-normalised mean of the hidden states where `segments` `[batch, len]` > 0."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)  # [batch, len]
    hidden, _ = model.hidden_states(tokens, positions, segments)  # [batch, len, hidden]
    mask = (segments > 0).astype(jnp.float32)[..., None]  # [batch, len, 1]
    mean = jnp.sum(hidden.astype(jnp.float32) * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1.0)  # [batch, hidden]
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def backbone_embeddings(model: Decoder, tokenizer: TextTokenizer, texts: Sequence[str], batch_size: int, max_len: int) -> np.ndarray:
    """`[len(texts), hidden]` float32: mean of the final hidden states over each text's tokens, L2-normalised.

    Texts are right-padded to `max_len` in fixed-size batches (one compilation); padding has
    segment id 0, so it neither attends nor is attended to, and is left out of the mean.
    """
    outputs = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start: start + batch_size]
        tokens = np.zeros((batch_size, max_len), np.int32)  # [batch, len]
        segments = np.zeros((batch_size, max_len), np.int32)  # [batch, len]
        for i, text in enumerate(batch):
            ids = ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(text)
            ids = ids[:max_len]
            tokens[i, : len(ids)] = ids
            segments[i, : len(ids)] = 1
        outputs.append(np.asarray(_mean_pooled(model, jnp.asarray(tokens), jnp.asarray(segments)))[: len(batch)])
    return np.concatenate(outputs)


def load_backbone(checkpoint: str | Path) -> tuple[Decoder, TextTokenizer]:
    """The model and text tokenizer of a checkpoint directory; the model is sharded over all devices."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / TOKENIZER).is_dir():
        raise UserError(f"{checkpoint}: the checkpoint has no {TOKENIZER}/ directory to encode item text with")
    return load_model(checkpoint, make_mesh(MeshConfig())), load_text_tokenizer(checkpoint / TOKENIZER)
