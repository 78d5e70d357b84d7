"""Grow a pre-trained decoder's vocabulary to a `VocabLayout`: `[text | specials | SID codes | padding]`.

The input embedding and, when untied, the output head get `layout.padded_size` rows:
- text rows `0 .. text_size-1` keep their values bit for bit;
- each new row (specials and SID code tokens) is the mean of that matrix's text rows
  plus Gaussian noise: `mean + noise_scale * std * N(0, I)`, with `std` the per-dimension
  standard deviation of the text rows and `noise_scale` 0.1 by default. Starting at the
  mean keeps the new tokens' logits near the average text token's, so the pre-trained
  distribution barely moves (Hewitt, 2021, "Initializing New Word Embeddings for
  Pretrained Language Models"); the small noise breaks the symmetry between them;
- padding rows are zero, and the config's `num_real_tokens = layout.size` makes the
  decoder mask their logits (`MASKED_LOGIT`), so they are never predicted.
The embedding and the head draw independent noise.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from neo_jax.errors import UserError
from neo_jax.model.decoder import Decoder
from neo_jax.sharding import state_shardings
from neo_jax.vocab import VocabLayout

NOISE_SCALE = 0.1


def extended_rows(table: jax.Array, key: jax.Array, num_new: int, num_padding: int,
                  noise_scale: float) -> jax.Array:
    """`table` `[text, embed]` followed by `num_new` initialised rows and `num_padding` zero rows."""
    mean = jnp.mean(table, axis=0)  # [embed]
    std = jnp.std(table, axis=0)  # [embed]
    noise = jax.random.normal(key, (num_new, table.shape[1]), table.dtype)  # [new, embed]
    padding = jnp.zeros((num_padding, table.shape[1]), table.dtype)
    return jnp.concatenate([table, mean + noise_scale * std * noise, padding], axis=0)


def extend_vocab(model: Decoder, layout: VocabLayout, mesh: Mesh, seed: int = 0,
                 noise_scale: float = NOISE_SCALE, allow_replicated: Iterable[str] = ()) -> Decoder:
    """A new decoder whose embedding (and untied head) cover `layout`, sharded on `mesh`
    (`allow_replicated`: see `neo_jax.sharding.logical_to_spec`)."""
    config = model.config
    if layout.text_size != config.vocab_size:
        raise UserError(f"vocabulary layout text_size {layout.text_size} differs from the model's "
                        f"{config.vocab_size} embedding rows; set text_size to the pre-trained vocabulary size")
    new_config = dataclasses.replace(config, vocab_size=layout.padded_size, num_real_tokens=layout.size)
    new_graphdef, new_abstract = nnx.split(nnx.eval_shape(lambda: Decoder(new_config, nnx.Rngs(0))))
    shardings = state_shardings(new_abstract, mesh, allow_replicated)
    grow = functools.partial(extended_rows, num_new=layout.size - layout.text_size,
                             num_padding=layout.padded_size - layout.size, noise_scale=noise_scale)

    _, state = nnx.split(model)
    names = ["embed_tokens"] if config.tie_word_embeddings else ["embed_tokens", "lm_head"]
    for name, key in zip(names, jax.random.split(jax.random.key(seed), len(names))):
        variable = state[name]
        grown = jax.jit(grow, out_shardings=shardings[name].get_value())(variable.get_value(), key)
        state[name] = variable.replace(grown)
    return nnx.merge(new_graphdef, state)
