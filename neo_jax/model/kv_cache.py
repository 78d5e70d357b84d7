"""The key/value cache for incremental decoding.

Layout (every leaf has the batch as its leading axis, so beams are reordered with one
`jax.tree.map(lambda x: x[indices], cache)`; with beams, "batch" is `batch * beams`):

    keys[layer]    [batch, max_len, kv_heads, head_dim]   compute dtype, one array per layer
    values[layer]  [batch, max_len, kv_heads, head_dim]
    segment_ids    [batch, max_len] int32   segment of the token in each slot; 0 = padding/empty
    end            [batch] int32            slots `[0, end)` are written; the next write starts at `end`

Batched prompts are LEFT padded: a prompt of length `p` in a batch padded to `P` fills
slots `P-p .. P-1`, its pads (segment id 0) are never attended, and every row's next
token goes to slot `end` (the same for all rows). Positions are not stored: the caller
passes each token's RoPE position (`0..p-1` for the prompt, then `p, p+1, ...`).
Writing past `max_len` is not checked inside jit (XLA clamps the slice): size the cache
for prompt plus generated tokens.

`SharedPromptCache` is the layout of a decoding loop that runs several sequences (beams or
samples) per prompt: the prompt's keys and values are stored once per request and read by all
of its sequences, and only the generated tokens have a cache of their own, so reordering beams
gathers `max_new_tokens` slots per beam instead of the whole context:

    prompt     KVCache, leaves [batch, prompt_len, ...]           written by the prefill, then read only
    generated  KVCache, leaves [batch*width, max_new_tokens, ...] sequences of one request adjacent
    width      int (static)                                       sequences per request
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    keys: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    values: tuple[jax.Array, ...]  # per layer [batch, max_len, kv_heads, head_dim]
    segment_ids: jax.Array  # [batch, max_len] int32
    end: jax.Array  # [batch] int32

    @classmethod
    def create(cls, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype) -> "KVCache":
        zeros = jnp.zeros((batch, max_len, num_kv_heads, head_dim), dtype)
        return cls(keys=(zeros,) * num_layers, values=(zeros,) * num_layers,
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), end=jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def write_at(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write `new` `[batch, len, ...]` into `buffer` `[batch, max_len, ...]` at slot `start[b]` of each row."""

    def write_row(row, new_row, row_start):
        return jax.lax.dynamic_update_slice_in_dim(row, new_row.astype(row.dtype), row_start, axis=0)

    return jax.vmap(write_row)(buffer, new, start)


@struct.dataclass
class SharedPromptCache:
    prompt: KVCache  # leaves [batch, prompt_len, ...]
    generated: KVCache  # leaves [batch*width, max_new_tokens, ...]
    width: int = struct.field(pytree_node=False, default=1)

    @classmethod
    def after_prefill(cls, prompt: KVCache, max_new_tokens: int) -> "SharedPromptCache":
        """A prefilled prompt cache and an empty cache of `max_new_tokens` slots, one sequence a request."""
        keys = prompt.keys[0]
        generated = KVCache.create(len(prompt.keys), keys.shape[0], max_new_tokens, keys.shape[2], keys.shape[3],
                                   keys.dtype)
        return cls(prompt=prompt, generated=generated, width=1)

    def repeat_sequences(self, width: int) -> "SharedPromptCache":
        """`width` sequences a request, each starting from that request's generated cache."""
        generated = jax.tree.map(lambda x: jnp.repeat(x, width, axis=0), self.generated)
        return SharedPromptCache(prompt=self.prompt, generated=generated, width=self.width * width)

    def take_sequences(self, rows: jax.Array) -> "SharedPromptCache":
        """The generated caches of sequences `rows` `[batch*width]` (flat indices, each within its own request)."""
        return self.replace(generated=jax.tree.map(lambda x: x[rows], self.generated))
