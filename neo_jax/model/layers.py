"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Parameters are float32 `nnx.Param`s carrying `logical_axes` metadata (see
`neo_jax.sharding`); each layer casts them to the compute dtype when it runs.
Kernels are stored as `[in, out...]` (a Hugging Face `Linear.weight` transposed, with
the head dimensions split out): q `[embed, heads, head_dim]`, o `[heads, head_dim, embed]`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from neo_jax.model.config import ModelConfig

# Score of a masked (query, key) pair: finite, so a row with no visible key (a padding
# query) gives a uniform softmax instead of NaN.
_MASKED_SCORE = -1e30


def make_param(rngs: nnx.Rngs, initializer, shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> nnx.Param:
    return nnx.Param(initializer(rngs.params(), shape, jnp.float32), logical_axes=logical_axes)


class RMSNorm(nnx.Module):
    """`x / sqrt(mean(x^2) + eps) * scale`, normalised in float32 (as Hugging Face does)."""

    def __init__(self, dim: int, eps: float, logical_axis: str | None, rngs: nnx.Rngs):
        self.scale = make_param(rngs, nnx.initializers.ones, (dim,), (logical_axis,))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:  # [..., dim]
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies, with Llama 3 scaling if configured."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float32) / np.float32(config.head_dim)
    inv_freq = (1.0 / np.float32(config.rope_theta) ** exponents).astype(np.float32)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths divided by `factor`, short ones kept, a smooth blend between.
    wavelen = 2 * np.pi / inv_freq
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate `x` `[batch, len, heads, head_dim]` by `positions` `[batch, len]` (rotate-half layout)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, len, head_dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [batch, len, 1, head_dim]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin


def attention_mask(query_segments: jax.Array, query_slots: jax.Array, key_segments: jax.Array, key_slots: jax.Array,
                   query_branches: jax.Array | None = None, key_branches: jax.Array | None = None) -> jax.Array:
    """`[batch, queries, keys]` bool: the key is at or before the query, in the same segment, and not padding.

    Segment id 0 marks padding (and empty cache slots); packed examples carry distinct ids
    so attention never crosses them. Slots are indices in the key sequence (cache slots).
    With branches (`[batch, queries]`, `[batch, keys]`), a segment is a tree: branch 0 its trunk, and a
    query of branch b > 0 sees the trunk and its own branch only (several completions of one prompt
    in one row, `neo_jax.tasks.preference`).
    """
    causal = key_slots[:, None, :] <= query_slots[:, :, None]  # [batch, queries, keys]
    same_segment = key_segments[:, None, :] == query_segments[:, :, None]
    visible = causal & same_segment & (key_segments[:, None, :] != 0)
    if query_branches is None:
        return visible
    same_branch = (key_branches[:, None, :] == 0) | (key_branches[:, None, :] == query_branches[:, :, None])
    return visible & same_branch


@struct.dataclass
class LowRankKernel:
    """A frozen kernel with its low-rank adapter (LoRA, Hu et al. 2021), in place of the kernel's value
    while a LoRA stage trains (`neo_jax.train.stages.StagePlan.adapted_params`). `project` applies it
    as `x @ kernel + scale * (x @ a) @ b`: the gradient reaches `a` and `b` through rank-sized
    products, and no kernel-sized array (`a @ b` or a weight gradient) is ever formed."""

    kernel: jax.Array  # [in..., out...] float32
    a: jax.Array  # [in, rank], `in` the product of the kernel's first `input_axes` sizes
    b: jax.Array  # [rank, out]
    scale: float = struct.field(pytree_node=False)  # alpha / rank
    input_axes: int = struct.field(pytree_node=False)

    def merged(self) -> jax.Array:
        """`kernel + scale * a @ b` in the kernel's shape: the adapted kernel as one array."""
        return self.kernel + self.scale * (self.a @ self.b).reshape(self.kernel.shape)


def project(x: jax.Array, kernel: nnx.Param, equation: str) -> jax.Array:
    """`einsum(equation, x, kernel)` in `x`'s dtype; a `LowRankKernel` adds its adapter's product."""
    value = kernel.get_value()
    if not isinstance(value, LowRankKernel):
        return jnp.einsum(equation, x, value.astype(x.dtype))
    out = jnp.einsum(equation, x, value.kernel.astype(x.dtype))  # [..., out...]
    inputs = x.reshape(*x.shape[:x.ndim - value.input_axes], -1)  # [..., in]
    low_rank = (inputs @ value.a.astype(x.dtype)) @ value.b.astype(x.dtype)  # [..., out]
    return out + (value.scale * low_rank).reshape(out.shape)


@struct.dataclass
class Dropout:
    """Training-time dropout: each call site `site` draws its own mask from `key`.

    Masks keep a value with probability `1 - rate` and scale it by `1 / (1 - rate)`, so
    expectations are unchanged; a model called without a `Dropout` is deterministic.
    """

    key: jax.Array  # a PRNG key, one per step (and micro-batch)
    rate: float = struct.field(pytree_node=False, default=0.0)

    def __call__(self, x: jax.Array, site: int) -> jax.Array:
        if self.rate == 0.0:
            return x
        keep = jax.random.bernoulli(jax.random.fold_in(self.key, site), 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)


@struct.dataclass
class PromptKeys:
    """One layer's keys and values of a prompt shared by several sequences (see `SharedPromptCache`)."""

    keys: jax.Array  # [requests, prompt_len, kv_heads, head_dim]
    values: jax.Array  # [requests, prompt_len, kv_heads, head_dim]
    mask: jax.Array  # [requests, prompt_len] bool: a prompt token (not padding)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v/o biases and q/k RMSNorm."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, h, k, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        normal, zeros = nnx.initializers.normal(config.initializer_range), nnx.initializers.zeros
        self.q_kernel = make_param(rngs, normal, (d, h, hd), ("embed", "heads", "head_dim"))
        self.k_kernel = make_param(rngs, normal, (d, k, hd), ("embed", "kv_heads", "head_dim"))
        self.v_kernel = make_param(rngs, normal, (d, k, hd), ("embed", "kv_heads", "head_dim"))
        self.o_kernel = make_param(rngs, normal, (h, hd, d), ("heads", "head_dim", "embed"))
        qkv_bias = config.qkv_bias
        self.q_bias = make_param(rngs, zeros, (h, hd), ("heads", "head_dim")) if qkv_bias else None
        self.k_bias = make_param(rngs, zeros, (k, hd), ("kv_heads", "head_dim")) if qkv_bias else None
        self.v_bias = make_param(rngs, zeros, (k, hd), ("kv_heads", "head_dim")) if qkv_bias else None
        self.o_bias = make_param(rngs, zeros, (d,), ("embed",)) if config.o_bias else None
        self.q_norm = RMSNorm(hd, config.rms_norm_eps, "head_dim", rngs) if config.qk_norm else None
        self.k_norm = RMSNorm(hd, config.rms_norm_eps, "head_dim", rngs) if config.qk_norm else None
        self.num_kv_heads = k
        self.scale = hd ** -0.5
        self.implementation = config.attention
        self.query_chunk = config.attention_chunk

    def _project(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
        out = project(x, kernel, "btd,dhk->bthk")  # [batch, len, heads, head_dim]
        return out if bias is None else out + bias[...].astype(x.dtype)

    def project_kv(self, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
        """Keys (rotated) and values `[batch, len, kv_heads, head_dim]` of the new tokens."""
        keys = self._project(x, self.k_kernel, self.k_bias)
        if self.k_norm is not None:
            keys = self.k_norm(keys)
        return apply_rope(keys, positions, inv_freq), self._project(x, self.v_kernel, self.v_bias)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, keys: jax.Array,
                 values: jax.Array, mask: jax.Array, prompt: PromptKeys | None = None) -> jax.Array:
        """Attend from `x` `[batch, len, embed]` to `keys`/`values` `[batch, keys, kv_heads, head_dim]`.

        `mask` is `[batch, len, keys]` (see `attention_mask`). With `prompt`, the rows of `x` are
        `width` sequences per request (`batch = requests * width`) that also attend to their
        request's shared prompt keys, which come before every key of their own; that joint softmax
        over two key sets is always our einsums. Otherwise the config's `attention` chooses them or
        `jax.nn.dot_product_attention` (a query with no visible key gets a uniform softmax either way),
        over `attention_chunk` queries at a time where that is set and shorter than `len`.
        """
        queries = self._project(x, self.q_kernel, self.q_bias)  # [batch, len, heads, head_dim]
        if self.q_norm is not None:
            queries = self.q_norm(queries)
        queries = apply_rope(queries, positions, inv_freq)
        keys, values = keys.astype(x.dtype), values.astype(x.dtype)
        if prompt is not None:
            return self._output(self._attend_with_prompt(queries, keys, values, mask, prompt))
        if 0 < self.query_chunk < queries.shape[1]:
            return self._output(self._attend_in_chunks(queries, keys, values, mask))
        return self._output(self._attend(queries, keys, values, mask))

    def _attend(self, queries: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array) -> jax.Array:
        """Softmax attention `[batch, len, heads, head_dim]` of `queries` over `keys`, as `mask` allows."""
        if self.implementation != "einsum":
            return jax.nn.dot_product_attention(queries, keys, values, mask=mask[:, None, :, :], scale=self.scale,
                                                implementation=self.implementation)
        b, t, h, hd = queries.shape
        grouped = queries.reshape(b, t, self.num_kv_heads, h // self.num_kv_heads, hd)  # [b, t, kv, group, hd]
        scores = jnp.einsum("btkgd,bskd->bkgts", grouped, keys,
                            preferred_element_type=jnp.float32) * self.scale  # [b, kv, group, t, keys]
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED_SCORE)
        weights = jax.nn.softmax(scores, axis=-1).astype(queries.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", weights, values).reshape(b, t, h, hd)

    def _attend_in_chunks(self, queries: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array
                          ) -> jax.Array:
        """`_attend`, `query_chunk` queries at a time in a `lax.map` under `jax.checkpoint`: the scores
        of one chunk (`[batch, heads, chunk, keys]`) exist at once, forward and backward."""
        b, t, h, hd = queries.shape
        chunk = self.query_chunk
        count = -(-t // chunk)
        pad = count * chunk - t  # padded queries see no key (a uniform softmax), and are dropped
        chunked_queries = jnp.pad(queries, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, count, chunk, h, hd)
        chunked_mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(b, count, chunk, mask.shape[-1])
        attend = jax.checkpoint(lambda q, m: self._attend(q, keys, values, m))
        attended = jax.lax.map(lambda qm: attend(*qm), (chunked_queries.swapaxes(0, 1), chunked_mask.swapaxes(0, 1)))
        return attended.swapaxes(0, 1).reshape(b, count * chunk, h, hd)[:, :t]  # [batch, len, heads, head_dim]

    def _attend_with_prompt(self, queries: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array,
                            prompt: PromptKeys) -> jax.Array:
        """`_attend` over the request's shared prompt keys and the sequence's own keys, one softmax."""
        b, t, h, hd = queries.shape
        grouped = queries.reshape(b, t, self.num_kv_heads, h // self.num_kv_heads, hd)  # [b, t, kv, group, hd]
        scores = jnp.einsum("btkgd,bskd->bkgts", grouped, keys,
                            preferred_element_type=jnp.float32) * self.scale  # [b, kv, group, t, keys]
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED_SCORE)
        requests, width = prompt.keys.shape[0], b // prompt.keys.shape[0]
        by_request = grouped.reshape(requests, width, *grouped.shape[1:])  # [r, width, t, kv, group, hd]
        prompt_scores = jnp.einsum("rwtkgd,rskd->rwkgts", by_request, prompt.keys.astype(queries.dtype),
                                   preferred_element_type=jnp.float32) * self.scale  # [r, w, kv, g, t, p]
        prompt_scores = jnp.where(prompt.mask[:, None, None, None, None, :], prompt_scores, _MASKED_SCORE)
        prompt_len = prompt_scores.shape[-1]
        joint = jnp.concatenate([prompt_scores.reshape(b, *prompt_scores.shape[2:]), scores], axis=-1)
        weights = jax.nn.softmax(joint, axis=-1).astype(queries.dtype)  # [b, kv, group, t, prompt_len + keys]
        prompt_weights = weights[..., :prompt_len].reshape(requests, width, *weights.shape[1:-1], prompt_len)
        attended = (jnp.einsum("rwkgts,rskd->rwtkgd", prompt_weights, prompt.values.astype(queries.dtype))
                    .reshape(b, t, *grouped.shape[2:4], hd)
                    + jnp.einsum("bkgts,bskd->btkgd", weights[..., prompt_len:], values))
        return attended.reshape(b, t, h, hd)

    def _output(self, attended: jax.Array) -> jax.Array:
        """The output projection of `attended` `[batch, len, heads, head_dim]` -> `[batch, len, embed]`."""
        out = project(attended, self.o_kernel, "bthk,hkd->btd")
        return out if self.o_bias is None else out + self.o_bias[...].astype(attended.dtype)


class SwiGLU(nnx.Module):
    """`down(silu(gate(x)) * up(x))`."""

    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        normal = nnx.initializers.normal(config.initializer_range)
        self.gate_kernel = make_param(rngs, normal, (d, f), ("embed", "mlp"))
        self.up_kernel = make_param(rngs, normal, (d, f), ("embed", "mlp"))
        self.down_kernel = make_param(rngs, normal, (f, d), ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:  # [batch, len, embed]
        gate = project(x, self.gate_kernel, "btd,df->btf")  # [batch, len, mlp]
        up = project(x, self.up_kernel, "btd,df->btf")
        return project(jax.nn.silu(gate) * up, self.down_kernel, "btf,fd->btd")
