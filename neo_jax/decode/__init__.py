"""Decoding: greedy, sampling and beam search as jitted `lax.while_loop`s, with the SID constraint.

The loops and constraints are exported here; `neo_jax.decode.generate` runs them with the
`Decoder` (prefill, `decode`, `Generator`) and `neo_jax.decode.commands` is `neo-jax generate`.
"""

from neo_jax.decode.beam_search import BeamState, beam_search, brevity_penalty
from neo_jax.decode.constraint import (Constraint, OutputFormat, SidConstraint, SidRequests, SidState, Unconstrained,
                                       sid_requests)
from neo_jax.decode.sid_tables import SidTables
from neo_jax.decode.sampling import SamplingState, greedy, sample
from neo_jax.decode.state import NEG_INF, DecodeResult, TokensToLogits, is_alive

__all__ = [
    "BeamState", "beam_search", "brevity_penalty",
    "Constraint", "OutputFormat", "SidConstraint", "SidRequests", "SidState", "SidTables",
    "Unconstrained", "sid_requests",
    "SamplingState", "greedy", "sample",
    "NEG_INF", "DecodeResult", "TokensToLogits", "is_alive",
]
