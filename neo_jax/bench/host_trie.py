"""The baseline the decode benchmark beats: the SID trie as a Python dict, consulted on the host.

This is how Hugging Face `generate(prefix_allowed_tokens_fn=...)` users constrain decoding: a
dict from each SID prefix (a tuple of code tokens) to its allowed next tokens, looked up per
beam per step. `HostTrieConstraint` plugs the same lookup into our jitted loop through
`jax.pure_callback`, so the two constraints are timed in the same beam search. Both follow the
`ids` output format: `[SID]`, the codes of one catalog item, `[/SID]`, EOS.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from neo_jax.catalog.table import SidTrie
from neo_jax.vocab import VocabLayout

BEFORE_SPAN, IN_SPAN, AFTER_SPAN = 0, 1, 2


class HostTrie:
    """`prefix -> allowed next token ids` for every SID prefix of the catalog, built in Python."""

    def __init__(self, trie: SidTrie, layout: VocabLayout, eos_id: int):
        self.sid_open, self.sid_close, self.eos_id = layout.sid_open_id, layout.sid_close_id, int(eos_id)
        offsets = layout.block_offset_table()  # [num_types, max_levels]
        next_tokens: dict[tuple[int, ...], set[int]] = {}
        for codes, item_type in zip(trie.codes.tolist(), trie.item_types.tolist()):
            depth = trie.levels_per_type[item_type]
            tokens = tuple(int(offsets[item_type, level]) + codes[level] for level in range(depth))
            for level in range(depth):
                next_tokens.setdefault(tokens[:level], set()).add(tokens[level])
            next_tokens[tokens] = {self.sid_close}
        self.next_tokens = {prefix: sorted(tokens) for prefix, tokens in next_tokens.items()}
        self.max_levels = trie.max_levels

    def allowed(self, generated) -> list[int]:
        """Allowed next ids after the generated ids `generated` (the prompt excluded)."""
        generated = [int(t) for t in generated]
        if self.sid_open not in generated:
            return [self.sid_open]
        if self.sid_close in generated:
            return [self.eos_id]
        return self.next_tokens.get(tuple(generated[generated.index(self.sid_open) + 1:]), [])


@flax.struct.dataclass
class HostSpanState:
    phase: jax.Array  # [batch, beams] int32: BEFORE_SPAN, IN_SPAN or AFTER_SPAN
    span: jax.Array  # [batch, beams, max_levels] int32: code tokens of the open span
    span_len: jax.Array  # [batch, beams] int32


@flax.struct.dataclass
class HostTrieConstraint:
    """The `Constraint` protocol with the mask computed on the host from `HostTrie`, every step."""

    host_trie: HostTrie = flax.struct.field(pytree_node=False)

    def init_state(self, batch: int, beams: int) -> HostSpanState:
        return HostSpanState(phase=jnp.zeros((batch, beams), jnp.int32),
                             span=jnp.zeros((batch, beams, self.host_trie.max_levels), jnp.int32),
                             span_len=jnp.zeros((batch, beams), jnp.int32))

    def allowed(self, state: HostSpanState, vocab_size: int) -> jax.Array:
        out = jax.ShapeDtypeStruct(state.phase.shape + (vocab_size,), jnp.bool_)  # [batch, beams, vocab]
        host_mask = functools.partial(self._host_mask, vocab_size)
        return jax.pure_callback(host_mask, out, state.phase, state.span, state.span_len)

    def _host_mask(self, vocab_size: int, phase: np.ndarray, span: np.ndarray, span_len: np.ndarray) -> np.ndarray:
        """One dict lookup per beam, the way a `prefix_allowed_tokens_fn` works."""
        trie = self.host_trie
        mask = np.zeros(phase.shape + (vocab_size,), bool)  # [batch, beams, vocab]
        for beam in np.ndindex(phase.shape):
            if phase[beam] == BEFORE_SPAN:
                allowed = [trie.sid_open]
            elif phase[beam] == AFTER_SPAN:
                allowed = [trie.eos_id]
            else:
                allowed = trie.next_tokens.get(tuple(span[beam][: span_len[beam]].tolist()), [])
            mask[beam][allowed] = True
        return mask

    def advance(self, state: HostSpanState, tokens: jax.Array) -> HostSpanState:
        trie = self.host_trie
        opened = (state.phase == BEFORE_SPAN) & (tokens == trie.sid_open)  # [batch, beams]
        closed = (state.phase == IN_SPAN) & (tokens == trie.sid_close)  # [batch, beams]
        coded = (state.phase == IN_SPAN) & ~closed  # [batch, beams]
        at = jnp.minimum(state.span_len, trie.max_levels - 1)[..., None]  # [batch, beams, 1]
        appended = jnp.where(jnp.arange(trie.max_levels) == at, tokens[..., None], state.span)
        return HostSpanState(
            phase=jnp.where(opened, IN_SPAN, jnp.where(closed, AFTER_SPAN, state.phase)),
            span=jnp.where(coded[..., None], appended, state.span),  # [batch, beams, max_levels]
            span_len=state.span_len + coded,
        )

    def item_ids(self, state: HostSpanState, tokens: jax.Array) -> jax.Array:
        """The bench's models have no item-identity table: no ids (`neo_jax.decode.state`)."""
        return jnp.zeros(tokens.shape, jnp.int32)

    def complete(self, state: HostSpanState) -> jax.Array:
        return jnp.zeros((), bool)  # the baseline decodes the whole span, `[/SID]` and EOS included
