"""The train and eval steps: `jax.jit` over the mesh with explicit input and output shardings.

The train state is a plain pytree, so orbax saves it and a restore can lay it out on
any mesh:
    {'step': int32 [], 'trainable': {'model': ..., 'lora': ...}, 'frozen': ..., 'opt': optax state}
and, with an exponential moving average of the weights (`ema_decay` > 0), 'ema': a pytree like
'trainable', the weights that evaluation and the saved model use.
A step splits the global batch `[batch, ...]` into `grad_accum_steps` micro-batches
and runs them through `lax.scan`, summing the loss (completion tokens' cross-entropy, or the
preference stage's softmax-DPO over groups) and its gradient; dividing by the total weight
(completion tokens, or groups) at the end makes the update the same as one step over the
whole batch. The model computes in its config's dtype (bfloat16 as
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
from neo_jax.model.preference import candidate_log_probs, softmax_dpo_loss
from neo_jax.sharding import batch_sharding
from neo_jax.tasks.preference import PREFERENCE_KEYS
from neo_jax.train.config import PreferenceConfig
from neo_jax.train.stages import Params, StagePlan, apply_masked_updates, partition

TrainState = dict[str, Any]
# tokens, targets, loss_mask, segment_ids, positions: [batch, seq_len]; or a preference batch
# (`neo_jax.tasks.preference`): those and branch_ids [groups, seq_len], candidates and reference [groups, candidates]
Batch = dict[str, jax.Array]
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


ITEM_ID_STREAM = 1_000_003  # folded into a micro-batch's key for its item-id dropout (apart from `Dropout`'s)


def drop_item_ids(item_ids: jax.Array, key: jax.Array, rate: float) -> jax.Array:
    """`item_ids` `[batch, len]` with each id set to 0 (no item) with probability `rate`."""
    return jnp.where(jax.random.bernoulli(key, 1.0 - rate, item_ids.shape), item_ids, 0)


@dataclasses.dataclass(frozen=True)
class Unlikelihood:
    """The history unlikelihood term of the train loss (`history_unlikelihood`), at `weight`."""

    weight: float
    penalty: HistoryPenalty


# A step's loss over one micro-batch: (trainable, frozen, batch, dropout or None) -> (the objective to
# differentiate, sums): `sums` holds "loss" and "weight" (the step reports loss / weight and divides the
# gradient by the summed weight) and any other sum the step reports per unit of weight.
LossSums = Callable[[Params, Params, Batch, Dropout | None], tuple[jax.Array, dict[str, jax.Array]]]


def completion_objective(graphdef: nnx.GraphDef, plan: StagePlan, unlikelihood: Unlikelihood | None = None,
                         loss_chunk: int = 0) -> LossSums:
    """The next-token objective over packed `[batch, len]` rows: the sum of completion-token losses
    ("loss", over "weight" completion tokens) plus `unlikelihood.weight` times the sum of the
    unlikelihood penalties ("unlikelihood"). The output head runs `loss_chunk` positions at a time
    (`completion_loss_sums`; 0: all at once)."""
    def sums(trainable, frozen, batch, dropout):
        model = nnx.merge(graphdef, plan.adapted_params(trainable, frozen))
        hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"],
                                        dropout=dropout, item_ids=batch.get("item_ids"))  # [batch, len, embed]
        loss, weight, penalty = completion_loss_sums(hidden, model.logits, batch["targets"], batch["loss_mask"],
                                                     batch["segment_ids"], loss_chunk,
                                                     None if unlikelihood is None else unlikelihood.penalty)
        if unlikelihood is None:
            return loss, {"loss": loss, "weight": weight}
        return loss + unlikelihood.weight * penalty, {"loss": loss, "weight": weight, "unlikelihood": penalty}
    return sums


def preference_objective(graphdef: nnx.GraphDef, plan: StagePlan, beta: float, chosen_nll: float = 0.0) -> LossSums:
    """The softmax-DPO objective over preference batches, a group a row (`neo_jax.tasks.preference`;
    candidate 0 the chosen): the sum of the groups' losses ("loss", over
    "weight" groups) plus `chosen_nll` times the chosen completions' summed negative log-likelihood
    ("chosen_nll"); "accuracy" counts the groups whose chosen reward beats every rejected one."""
    def sums(trainable, frozen, batch, dropout):
        model = nnx.merge(graphdef, plan.adapted_params(trainable, frozen))
        log_probs = candidate_log_probs(model, batch, dropout)  # [groups, candidates]
        reference, real = batch["reference"], batch["candidates"]  # [groups, candidates]
        losses = softmax_dpo_loss(log_probs[:, 0], log_probs[:, 1:], reference[:, 0], reference[:, 1:], beta,
                                  real[:, 1:])  # [groups]
        counted = (real[:, 0] & jnp.any(real[:, 1:], axis=1)).astype(jnp.float32)  # [groups]
        rewards = log_probs - reference  # [groups, candidates]
        wins = jnp.all(jnp.where(real[:, 1:], rewards[:, 1:] < rewards[:, :1], True), axis=1)  # [groups]
        loss, nll = jnp.sum(losses * counted), -jnp.sum(log_probs[:, 0] * counted)
        return loss + chosen_nll * nll, {"loss": loss, "weight": jnp.sum(counted), "chosen_nll": nll,
                                         "accuracy": jnp.sum(wins * counted)}
    return sums


def _micro_batches(batch: Batch, count: int, mesh: Mesh) -> Batch:
    """`[batch, ...]` -> `[count, batch / count, ...]`; micro-batch i takes rows i, i+count, ...
    so that every micro-batch spreads over all data-parallel devices."""
    def split(x):
        rows, rest = x.shape[0], x.shape[1:]
        micro = x.reshape(rows // count, count, *rest).swapaxes(0, 1)  # [count, rows / count, ...]
        return jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, PartitionSpec(None, DATA_AXES,
                                                                                       *[None] * len(rest))))
    return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    train: Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]
    eval: Callable[[TrainState, Batch], tuple[jax.Array, jax.Array]]  # (loss sum, its weight)
    batch_sharding: NamedSharding  # of a `[batch, len]` input


def make_steps(graphdef: nnx.GraphDef, plan: StagePlan, tx: optax.GradientTransformation, masks: Params,
               schedule: optax.Schedule, grad_accum_steps: int, state_shardings: TrainState,
               mesh: Mesh, dropout: float = 0.0, seed: int = 0,
               unlikelihood: Unlikelihood | None = None, ema_decay: float = 0.0, loss_chunk: int = 0,
               preference: PreferenceConfig | None = None, item_id_dropout: float = 0.0) -> StepFunctions:
    """The jitted train step (donates its state) and eval step.

    With `dropout` > 0 the train step drops the model's embeddings and residual branches at
    that rate, its masks drawn from `seed`, the step and the micro-batch index: a resumed run
    draws the same masks. The eval step never drops. With `unlikelihood` the train step adds the
    history unlikelihood term (logged as `unlikelihood`, per completion token); the eval step's
    loss is the cross-entropy alone, comparable across runs. With `ema_decay` > 0 (the state then
    holds 'ema') the train step updates the weight average (`ema_update`) and the eval step scores
    the average. `loss_chunk` > 0 runs the output head that many positions at a time in both steps
    (the float32 logits of the whole batch never exist at once). With `preference` both steps take
    preference batches (`neo_jax.tasks.preference`) and the objective is `preference_objective`'s
    (`loss` is then the mean softmax-DPO loss of a group, `chosen_nll` and `accuracy` per group).
    With `item_id_dropout` > 0 the train step sets that share of the batch's `item_ids` to 0 (no item),
    drawn like the dropout masks; the eval step keeps them all."""
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_in = batch_sharding(mesh, 2)
    if preference is None:
        objective = completion_objective(graphdef, plan, unlikelihood, loss_chunk)
        eval_objective = completion_objective(graphdef, plan, None, loss_chunk)
        batch_shardings = batch_in
    else:
        objective = eval_objective = preference_objective(graphdef, plan, preference.beta, preference.chosen_nll)
        batch_shardings = {key: batch_sharding(mesh, 2) for key in PREFERENCE_KEYS}  # each [groups, ...]
    loss_and_grad = jax.value_and_grad(objective, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # for the model's activation constraints
            return _train_step(state, batch)

    def _train_step(state: TrainState, batch: Batch):
        trainable, frozen = state["trainable"], state["frozen"]
        step_key = jax.random.fold_in(jax.random.key(seed), state["step"])

        def accumulate(carry, indexed: tuple[jax.Array, Batch]):
            grad_sum, sums = carry
            index, micro = indexed
            drop = Dropout(jax.random.fold_in(step_key, index), rate=dropout) if dropout else None
            if item_id_dropout and "item_ids" in micro:
                id_key = jax.random.fold_in(jax.random.fold_in(step_key, index), ITEM_ID_STREAM)
                micro = {**micro, "item_ids": drop_item_ids(micro["item_ids"], id_key, item_id_dropout)}
            (_, micro_sums), grads = loss_and_grad(trainable, frozen, micro, drop)
            return (jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, sums, micro_sums)), None

        micro_batches = _micro_batches(batch, grad_accum_steps, mesh)
        zero_sums = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), jax.eval_shape(
            lambda b: objective(trainable, frozen, b, None)[1], jax.tree.map(lambda x: x[0], micro_batches)))
        (grad_sum, sums), _ = jax.lax.scan(accumulate, (jax.tree.map(jnp.zeros_like, trainable), zero_sums),
                                           (jnp.arange(grad_accum_steps), micro_batches))
        denominator = jnp.maximum(sums["weight"], 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grad_sum)
        updates, opt = tx.update(grads, state["opt"], trainable)
        new_trainable = apply_masked_updates(trainable, updates, masks)
        new_state = {"step": state["step"] + 1, "frozen": frozen, "opt": opt, "trainable": new_trainable}
        if ema_decay:
            new_state["ema"] = ema_update(state["ema"], new_trainable, masks, state["step"], ema_decay)
        metrics = {name: value / denominator for name, value in sums.items() if name != "weight"}
        metrics.update(loss_tokens=sums["weight"], learning_rate=schedule(state["step"]),
                       grad_norm=optax.tree.norm(jax.tree.map(lambda g, m: g * m, grads, masks)))
        return new_state, metrics

    def eval_step(state: TrainState, batch: Batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _eval_step(state, batch)

    def _eval_step(state: TrainState, batch: Batch):
        _, sums = eval_objective(evaluated_weights(state), state["frozen"], batch, None)
        return sums["loss"], sums["weight"]

    return StepFunctions(
        train=jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                      out_shardings=(state_shardings, replicated), donate_argnums=0),
        eval=jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(replicated, replicated)),
        batch_sharding=batch_in,
    )
