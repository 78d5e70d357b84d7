"""The decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax NNX.

    model = Decoder(config, rngs=nnx.Rngs(0))
    logits, _ = model(tokens, positions, segment_ids)               # full forward
    logits, _ = model(tokens, positions, segment_ids, dropout=Dropout(key, rate=0.1))  # training
    cache = model.init_cache(batch, max_len)
    logits, cache = model(prompt, prompt_positions, prompt_segments, cache)   # prefill
    logits, cache = model(next_token, next_positions, None, cache)            # one step
    # beams or samples sharing their prompt's cache (`neo_jax.model.kv_cache.SharedPromptCache`):
    cache = SharedPromptCache.after_prefill(cache, max_new_tokens).repeat_sequences(beams)
    logits, cache = model(next_tokens, next_positions, None, cache)           # [batch*beams, 1, vocab]

Inputs: `tokens` `[batch, len]` int32; `positions` `[batch, len]` int32 RoPE positions;
`segment_ids` `[batch, len]` int32 or None (all ones): 0 marks padding, and packed
examples carry distinct ids so attention never crosses them; `item_ids` `[batch, len]` int32 or
None: with an item-identity table (`config.num_item_ids`), row `item_ids` of `item_embed` joins
the input embedding where it is > 0 (the `[/SID]` tokens, `neo_jax.catalog.item_ids`); a model
without the table ignores them. Batched prompts are LEFT
padded (see `neo_jax.model.kv_cache`), with positions counting from each prompt's first
real token. Logits are float32; rows past `config.num_real_tokens` (vocabulary padding)
are `MASKED_LOGIT`. `hidden_states` gives the final (normed) hidden states without the
output head, for text embeddings.

Parameter tree (names used by the Hugging Face key map and the sharding rules):
`embed_tokens [vocab, embed]`, `lm_head [vocab, embed]` (None when tied), `item_embed [items + 1, embed]`
(None without item identity; it starts at zero, so a new table leaves the model's function unchanged),
`final_norm.scale`, `layers[i].{input_norm, post_attention_norm}.scale`,
`layers[i].attn.{q,k,v,o}_kernel`, `{q,k,v,o}_bias`, `{q,k}_norm.scale`,
`layers[i].mlp.{gate,up,down}_kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from neo_jax.model.config import ModelConfig
from neo_jax.model.kv_cache import KVCache, SharedPromptCache, write_at
from neo_jax.model.layers import (Attention, Dropout, PromptKeys, RMSNorm, SwiGLU, attention_mask, make_param,
                                  rope_inverse_frequencies)
from neo_jax.sharding import LOGICAL_AXIS_RULES

# Logit of a vocabulary padding row: never predicted, yet finite so sums stay finite.
MASKED_LOGIT = -1e9

# `ModelConfig.remat` -> what `jax.checkpoint` may keep (None: no checkpointing).
REMAT_POLICY_FUNCTIONS = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def pin_batch(x: jax.Array) -> jax.Array:
    """`x` `[batch, ...]` with its batch split over the mesh's data axes, inside a mesh context
    (`jax.sharding.use_abstract_mesh`, as the train steps trace); unchanged outside one. The scan's
    carry needs it: XLA's sharding propagation through the loop may otherwise give every device
    the whole batch."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(LOGICAL_AXIS_RULES["batch"], *([None] * (x.ndim - 1))))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", rngs)
        self.attn = Attention(config, rngs)
        self.post_attention_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", rngs)
        self.mlp = SwiGLU(config, rngs)

    def __call__(self, x, positions, inv_freq, mask, cached_kv=None, prompt: PromptKeys | None = None,
                 dropout: Dropout | None = None, sites: tuple[int, int] = (0, 0)):
        """`x` `[batch, len, embed]` -> (same shape, (keys, values) this layer attended to, `prompt` aside).

        With `dropout`, the attention and MLP outputs are dropped (mask sites `sites`) before
        they join the residual stream."""
        drop = (lambda y, _: y) if dropout is None else dropout
        normed = self.input_norm(x)
        keys, values = self.attn.project_kv(normed, positions, inv_freq)  # [batch, len, kv_heads, head_dim]
        if cached_kv is not None:
            cache_keys, cache_values, end = cached_kv
            keys, values = write_at(cache_keys, keys, end), write_at(cache_values, values, end)
        x = x + drop(self.attn(normed, positions, inv_freq, keys, values, mask, prompt), sites[0])
        return x + drop(self.mlp(self.post_attention_norm(x)), sites[1]), (keys, values)


