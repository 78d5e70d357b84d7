"""LoRA computed as `x @ W + s * (x @ A) @ B`: the same loss and adapter gradients as the merged
kernel `W + s * A @ B`, no kernel-sized product anywhere in the gradient, and frozen weights that
keep every bit through training steps."""

import dataclasses

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

from neo_jax.model import Decoder
from neo_jax.model.layers import LowRankKernel
from neo_jax.train.config import LoraConfig, OptimizerConfig
from neo_jax.train.stages import StagePlan, learning_rate_schedule, make_optimizer
from neo_jax.train.step import completion_objective, make_steps, new_train_state, train_state_shardings
from neo_jax.sharding import create_sharded, make_mesh, state_shardings
from neo_jax.config import MeshConfig
from neo_jax.model.loss import completion_loss_sums
from test_step_levers import CONFIG, packed_batch

LORA_MODEL = dataclasses.replace(CONFIG, intermediate_size=48)  # no kernel shares a shape with another weight
TARGETS = ("q_kernel", "o_kernel", "up_kernel", "down_kernel")
PLAN = StagePlan("instruct", None, LoraConfig(rank=2, alpha=4.0, targets=TARGETS))


def adapted_setup(seed: int = 0):
    """`(graphdef, trainable, frozen)` of the tiny model, the adapters' B drawn non-zero."""
    graphdef, state = nnx.split(Decoder(LORA_MODEL, nnx.Rngs(0)))
    trainable, frozen = PLAN.split(nnx.to_pure_dict(state), jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 100))
    trainable["lora"] = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape) * 0.1, trainable["lora"])
    return graphdef, trainable, frozen


def merged_loss_sum(trainable, frozen, batch, graphdef, plan):
    """Today's LoRA: the adapters merged into the kernels before the model runs."""
    model = nnx.merge(graphdef, plan.params(trainable, frozen))
    hidden, _ = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
    loss, weight, _ = completion_loss_sums(hidden, model.logits, batch["targets"], batch["loss_mask"],
                                           batch["segment_ids"])
    return loss, {"loss": loss, "weight": weight}


def adapted_loss_sum(trainable, frozen, batch, graphdef, plan):
    """The trainer's own: the adapters kept apart from the kernels (`StagePlan.adapted_params`)."""
    return completion_objective(graphdef, plan)(trainable, frozen, batch, None)


def test_adapted_kernels_give_the_merged_loss_and_gradients():
    graphdef, trainable, frozen = adapted_setup()
    batch = packed_batch()
    adapted = PLAN.adapted_params(trainable, frozen)
    assert isinstance(adapted["layers"][0]["attn"]["o_kernel"], LowRankKernel)
    (loss, _), grads = jax.value_and_grad(adapted_loss_sum, has_aux=True)(trainable, frozen, batch, graphdef,
                                                                         PLAN)
    (want, _), want_grads = jax.value_and_grad(merged_loss_sum, has_aux=True)(trainable, frozen, batch, graphdef,
                                                                              PLAN)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * float(np.abs(expected).max()))


def _jaxprs_in(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _jaxprs_in(item)


def _dot_output_shapes(jaxpr) -> set[tuple[int, ...]]:
    """The output shapes of every matrix product in `jaxpr` and the jaxprs inside it."""
    shapes = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for param in eqn.params.values():
            for inner in _jaxprs_in(param):
                shapes |= _dot_output_shapes(inner)
    return shapes


@pytest.mark.parametrize("loss_fn, kernel_sized", [(adapted_loss_sum, False), (merged_loss_sum, True)])
def test_no_product_of_a_kernels_size_in_the_gradient(loss_fn, kernel_sized):
    """The merged form (the control) forms `A @ B` and the kernel's gradient; the adapted one neither."""
    graphdef, trainable, frozen = adapted_setup()
    grad_fn = jax.grad(lambda t: loss_fn(t, frozen, packed_batch(), graphdef, PLAN)[0])
    shapes = _dot_output_shapes(jax.make_jaxpr(grad_fn)(trainable).jaxpr)
    layer = frozen["layers"][0]
    kernel_shapes = {layer["attn"]["q_kernel"].shape, layer["attn"]["o_kernel"].shape,
                     layer["mlp"]["up_kernel"].shape, layer["mlp"]["down_kernel"].shape}
    flat_shapes = {(int(np.prod(s[:1])), int(np.prod(s[1:]))) for s in kernel_shapes} | {
        (int(np.prod(layer["attn"]["o_kernel"].shape[:2])), layer["attn"]["o_kernel"].shape[2])}
    assert bool(shapes & (kernel_shapes | flat_shapes)) == kernel_sized


def test_frozen_weights_keep_every_bit_through_training_steps():
    mesh = make_mesh(MeshConfig(fsdp=1), jax.devices()[:1])
    model = create_sharded(lambda: Decoder(LORA_MODEL, nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    key = jax.random.key(0)
    trainable, _ = PLAN.split(params, key)
    masks = PLAN.update_masks(trainable)
    optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=0)
    tx = make_optimizer(optimizer, 10, masks)
    init = lambda p: new_train_state(p, PLAN, tx, key)
    shardings = train_state_shardings(jax.eval_shape(init, params),
                                      nnx.to_pure_dict(state_shardings(state, mesh)), PLAN, tx, mesh)
    train_state = jax.jit(init, out_shardings=shardings)(params)
    frozen_before = jax.tree.map(lambda x: np.asarray(x).copy(), train_state["frozen"])
    adapters_before = jax.tree.map(lambda x: np.asarray(x).copy(), train_state["trainable"]["lora"])
    steps = make_steps(graphdef, PLAN, tx, masks, learning_rate_schedule(optimizer, 10), 1, shardings, mesh)
    batch = jax.device_put(packed_batch(), steps.batch_sharding)
    for _ in range(3):
        train_state, metrics = steps.train(train_state, batch)
    assert np.isfinite(float(metrics["loss"]))
    for before, after in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(train_state["frozen"])):
        np.testing.assert_array_equal(np.asarray(after).view(np.uint32), before.view(np.uint32))
    moved = [not np.array_equal(b, a) for b, a in zip(jax.tree.leaves(adapters_before),
                                                      jax.tree.leaves(train_state["trainable"]["lora"]))]
    assert all(moved) and len(moved) == 2 * len(TARGETS) * LORA_MODEL.num_layers
