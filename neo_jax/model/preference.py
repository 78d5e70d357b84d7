"""Preference alignment losses: softmax-DPO over one chosen and N rejected completions.

Softmax-DPO (S-DPO; Chen et al., 2024, "On Softmax Direct Preference Optimization for
Recommendation"), the preference stage of Align3GR. With the implicit rewards
`r(y) = beta * (log pi(y | x) - log pi_ref(y | x))` of the policy `pi` against a frozen
reference `pi_ref`, one chosen completion `w` and rejected completions `l_1 .. l_N`:

    loss = -log sigmoid(-log sum_j exp(r(l_j) - r(w)))

With one rejected completion this is DPO's `-log sigmoid(r(w) - r(l))`. Rejected slots may be
padding (`rejected_mask` False): a row with none rejected has loss 0.

    policy = candidate_log_probs(model, batch)   # [groups, candidates], the chosen first
    loss = softmax_dpo_loss(policy[:, 0], policy[:, 1:], reference[:, 0], reference[:, 1:], beta, mask)

`candidate_log_probs` scores a preference batch (`neo_jax.tasks.preference`: a group a row, the
prompt once and each completion a branch of it) with a decoder: the policy inside the train step
(`neo_jax.train.step.preference_objective`), the reference once per stage when its records are
written (`neo_jax.align`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """`[batch, len]` the log-probability of each target under `logits` `[batch, len, vocab]`
    (`targets` `[batch, len]`, shifted by the caller as for `neo_jax.model.loss.masked_cross_entropy`)."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [batch, len, vocab]
    return jnp.take_along_axis(log_probs, targets[:, :, None], axis=2)[:, :, 0]


def candidate_log_probs(model: Any, batch: dict[str, jax.Array], dropout: Any = None) -> jax.Array:
    """`[groups, candidates]` the summed log-probability of each candidate's completion under `model`
    (a `neo_jax.model.Decoder`), from a preference batch (`neo_jax.tasks.preference`: `tokens`,
    `targets`, `loss_mask`, `segment_ids`, `branch_ids`, `positions`, `item_ids` `[groups, len]`, a
    group a row, each completion a branch of it; `candidates` `[groups, candidates]`); 0 in empty slots."""
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"], dropout=dropout,
                                    item_ids=batch["item_ids"], branch_ids=batch["branch_ids"])  # [groups, len, embed]
    scored = token_log_probs(model.logits(hidden), batch["targets"]) * batch["loss_mask"]  # [groups, len]
    slots = jax.nn.one_hot(batch["branch_ids"] - 1, batch["candidates"].shape[1],
                           dtype=jnp.float32)  # [groups, len, candidates]; the prompt (branch 0) in none
    return jnp.einsum("gl,glc->gc", scored, slots)


def softmax_dpo_loss(policy_chosen: jax.Array, policy_rejected: jax.Array, reference_chosen: jax.Array,
                     reference_rejected: jax.Array, beta: float, rejected_mask: jax.Array | None = None
                     ) -> jax.Array:
    """`[batch]` softmax-DPO losses (see the module docstring).

    `policy_chosen`, `reference_chosen` `[batch]` and `policy_rejected`, `reference_rejected`,
    `rejected_mask` `[batch, rejected]`: sequence log-probabilities of the completions under the
    policy and the reference; `rejected_mask` marks the real rejected slots (all by default)."""
    chosen_reward = beta * (policy_chosen - reference_chosen)  # [batch]
    rejected_reward = beta * (policy_rejected - reference_rejected)  # [batch, rejected]
    margins = rejected_reward - chosen_reward[:, None]  # [batch, rejected]
    if rejected_mask is None:
        rejected_mask = jnp.ones(margins.shape, bool)
    log_sum = jax.nn.logsumexp(jnp.where(rejected_mask, margins, -jnp.inf), axis=-1)  # [batch], -inf: none
    return jnp.where(jnp.any(rejected_mask, axis=-1), jax.nn.softplus(log_sum), 0.0)  # -log sigmoid(-x)
