"""The train and eval steps: `jax.jit` over the mesh with explicit input and output shardings.

The train state is a plain pytree, so orbax saves it and a restore can lay it out on
any mesh:
    {'step': int32 [], 'trainable': {'model': ..., 'lora': ...}, 'frozen': ..., 'opt': optax state}
and, with an exponential moving average of the weights (`ema_decay` > 0), 'ema': a pytree like
'trainable', the weights that evaluation and the saved model use.
A step splits the global batch `[batch, seq_len]` into `grad_accum_steps` micro-batches
and runs them through `lax.scan`, summing the completion-token loss and its gradient;
dividing by the total completion-token count at the end makes the update the same as
one step over the whole batch. The model computes in its config's dtype (bfloat16 as
an option) while the weights, gradients and optimizer state stay float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from neo_jax.model.layers import Dropout
from neo_jax.model.loss import HistoryPenalty, completion_loss_sums
from neo_jax.sharding import batch_sharding
from neo_jax.train.stages import Params, StagePlan, apply_masked_updates, partition

TrainState = dict[str, Any]
Batch = dict[str, jax.Array]  # tokens, targets, loss_mask, segment_ids, positions: [batch, seq_len]
DATA_AXES = ("data", "fsdp")


def new_train_state(params: Params, plan: StagePlan, tx: optax.GradientTransformation, key: jax.Array,
                    ema: bool = False) -> TrainState:
    """The state at step 0; with `ema`, the weight average starts as a copy of the trainable weights."""
    trainable, frozen = plan.split(params, key)
    state = {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "frozen": frozen, "opt": tx.init(trainable)}
    if ema:
        state["ema"] = jax.tree.map(jnp.copy, trainable)
    return state


def evaluated_weights(state: TrainState) -> Params:
    """The trainable weights that evaluation and the saved model use: the average where there is one."""
    return state.get("ema", state["trainable"])


def ema_update(ema: Params, trainable: Params, masks: Params, step: jax.Array, decay: float) -> Params:
    """One step of the weight average: `d * ema + (1 - d) * trainable` with `d = min(decay, (1 + t) /
    (10 + t))` at step `t` (the average warms up, as in TensorFlow's ExponentialMovingAverage); where
    the masks freeze a value, the average keeps its bits (it started as that value)."""
    t = step.astype(jnp.float32)
    d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
    return jax.tree.map(lambda e, p, m: jnp.where(m, d * e + (1.0 - d) * p, e), ema, trainable, masks)


def train_state_shardings(abstract_state: TrainState, param_shardings: Params, plan: StagePlan,
                          tx: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Shardings of every state leaf: parameters (and their Adam moments) as the model's
    logical axes say; LoRA adapters, counters and the step replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    model_shardings, frozen_shardings = partition(param_shardings, plan.is_trainable)
    trainable_shardings = {"model": model_shardings,
                           "lora": jax.tree.map(lambda _: replicated, abstract_state["trainable"]["lora"])}
    opt_shardings = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_state["opt"],
                                          trainable_shardings, transform_non_params=lambda _: replicated)
    shardings = {"step": replicated, "trainable": trainable_shardings, "frozen": frozen_shardings,
                 "opt": opt_shardings}
    if "ema" in abstract_state:
        shardings["ema"] = trainable_shardings
    return shardings


@dataclasses.dataclass(frozen=True)
class Unlikelihood:
    """The history unlikelihood term of the train loss (`history_unlikelihood`), at `weight`."""

    weight: float
    penalty: HistoryPenalty


def _loss_sum(trainable: Params, frozen: Params, batch: Batch, graphdef: nnx.GraphDef,
              plan: StagePlan, dropout: Dropout | None = None, unlikelihood: Unlikelihood | None = None,
              loss_chunk: int = 0) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """(the objective to differentiate, (sum of completion-token losses, number of completion
    tokens, sum of the unlikelihood penalties)) of one batch; the objective is the loss sum plus
    `unlikelihood.weight` times the penalty sum. The output head runs `loss_chunk` positions at a
    time (`completion_loss_sums`; 0: all at once)."""
    model = nnx.merge(graphdef, plan.adapted_params(trainable, frozen))
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                    dropout=dropout)  # [batch, len, embed]
    loss, weight, penalty = completion_loss_sums(hidden, model.logits, batch["targets"], batch["loss_mask"],
                                                 batch["segment_ids"], loss_chunk,
                                                 None if unlikelihood is None else unlikelihood.penalty)
    objective = loss + (0.0 if unlikelihood is None else unlikelihood.weight) * penalty
    return objective, (loss, weight, penalty)


def _micro_batches(batch: Batch, count: int, mesh: Mesh) -> Batch:
    """`[batch, len]` -> `[count, batch / count, len]`; micro-batch i takes rows i, i+count, ...
    so that every micro-batch spreads over all data-parallel devices."""
    sharding = NamedSharding(mesh, PartitionSpec(None, DATA_AXES, None))

    def split(x):
        rows, length = x.shape
        micro = x.reshape(rows // count, count, length).swapaxes(0, 1)  # [count, rows / count, len]
        return jax.lax.with_sharding_constraint(micro, sharding)
    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]  # (loss sum, completion tokens)
    batch_sharding: NamedSharding


def make_steps(graphdef: nnx.GraphDef, plan: StagePlan, tx: optax.GradientTransformation, masks: Params,
               schedule: optax.Schedule, grad_accum_steps: int, state_shardings: TrainState,
               mesh: Mesh, dropout: float = 0.0, seed: int = 0,
               unlikelihood: Unlikelihood | None = None, ema_decay: float = 0.0, loss_chunk: int = 0
               ) -> StepFunctions:
    """The jitted train step (donates its state) and eval step.

    With `dropout` > 0 the train step drops the model's embeddings and residual branches at
    that rate, its masks drawn from `seed`, the step and the micro-batch index: a resumed run
    draws the same masks. The eval step never drops. With `unlikelihood` the train step adds the
    history unlikelihood term (logged as `unlikelihood`, per completion token); the eval step's
    loss is the cross-entropy alone, comparable across runs. With `ema_decay` > 0 (the state then
    holds 'ema') the train step updates the weight average (`ema_update`) and the eval step scores
    the average. `loss_chunk` > 0 runs the output head that many positions at a time in both steps
    (the float32 logits of the whole batch never exist at once)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_in = batch_sharding(mesh, 2)
    loss_and_grad = jax.value_and_grad(_loss_sum, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for the model's activation constraints
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: Batch):
        trainable, frozen = state["trainable"], state["frozen"]

        step_key = jax.random.fold_in(jax.random.key(seed), state["step"])

        def accumulate(carry, indexed: tuple[jax.Array, Batch]):
            grad_sum, loss_sum, weight_sum, penalty_sum = carry
            index, micro = indexed
            drop = Dropout(jax.random.fold_in(step_key, index), rate=dropout) if dropout else None
            (_, (loss, weight, penalty)), grads = loss_and_grad(trainable, frozen, micro, graphdef, plan, drop,
                                                                unlikelihood, loss_chunk)
            return (jax.tree.map(jnp.add, grad_sum, grads), loss_sum + loss, weight_sum + weight,
                    penalty_sum + penalty), None

        zero = jnp.zeros((), jnp.float32)
        (grad_sum, loss_sum, weight_sum, penalty_sum), _ = jax.lax.scan(
            accumulate, (jax.tree.map(jnp.zeros_like, trainable), zero, zero, zero),
            (jnp.arange(grad_accum_steps), _micro_batches(batch, grad_accum_steps, mesh)))
        denominator = jnp.maximum(weight_sum, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        updates, opt = tx.update(grads, state["opt"], trainable)
        new_trainable = apply_masked_updates(trainable, updates, masks)
        new_state = {"step": state["step"] + 1, "frozen": frozen, "opt": opt, "trainable": new_trainable}
        if ema_decay:
            new_state["ema"] = ema_update(state["ema"], new_trainable, masks, state["step"], ema_decay)
        metrics = {"loss": loss_sum / denominator, "loss_tokens": weight_sum, "learning_rate": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(jax.tree.map(lambda g, m: g * m, grads, masks))}
        if unlikelihood is not None:
            metrics["unlikelihood"] = penalty_sum / denominator
        return new_state, metrics

    def eval_step(state: TrainState, batch: Batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _eval_step(state, batch)

    def _eval_step(state: TrainState, batch: Batch):
        _, (loss, weight, _) = _loss_sum(evaluated_weights(state), state["frozen"], batch, graphdef, plan,
                                         loss_chunk=loss_chunk)
        return loss, weight

    return StepFunctions(
        train=jax.jit(train_step, in_shardings=(state_shardings, batch_in),
                      out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval=jax.jit(eval_step, in_shardings=(state_shardings, batch_in), out_shardings=(replicated, replicated)),
        batch_sharding=batch_in,
    )
