"""Softmax-DPO against an independent numpy implementation: values, gradients, DPO with one
rejected completion, padded rejected slots; sequence log-probabilities by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from neo_jax.model.preference import softmax_dpo_loss, token_log_probs


def numpy_softmax_dpo(pc, pr, rc, rr, beta, mask):
    """Loss and its gradients with respect to the policy's chosen and rejected log-probabilities,
    written out from the definition: loss = log(1 + sum_j exp(m_j)), m_j = beta (pr_j - rr_j) - beta (pc - rc)."""
    margins = beta * (pr - rr) - beta * (pc - rc)[:, None]  # [batch, n]
    e = np.where(mask, np.exp(margins), 0.0)
    total = e.sum(axis=1)  # [batch]
    loss = np.log1p(total)
    d_rejected = beta * e / (1.0 + total)[:, None]  # d loss / d pr_j
    d_chosen = -beta * total / (1.0 + total)  # d loss / d pc
    return loss, d_chosen, d_rejected


@pytest.mark.parametrize("rejected", [1, 3, 8])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_matches_numpy_values_and_gradients(rejected, beta):
    rng = np.random.default_rng(rejected)
    batch = 5
    pc, rc = rng.normal(-8, 3, batch), rng.normal(-8, 3, batch)
    pr, rr = rng.normal(-8, 3, (batch, rejected)), rng.normal(-8, 3, (batch, rejected))
    mask = rng.random((batch, rejected)) < 0.8
    mask[:, 0] = True
    loss, d_chosen, d_rejected = numpy_softmax_dpo(pc, pr, rc, rr, beta, mask)

    def total(pc_, pr_):
        return jnp.sum(softmax_dpo_loss(pc_, pr_, jnp.asarray(rc), jnp.asarray(rr), beta, jnp.asarray(mask)))

    got = softmax_dpo_loss(jnp.asarray(pc), jnp.asarray(pr), jnp.asarray(rc), jnp.asarray(rr), beta,
                           jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(got), loss, rtol=1e-5, atol=1e-6)
    g_chosen, g_rejected = jax.grad(total, argnums=(0, 1))(jnp.asarray(pc), jnp.asarray(pr))
    np.testing.assert_allclose(np.asarray(g_chosen), d_chosen, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_rejected), np.where(mask, d_rejected, 0.0), rtol=1e-5, atol=1e-6)


def test_one_rejected_is_dpo():
    rng = np.random.default_rng(0)
    pc, rc, pr, rr = (rng.normal(-5, 2, 6) for _ in range(4))
    beta = 0.5
    dpo = -np.log(1.0 / (1.0 + np.exp(-(beta * (pc - rc) - beta * (pr - rr)))))  # -log sigmoid(r_w - r_l)
    got = softmax_dpo_loss(jnp.asarray(pc), jnp.asarray(pr)[:, None], jnp.asarray(rc), jnp.asarray(rr)[:, None], beta)
    np.testing.assert_allclose(np.asarray(got), dpo, rtol=1e-5)


def test_padded_slots_count_for_nothing_and_an_empty_row_is_zero():
    pc, rc = jnp.array([-3.0, -3.0]), jnp.array([-4.0, -4.0])
    pr = jnp.array([[-2.0, 50.0], [7.0, 9.0]])  # the padded slots hold values that would dominate
    rr = jnp.zeros((2, 2))
    mask = jnp.array([[True, False], [False, False]])
    got = softmax_dpo_loss(pc, pr, rc, rr, 1.0, mask)
    alone = softmax_dpo_loss(pc[:1], pr[:1, :1], rc[:1], rr[:1, :1], 1.0)
    np.testing.assert_allclose(np.asarray(got), [float(alone[0]), 0.0], rtol=1e-6)
    grads = jax.grad(lambda p: jnp.sum(softmax_dpo_loss(pc, p, rc, rr, 1.0, mask)))(pr)
    assert np.all(np.isfinite(np.asarray(grads))) and float(grads[0, 1]) == 0.0 and float(jnp.abs(grads[1]).sum()) == 0.0


def test_token_log_probs_are_the_log_softmax_at_each_target():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 4, 6)).astype(np.float32)
    targets = np.array([[1, 2, 3, 4], [5, 0, 1, 2]])
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = [[log_probs[b, i, targets[b, i]] for i in range(4)] for b in range(2)]
    got = token_log_probs(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
