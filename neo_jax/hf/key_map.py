"""Our parameter paths <-> Hugging Face tensor names, with the layout change between them.

A Hugging Face `Linear.weight` is `[out, in]`; our kernels are `[in..., out...]` with the
head dimensions split out (q `[embed, heads, head_dim]`, o `[heads, head_dim, embed]`), so
such tensors are transposed and reshaped. Per-head biases are stored flat by Hugging Face.
Import and export both read this one table.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """How one of our parameters is stored in a Hugging Face checkpoint."""

    name: str
    linear_in_dims: int = 0  # > 0: a `[out, in]` Linear weight whose `in` is our first `linear_in_dims` dims
    flat: bool = False  # stored as one dimension (per-head biases)

    def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The Hugging Face shape of a parameter whose shape is `shape` in our layout."""
        if self.linear_in_dims:
            n = self.linear_in_dims
            return math.prod(shape[n:]), math.prod(shape[:n])
        return (math.prod(shape),) if self.flat else tuple(shape)

    def to_ours(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        return (tensor.T if self.linear_in_dims else tensor).reshape(shape)

    def to_hf(self, value: np.ndarray) -> np.ndarray:
        if self.linear_in_dims:
            return value.reshape(math.prod(value.shape[: self.linear_in_dims]), -1).T
        return value.reshape(self.hf_shape(value.shape))


_TOP_LEVEL = {
    ("embed_tokens",): HFTensor("model.embed_tokens.weight"),
    ("lm_head",): HFTensor("lm_head.weight"),
    ("final_norm", "scale"): HFTensor("model.norm.weight"),
}
# path inside `layers[i]` -> name inside `model.layers.{i}`
_PER_LAYER = {
    ("input_norm", "scale"): HFTensor("input_layernorm.weight"),
    ("post_attention_norm", "scale"): HFTensor("post_attention_layernorm.weight"),
    ("attn", "q_kernel"): HFTensor("self_attn.q_proj.weight", linear_in_dims=1),
    ("attn", "k_kernel"): HFTensor("self_attn.k_proj.weight", linear_in_dims=1),
    ("attn", "v_kernel"): HFTensor("self_attn.v_proj.weight", linear_in_dims=1),
    ("attn", "o_kernel"): HFTensor("self_attn.o_proj.weight", linear_in_dims=2),
    ("attn", "q_bias"): HFTensor("self_attn.q_proj.bias", flat=True),
    ("attn", "k_bias"): HFTensor("self_attn.k_proj.bias", flat=True),
    ("attn", "v_bias"): HFTensor("self_attn.v_proj.bias", flat=True),
    ("attn", "o_bias"): HFTensor("self_attn.o_proj.bias"),
    ("attn", "q_norm", "scale"): HFTensor("self_attn.q_norm.weight"),
    ("attn", "k_norm", "scale"): HFTensor("self_attn.k_norm.weight"),
    ("mlp", "gate_kernel"): HFTensor("mlp.gate_proj.weight", linear_in_dims=1),
    ("mlp", "up_kernel"): HFTensor("mlp.up_proj.weight", linear_in_dims=1),
    ("mlp", "down_kernel"): HFTensor("mlp.down_proj.weight", linear_in_dims=1),
}


def hf_tensor(path: tuple) -> HFTensor:
    """The Hugging Face tensor of the parameter at `path` (as `nnx.to_flat_state` names it)."""
    if path[0] == "layers":
        inner = _PER_LAYER[tuple(path[2:])]
        return dataclasses.replace(inner, name=f"model.layers.{path[1]}.{inner.name}")
    return _TOP_LEVEL[tuple(path)]
