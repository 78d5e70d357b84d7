"""What every decoding loop shares: the model callback type, the result, and beam-axis helpers.

A decoding loop calls the model one token at a time through `tokens_to_logits(token_ids
[batch*beams, 1], cache, positions [batch*beams, 1], item_ids [batch*beams, 1]) -> (logits
[batch*beams, vocab], cache)`; `item_ids` names the item a fed `[/SID]` closes (`neo_jax.catalog.item_ids`:
the prompt's own for its last token, then the constraint's).
Every leaf of the cache carries the flattened `batch*beams` axis first, beams of one request
adjacent (row `b * beams + k`), so a beam search reorders beams by gathering rows. Before the
loop the cache holds the prompt's first `prompt_length - 1` tokens of each request (with only a
`batch` axis); the loop feeds the prompt's last token at position `prompt_length - 1` first.
A `SharedPromptCache` keeps that prompt part once per request: only its generated part is
repeated and gathered.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.model.kv_cache import SharedPromptCache

PyTree = Any
TokensToLogits = Callable[[jax.Array, PyTree, jax.Array, jax.Array], tuple[jax.Array, PyTree]]

# "Effectively minus infinity" for masked log-probabilities. Finite, so sums stay finite; a
# beam whose log-probability falls below NEG_INF / 2 took a masked token and is dead.
NEG_INF = np.float32(-1.0e7)


def is_alive(log_probs: jax.Array) -> jax.Array:
    """True where a log-probability (or score) never took a masked token."""
    return log_probs > NEG_INF / 2


@flax.struct.dataclass
class DecodeResult:
    """The decoded continuations of a batch of prompts, best first for beam search.

    `tokens[b, k, :lengths[b, k]]` is continuation k of prompt b (it ends with EOS where
    `finished`); entries past the length are 0. `log_probs` is the model's log-probability of
    the continuation (sum over its tokens, unmasked softmax); `scores` is what the search ranked
    by (`log_probs` over the length penalty for beam search). A beam that is neither finished
    nor alive (`is_alive(scores)` False) is filler: the search found fewer candidates.
    """

    tokens: jax.Array  # [batch, beams, max_new_tokens] int32
    lengths: jax.Array  # [batch, beams] int32
    log_probs: jax.Array  # [batch, beams] float32
    scores: jax.Array  # [batch, beams] float32
    finished: jax.Array  # [batch, beams] bool: ended with EOS
    steps: jax.Array  # [] int32: loop iterations run (model calls after the prefill)


def expand_beams(tree: PyTree, beams: int) -> PyTree:
    """Repeat each request's row `beams` times: leaves `[batch, ...]` -> `[batch*beams, ...]`
    (of a `SharedPromptCache`, only the generated part's)."""
    if isinstance(tree, SharedPromptCache):
        return tree.repeat_sequences(beams)
    return jax.tree.map(lambda x: jnp.repeat(x, beams, axis=0), tree)


def gather_beams(tree: PyTree, parents: jax.Array) -> PyTree:
    """Pick beams by index within each request: leaves `[batch, old_beams, ...]` -> `[batch, new_beams, ...]`.

    `parents` `[batch, new_beams]` int32 holds old-beam indices.
    """
    batch_index = jnp.arange(parents.shape[0])[:, None]  # [batch, 1]
    return jax.tree.map(lambda x: x[batch_index, parents], tree)


def gather_flat_beams(tree: PyTree, parents: jax.Array, old_beams: int) -> PyTree:
    """`gather_beams` for leaves with the flattened axis: `[batch*old_beams, ...]` -> `[batch*new_beams, ...]`
    (of a `SharedPromptCache`, only the generated part's: the prompt part is every beam's)."""
    batch_index = jnp.arange(parents.shape[0])[:, None]  # [batch, 1]
    rows = (batch_index * old_beams + parents).reshape(-1)  # [batch*new_beams]
    if isinstance(tree, SharedPromptCache):
        return tree.take_sequences(rows)
    return jax.tree.map(lambda x: x[rows], tree)


def step_positions(prompt_lengths: jax.Array, step: jax.Array, beams: int) -> jax.Array:
    """Position of the token fed at `step` for every beam: `[batch]` -> `[batch*beams, 1]`."""
    positions = prompt_lengths.astype(jnp.int32) - 1 + step  # [batch]
    return jnp.repeat(positions, beams)[:, None]  # [batch*beams, 1]


def next_token_log_probs(tokens_to_logits: TokensToLogits, last_tokens: jax.Array, cache: PyTree,
                         prompt_lengths: jax.Array, step: jax.Array, constraint: Any, constraint_state: PyTree,
                         last_prompt_item: jax.Array):
    """One model step for every sequence of the loop.

    `last_tokens` `[batch, width]` (width = beams or samples) -> `(log_probs [batch, width, vocab]`
    float32 (unmasked), `allowed` bool broadcastable to `[batch, width, vocab]`, the new cache)`.
    `last_prompt_item` `[batch]`: the item id of each prompt's last token, fed at step 0.
    """
    batch, width = last_tokens.shape
    flat_tokens = last_tokens.reshape(batch * width, 1)  # [batch*width, 1]
    positions = step_positions(prompt_lengths, step, width)  # [batch*width, 1]
    item_ids = jnp.where(step == 0, last_prompt_item[:, None],
                         constraint.item_ids(constraint_state, last_tokens))  # [batch, width]
    logits, new_cache = tokens_to_logits(flat_tokens, cache, positions,
                                         item_ids.reshape(batch * width, 1))  # [batch*width, vocab]
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, width, vocab)
    allowed = constraint.allowed(constraint_state, vocab)  # [batch, width, vocab]
    return log_probs, allowed, new_cache
