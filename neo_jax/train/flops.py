"""Model FLOPs for MFU: what one training token costs, and what this machine can do.

MFU is achieved model FLOP/s over the FLOP/s of a large matrix product measured once
on this machine's local devices (not a datasheet figure), so the number means the
same thing on a CPU, a GPU and a TPU slice.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def matmul_params(params: dict) -> int:
    """Weights of a decoder's parameter dict (arrays or shape structs) used in matrix products:
    every matrix except the tables read by lookup (an untied input embedding, the item-identity table)."""
    flat = traverse_util.flatten_dict(params)
    lookups = {("item_embed",)} | ({("embed_tokens",)} if ("lm_head",) in flat else set())
    return sum(math.prod(v.shape) for k, v in flat.items() if len(v.shape) >= 2 and k not in lookups)


def train_flops_per_token(matmul_weights: int, num_layers: int, num_heads: int, head_dim: int,
                          seq_len: int) -> float:
    """Model FLOPs of one training token (forward + backward = 3x forward).

    `matmul_weights` (see `matmul_params`) counts every weight used in a matrix product (projections, MLP,
    output head) but not an embedding table read by lookup. Causal attention reads
    on average half the sequence: forward QK^T and AV cost 2 * 2 * seq_len/2 * head_dim
    per head and layer.
    """
    dense = 6.0 * matmul_weights
    attention = 3.0 * 2.0 * num_layers * num_heads * head_dim * seq_len
    return dense + attention


@functools.cache
def measured_peak_flops(dtype_name: str = "float32") -> float:
    """`measure_peak_flops`, once per process and dtype."""
    return measure_peak_flops(dtype_name)


def measure_peak_flops(dtype_name: str = "float32") -> float:
    """FLOP/s of this process's devices together on a large `jnp.dot` (best of a few runs).

    Each local device multiplies its own `[n, n] x [n, n]` block of a batch-sharded product; on CPU
    (where emulated devices share the cores) n is smaller so the measurement stays quick. A machine
    busy with other work measures low; the trainer's `_Throughput` measures again when steps outrun it.
    """
    devices = jax.local_devices()
    n = 1024 if devices[0].platform == "cpu" else 8192
    mesh = jax.sharding.Mesh(np.array(devices), ("devices",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    dtype = jnp.dtype(dtype_name)
    lhs = jax.device_put(jnp.ones((len(devices) * n, n), dtype), rows)  # [devices * n, n]
    rhs = jax.device_put(jnp.ones((n, n), dtype), replicated)  # [n, n]
    product = jax.jit(jnp.dot, out_shardings=rows)
    product(lhs, rhs).block_until_ready()  # compile
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        product(lhs, rhs).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * len(devices) * n**3 / best


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over measured peak FLOP/s."""
    return tokens_per_s * flops_per_token / peak_flops
