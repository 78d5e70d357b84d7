"""`ModelConfig`: the decoder's architecture, read from and written back to a Hugging Face `config.json`.

Supported architectures (the decoder is one code path with switches):
- `LlamaForCausalLM`: RMSNorm, RoPE (optionally Llama 3 `rope_scaling`), GQA, SwiGLU;
  `attention_bias` adds biases to q/k/v/o.
- `Qwen2ForCausalLM`: Llama plus biases on q/k/v (never on o).
- `Qwen3ForCausalLM`: Llama plus RMSNorm on each query/key head before RoPE; `head_dim`
  may differ from `hidden_size / num_attention_heads`.

Both Hugging Face rope spellings are read: the transformers 5 `rope_parameters`
mapping and the older top-level `rope_theta` plus `rope_scaling`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from neo_jax.errors import UserError
from neo_jax.json_file import read_json_object

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
DTYPES = ("float32", "bfloat16")
# How attention is computed (`neo_jax.model.layers.Attention`): "einsum", our own grouped einsums
# with a float32 softmax; "xla" or "cudnn", `jax.nn.dot_product_attention` with that implementation
# (cuDNN's fused kernel needs a GPU and bfloat16/float16). On a TPU the fused kernel is Pallas splash
# attention (`jax.experimental.pallas.ops.tpu.splash_attention`), which takes the same segment ids.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")
# What the backward pass of a layer keeps from its forward pass (`jax.checkpoint_policies`):
# "none" keeps everything (no rematerialisation), "full" keeps only the layer's input and
# recomputes the rest, "dots" keeps every matmul output, "dots_no_batch" the matmuls without
# batch dimensions (the projections, not attention's scores).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3 frequency-dependent RoPE scaling (Hugging Face `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only model.

    `vocab_size` is the number of rows of the input embedding (and output head). After a
    vocabulary extension it is the padded size, and `num_real_tokens` (tokens that may be
    predicted) is smaller: the logits of rows `num_real_tokens..vocab_size-1` are masked.
    `dtype` is the compute dtype; parameters are always stored in float32. `attention`,
    `attention_chunk`, `remat` and `scan_layers` say how the forward pass runs, not what it computes (the same function within
    float rounding): see `ATTENTION_IMPLEMENTATIONS`, `REMAT_POLICIES`, and `Decoder` for the scan.
    """

    architecture: Literal["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_real_tokens: int | None = None
    dtype: Literal["float32", "bfloat16"] = "float32"
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    attention: Literal["einsum", "xla", "cudnn"] = "einsum"
    remat: Literal["none", "full", "dots", "dots_no_batch"] = "none"
    scan_layers: bool = False  # run the layers of a full forward pass as one `lax.scan`
    attention_chunk: int = 0  # queries attended at a time (`Attention._attend_in_chunks`); 0: all at once
    # Rows of the item-identity table (`neo_jax.catalog.item_ids.table_rows`: the catalog's items and
    # row 0, no item, padded); 0: no table. Not a Hugging Face setting: such a model does not export.
    num_item_ids: int = 0

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"architecture {self.architecture!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.dtype not in DTYPES:
            raise UserError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention {self.attention!r} is not supported; choose one of "
                            f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat {self.remat!r} is not supported; choose one of {', '.join(REMAT_POLICIES)}")
        if self.attention_chunk < 0:
            raise UserError(f"attention_chunk must be non-negative, got {self.attention_chunk}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise UserError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.num_item_ids < 0:
            raise UserError(f"num_item_ids must be 0 (no item-identity table) or positive, got {self.num_item_ids}")
        if self.num_real_tokens is not None and not 0 < self.num_real_tokens <= self.vocab_size:
            raise UserError(f"num_real_tokens {self.num_real_tokens} must lie in 1..vocab_size ({self.vocab_size})")

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q/k/v projections: always for Qwen2, else `attention_bias`."""
        return self.architecture == "Qwen2ForCausalLM" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Bias on the output projection: `attention_bias`, never for Qwen2."""
        return self.architecture != "Qwen2ForCausalLM" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """RMSNorm over each query and key head before RoPE (Qwen3)."""
        return self.architecture == "Qwen3ForCausalLM"

    @property
    def predictable_tokens(self) -> int:
        """Tokens the output head may predict (the rest are padding rows)."""
        return self.vocab_size if self.num_real_tokens is None else self.num_real_tokens

    # -- Hugging Face config.json -------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str = "float32", source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face `config.json` mapping; `source` names the file in errors."""
        architectures = hf.get("architectures") or []
        architecture = architectures[0] if architectures else None
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"{source}: architecture {architecture!r} is not supported; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        try:
            if hf.get("hidden_act", "silu") != "silu":
                raise UserError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
            if hf.get("mlp_bias", False):
                raise UserError(f"{source}: mlp_bias=true is not supported")
            if hf.get("use_sliding_window", False):
                raise UserError(f"{source}: use_sliding_window=true is not supported")
            num_heads = int(hf["num_attention_heads"])
            hidden = int(hf["hidden_size"])
            theta, scaling = _read_rope(hf, source)
            return cls(
                architecture=architecture,
                vocab_size=int(hf["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(hf["intermediate_size"]),
                num_layers=int(hf["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
                head_dim=int(hf.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                dtype=dtype,
                initializer_range=float(hf.get("initializer_range", 0.02)),
                bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_int_or_tuple(hf.get("eos_token_id")),
            )
        except KeyError as e:
            raise UserError(f"{source}: missing setting {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UserError(f"{source}: invalid setting ({e})") from None

    def to_hf(self) -> dict[str, Any]:
        """A `config.json` mapping transformers loads; `vocab_size` is the embedding's row count.

        Rope settings use the older `rope_theta`/`rope_scaling` spelling, which transformers 4
        and 5 (and most other readers) all understand.
        """
        rope_scaling = None if self.rope_scaling is None else {"rope_type": "llama3",
                                                               **dataclasses.asdict(self.rope_scaling)}
        return {
            "architectures": [self.architecture],
            "model_type": _MODEL_TYPES[self.architecture],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "attention_bias": self.attention_bias,
            "dtype": "float32",
        }

    # -- our own model_config.json ----------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = Llama3RopeScaling(**d["rope_scaling"])
        d["eos_token_id"] = _int_or_tuple(d.get("eos_token_id"))
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        values = read_json_object(path)
        try:
            return cls.from_dict(values)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: not a valid model config ({e})") from None


def _read_rope(hf: dict[str, Any], source: str) -> tuple[float, Llama3RopeScaling | None]:
    """`(rope_theta, llama3 scaling or None)` from either Hugging Face spelling."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UserError(f"{source}: rope type {rope_type!r} is not supported (only 'default' and 'llama3')")
    return theta, Llama3RopeScaling(
        factor=float(params["factor"]),
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )


def _int_or_tuple(token_ids: int | list[int] | None) -> int | tuple[int, ...] | None:
    """Hugging Face allows one eos id or a list; a tuple keeps the config hashable."""
    return tuple(token_ids) if isinstance(token_ids, list) else token_ids