class Decoder(nnx.Module):
    def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
        self.config = config
        normal = nnx.initializers.normal(config.initializer_range)
        self.embed_tokens = make_param(rngs, normal, (config.vocab_size, config.hidden_size), ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed", rngs)
        self.lm_head = None if config.tie_word_embeddings else make_param(
            rngs, normal, (config.vocab_size, config.hidden_size), ("vocab", "embed"))
        self.item_embed = None if not config.num_item_ids else make_param(
            rngs, nnx.initializers.zeros, (config.num_item_ids, config.hidden_size), ("vocab", "embed"))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.config.dtype)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` rows of up to `max_len` tokens (prompt included)."""
        c = self.config
        return KVCache.create(c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim, self.compute_dtype)

    def hidden_states(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                      cache: KVCache | SharedPromptCache | None = None, dropout: Dropout | None = None,
                      item_ids: jax.Array | None = None, branch_ids: jax.Array | None = None
                      ) -> tuple[jax.Array, KVCache | SharedPromptCache | None]:
        """Final normed hidden states `[batch, len, embed]` and the updated cache (None without one).

        With a `SharedPromptCache` the rows are its sequences (`batch = requests * width`); the
        new tokens go to their own generated cache and attend to the shared prompt too. With
        `dropout` (training), the embeddings and every residual branch are dropped. `branch_ids`
        `[batch, len]` (no cache): each segment is a tree, see `neo_jax.model.layers.attention_mask`."""
        if branch_ids is not None and cache is not None:
            raise ValueError("branch_ids are for a full forward pass, without a cache")
        if isinstance(cache, SharedPromptCache):
            prompt_mask = cache.prompt.segment_ids != 0  # [requests, prompt_len]
            prompts = [PromptKeys(keys, values, prompt_mask)
                       for keys, values in zip(cache.prompt.keys, cache.prompt.values)]
            hidden, generated = self._hidden_states(tokens, positions, segment_ids, cache.generated, prompts,
                                                    dropout, item_ids)
            return hidden, cache.replace(generated=generated)
        return self._hidden_states(tokens, positions, segment_ids, cache, [None] * self.config.num_layers, dropout,
                                   item_ids, branch_ids)

    def embed(self, tokens: jax.Array, item_ids: jax.Array | None = None) -> jax.Array:
        """The input embeddings `[batch, len, embed]` of `tokens`, plus each `item_ids` > 0's identity row."""
        x = jnp.take(self.embed_tokens[...], tokens, axis=0)  # [batch, len, embed]
        if item_ids is not None and self.item_embed is not None:
            identity = jnp.take(self.item_embed[...], item_ids, axis=0)  # [batch, len, embed]
            x = x + jnp.where((item_ids > 0)[..., None], identity, 0.0)
        return x.astype(self.compute_dtype)

    def _hidden_states(self, tokens, positions, segment_ids, cache: KVCache | None,
                       prompts: list[PromptKeys | None], dropout: Dropout | None, item_ids: jax.Array | None,
                       branch_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        batch, length = tokens.shape
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        new_slots = jnp.arange(length, dtype=jnp.int32)[None, :]  # [1, len]
        if cache is None:
            query_slots = jnp.broadcast_to(new_slots, (batch, length))
            key_segments, key_slots = segment_ids, query_slots
        else:
            query_slots = cache.end[:, None] + new_slots  # [batch, len]
            key_segments = write_at(cache.segment_ids, segment_ids, cache.end)  # [batch, max_len]
            key_slots = jnp.broadcast_to(jnp.arange(cache.max_len, dtype=jnp.int32), key_segments.shape)
        mask = attention_mask(segment_ids, query_slots, key_segments, key_slots, branch_ids,
                              branch_ids)  # [batch, len, keys]
        inv_freq = rope_inverse_frequencies(self.config)

        x = self.embed(tokens, item_ids)  # [batch, len, embed]
        if dropout is not None:
            x = dropout(x, 0)
        if cache is None and all(prompt is None for prompt in prompts):  # a full forward pass (training)
            return self.final_norm(self._run_layers(x, positions, inv_freq, mask, dropout)), None
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            cached_kv = None if cache is None else (cache.keys[i], cache.values[i], cache.end)
            x, (keys, values) = layer(x, positions, inv_freq, mask, cached_kv, prompts[i], dropout,
                                      (1 + 2 * i, 2 + 2 * i))
            new_keys.append(keys)
            new_values.append(values)
        return self.final_norm(x), KVCache(keys=tuple(new_keys), values=tuple(new_values),
                                           segment_ids=key_segments, end=cache.end + length)

    def _run_layers(self, x: jax.Array, positions: jax.Array, inv_freq, mask: jax.Array,
                    dropout: Dropout | None) -> jax.Array:
        """The layers over `x` `[batch, len, embed]` without a cache: one after another, or as one
        `lax.scan` over their weights stacked on a leading axis (`scan_layers`: the layer is traced
        once, so compile time does not grow with depth; the stacked copy of the weights, in float32,
        lives for the step), each under `jax.checkpoint` with the config's `remat` policy."""
        policy = REMAT_POLICY_FUNCTIONS[self.config.remat]

        def run(layer: DecoderLayer, x, index, dropout):
            sites = (1 + 2 * index, 2 + 2 * index)
            return layer(x, positions, inv_freq, mask, None, None, dropout, sites)[0]

        if policy is not None:
            run = nnx.remat(run, policy=policy, prevent_cse=not self.config.scan_layers)
        if not self.config.scan_layers:
            for i, layer in enumerate(self.layers):
                x = run(layer, x, i, dropout)
            return x
        graphdef, _ = nnx.split(self.layers[0])
        stacked = jax.tree.map(lambda *weights: jnp.stack(weights), *[nnx.state(layer) for layer in self.layers])

        def body(x, indexed):
            index, weights = indexed
            return pin_batch(run(nnx.merge(graphdef, weights), x, index, dropout)), None
        x, _ = jax.lax.scan(body, pin_batch(x), (jnp.arange(self.config.num_layers), stacked))
        return x

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits `[batch, len, vocab]` of hidden states `[batch, len, embed]`."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        logits = jnp.einsum("btd,vd->btv", hidden, head[...].astype(hidden.dtype)).astype(jnp.float32)
        real = self.config.predictable_tokens
        if real < self.config.vocab_size:
            logits = jnp.where(jnp.arange(self.config.vocab_size) < real, logits, MASKED_LOGIT)
        return logits

    def __call__(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: KVCache | SharedPromptCache | None = None, dropout: Dropout | None = None,
                 item_ids: jax.Array | None = None) -> tuple[jax.Array, KVCache | SharedPromptCache | None]:
        """`(logits [batch, len, vocab] float32, updated cache or None)`."""
        hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache, dropout, item_ids)
        return self.logits(hidden), cache
