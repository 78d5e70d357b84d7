"""RQ-VAE (residual-quantised autoencoder, as in TIGER) in JAX with optax.

An MLP encoder maps an item embedding to a latent; `levels` codebooks quantise the
latent residually; an MLP decoder reconstructs the embedding from the sum of the chosen
code vectors. Loss = reconstruction MSE + per level the codebook term
`|sg(r_l) - e_l|^2` and `commitment * |r_l - sg(e_l)|^2`, with the straight-through
estimator carrying the decoder's gradient to the encoder. Codebooks start from residual
k-means on the initial latents. All training steps run in one jitted `lax.scan`; a step's batch is
the next `batch_size` rows of a seeded permutation of the items, a new one each epoch
(`epoch_batches`: one shuffle per pass over the catalog, never a sort of every row at every step).

As the encoder moves, codes whose region it leaves get no gradient and die (on Amazon Beauty
level 0 kept 8 of 256 codes, and 4.9% of items collided). With `refit_codebooks` (the
default) the codebooks that assign the final codes are fitted again by residual k-means on
the trained latents: every code is used, and the latent space is still the one the
autoencoder learned (on Beauty 0.1% of items collide).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from neo_jax.catalog.kmeans import nearest
from neo_jax.catalog.residual import fit_residual_kmeans

Params = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class RqVaeConfig:
    hidden_dim: int = 256
    latent_dim: int = 32
    steps: int = 1500
    batch_size: int = 1024
    learning_rate: float = 1e-3
    commitment: float = 0.25  # weight of the encoder's pull towards its codes
    kmeans_iters: int = 25  # k-means iterations of the codebook initialisation (and refit)
    refit_codebooks: bool = True  # refit the codebooks on the trained latents (no dead codes)


def _dense_init(key: jax.Array, fan_in: int, fan_out: int) -> jax.Array:
    return jax.random.normal(key, (fan_in, fan_out), jnp.float32) * jnp.sqrt(2.0 / fan_in)


def init_autoencoder(key: jax.Array, input_dim: int, config: RqVaeConfig) -> Params:
    keys = jax.random.split(key, 4)
    h, z = config.hidden_dim, config.latent_dim
    return {
        "enc_w1": _dense_init(keys[0], input_dim, h), "enc_b1": jnp.zeros(h),
        "enc_w2": _dense_init(keys[1], h, z), "enc_b2": jnp.zeros(z),
        "dec_w1": _dense_init(keys[2], z, h), "dec_b1": jnp.zeros(h),
        "dec_w2": _dense_init(keys[3], h, input_dim), "dec_b2": jnp.zeros(input_dim),
    }


def encode(params: Params, x: jax.Array) -> jax.Array:
    """`[n, input_dim]` -> latents `[n, latent_dim]`."""
    return jax.nn.relu(x @ params["enc_w1"] + params["enc_b1"]) @ params["enc_w2"] + params["enc_b2"]


def decode(params: Params, z: jax.Array) -> jax.Array:
    """`[n, latent_dim]` -> reconstructions `[n, input_dim]`."""
    return jax.nn.relu(z @ params["dec_w1"] + params["dec_b1"]) @ params["dec_w2"] + params["dec_b2"]


def rqvae_loss(params: Params, codebooks: tuple[jax.Array, ...], x: jax.Array, commitment: float) -> jax.Array:
    latent = encode(params, x)  # [batch, latent_dim]
    residual, quantised, codebook_loss = latent, jnp.zeros_like(latent), 0.0
    for codebook in codebooks:  # [k_l, latent_dim]
        codes, _ = nearest(jax.lax.stop_gradient(residual), codebook)  # [batch]
        chosen = codebook[codes]  # [batch, latent_dim]
        codebook_loss += jnp.mean(jnp.sum((jax.lax.stop_gradient(residual) - chosen) ** 2, -1))
        codebook_loss += commitment * jnp.mean(jnp.sum((residual - jax.lax.stop_gradient(chosen)) ** 2, -1))
        quantised = quantised + chosen
        residual = residual - jax.lax.stop_gradient(chosen)
    straight_through = latent + jax.lax.stop_gradient(quantised - latent)  # [batch, latent_dim]
    reconstruction = jnp.mean(jnp.sum((decode(params, straight_through) - x) ** 2, -1))
    return reconstruction + codebook_loss


def epoch_batches(key: jax.Array, n: int, batch: int, steps: int) -> jax.Array:
    """`[steps, batch]` int32 row indices: consecutive slices of seeded permutations of `range(n)`, one
    permutation per epoch, so every row is drawn once an epoch (traceable; `n`, `batch`, `steps` static)."""
    epochs = -(-steps * batch // n)
    order = jnp.concatenate([jax.random.permutation(k, n) for k in jax.random.split(key, epochs)])  # [epochs * n]
    return order[: steps * batch].reshape(steps, batch).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _train(params: Params, codebooks: tuple[jax.Array, ...], x: jax.Array, key: jax.Array, config: RqVaeConfig):
    optimizer = optax.adam(config.learning_rate)
    trainable = (params, codebooks)
    batch = min(config.batch_size, x.shape[0])

    def step(carry, rows):  # rows: [batch]
        trainable, opt_state = carry
        loss, grads = jax.value_and_grad(lambda t: rqvae_loss(*t, x[rows], config.commitment))(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return (optax.apply_updates(trainable, updates), opt_state), loss

    (trainable, _), losses = jax.lax.scan(step, (trainable, optimizer.init(trainable)),
                                          epoch_batches(key, x.shape[0], batch, config.steps))
    return trainable, losses


def fit_rqvae(x: jax.Array, codebook_sizes: Sequence[int], key: jax.Array,
              config: RqVaeConfig = RqVaeConfig()) -> tuple[jax.Array, list[jax.Array], jax.Array]:
    """Train an RQ-VAE on `x` `[n, dim]`.

    Returns `(latents [n, latent_dim], codebooks, losses [steps])`: the latents and codebooks
    to give `residual_encode`, and the training loss of every step.
    """
    x = jnp.asarray(x, jnp.float32)
    init_key, kmeans_key, train_key, refit_key = jax.random.split(key, 4)
    params = init_autoencoder(init_key, x.shape[1], config)
    codebooks = fit_residual_kmeans(encode(params, x), codebook_sizes, kmeans_key, config.kmeans_iters)
    (params, codebooks), losses = _train(params, tuple(codebooks), x, train_key, config)
    latents = encode(params, x)  # [n, latent_dim]
    if config.refit_codebooks:
        codebooks = fit_residual_kmeans(latents, codebook_sizes, refit_key, config.kmeans_iters)
    return latents, list(codebooks), losses
