"""Which parameters learn in each stage, and the optimizer that moves them.

Parameters are the pure dict of the decoder's `nnx.Param`s (`{'embed_tokens': ...,
'layers': {0: {'attn': {'q_kernel': ...}}}}`). A stage splits them into `trainable`
(what the gradient is taken of and the optimizer holds state for) and `frozen`:
- `grounding`: trainable = the token-indexed tables `embed_tokens` and `lm_head`
  (`[vocab, embed]`), and of those only the rows of special and SID code tokens move:
  a `[vocab, 1]` row mask zeroes the other rows' gradients (so clipping and the Adam
  moments never see them) and their final updates (so weight decay never reaches them),
  and `apply_masked_updates` keeps their old bits with a `where` (`-0.0 + 0.0` would
  flip a sign bit), so text rows, padding rows and every other weight stay bit-for-bit
  unchanged.
- `instruct`: every parameter trains.
- `instruct` with LoRA: the targeted projection kernels stay frozen and learn through
  low-rank adapters, computed as `x @ W + alpha / rank * (x @ A) @ B` in the step
  (`adapted_params`; merged into `W` only for the saved model); the special and SID rows
  of the token tables train as in grounding (new tokens need their own embeddings).
Frozen weights get no gradient at all, so XLA never computes their weight gradients.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from neo_jax.errors import UserError
from neo_jax.model.layers import LowRankKernel
from neo_jax.train.config import LoraConfig, OptimizerConfig
from neo_jax.vocab import VocabLayout

Params = dict[str, Any]  # nested pure dict of arrays
Path = tuple[Any, ...]

TOKEN_TABLES = ("embed_tokens", "lm_head")  # `[vocab, embed]`, row i belongs to token i

# LoRA-capable kernels -> how many leading axes are the input (the rest are the output):
# q/k/v `[embed, heads, head_dim]`, o `[heads, head_dim, embed]`, MLP `[in, out]`.
LORA_INPUT_AXES = {"q_kernel": 1, "k_kernel": 1, "v_kernel": 1, "o_kernel": 2,
                   "gate_kernel": 1, "up_kernel": 1, "down_kernel": 1}


def learned_token_rows(layout: VocabLayout) -> np.ndarray:
    """`[padded_vocab, 1]` bool: True for the rows of special and SID code tokens."""
    ids = np.arange(layout.padded_size)
    return ((ids >= layout.specials_start) & (ids < layout.size))[:, None]


def partition(params: Params, is_trainable: Callable[[Path], bool]) -> tuple[Params, Params]:
    """Split a nested dict into (trainable, frozen) nested dicts by leaf path."""
    flat = traverse_util.flatten_dict(params)
    trainable = {path: value for path, value in flat.items() if is_trainable(path)}
    frozen = {path: value for path, value in flat.items() if not is_trainable(path)}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def combine(*parts: Params) -> Params:
    """The union of disjoint nested dicts (inverse of `partition`)."""
    flat: dict[Path, Any] = {}
    for part in parts:
        flat.update(traverse_util.flatten_dict(part))
    return traverse_util.unflatten_dict(flat)


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """The split of one stage, and how to rebuild the model's parameters from its pieces.

    The trainable pytree is `{'model': <trainable params>, 'lora': <adapters>}`, the adapters
    nested like the kernels they adapt, each `{'a': [in, rank], 'b': [rank, out]}`.
    """

    stage: str
    row_mask: np.ndarray | None  # [vocab, 1] bool rows of the token tables that move; None: all rows
    lora: LoraConfig

    def is_trainable(self, path: Path) -> bool:
        if self.stage == "preference" or (self.stage == "instruct" and not self.lora.rank):
            return True
        return path[0] in TOKEN_TABLES

    def is_lora_target(self, path: Path) -> bool:
        return bool(self.lora.rank) and path[-1] in self.lora.targets

    def split(self, params: Params, key: jax.Array) -> tuple[Params, Params]:
        """`(trainable, frozen)` of the full parameters; new LoRA adapters start with `B = 0`."""
        model_trainable, frozen = partition(params, self.is_trainable)
        targets = [(path, value) for path, value in traverse_util.flatten_dict(frozen).items()
                   if self.is_lora_target(path)]
        keys = jax.random.split(key, max(len(targets), 1))
        lora = {path: init_adapter(value.shape, LORA_INPUT_AXES[path[-1]], self.lora.rank, k)
                for (path, value), k in zip(targets, keys)}
        return {"model": model_trainable, "lora": traverse_util.unflatten_dict(lora)}, frozen

    def params(self, trainable: Params, frozen: Params) -> Params:
        """The full parameters of the trained model (what is saved and evaluated by the hooks):
        `adapted_params` with each adapter merged into its kernel."""
        return jax.tree.map(lambda value: value.merged() if isinstance(value, LowRankKernel) else value,
                            self.adapted_params(trainable, frozen),
                            is_leaf=lambda value: isinstance(value, LowRankKernel))

    def adapted_params(self, trainable: Params, frozen: Params) -> Params:
        """The parameters the train and eval steps run with: like `params`, but each adapted kernel
        is a `LowRankKernel` (the frozen kernel and its adapter, never merged), so the step computes
        `x @ W + s * (x @ A) @ B` and no weight gradient of `W`'s size."""
        scale = self.lora.alpha / max(self.lora.rank, 1)
        kernels = traverse_util.flatten_dict(frozen)
        adapters = traverse_util.flatten_dict(trainable["lora"], is_leaf=lambda _, node: set(node) == {"a", "b"})
        for path, adapter in adapters.items():
            kernels[path] = LowRankKernel(kernels[path], adapter["a"], adapter["b"], scale, LORA_INPUT_AXES[path[-1]])
        return combine(trainable["model"], traverse_util.unflatten_dict(kernels))

    def update_masks(self, trainable: Params) -> Params:
        """Per trainable leaf: a bool array broadcastable to it, True where values may change."""
        def mask(path, _):
            in_table = path[0].key == "model" and path[1].key in TOKEN_TABLES
            return self.row_mask if in_table and self.row_mask is not None else np.True_
        return jax.tree_util.tree_map_with_path(mask, trainable)


def make_plan(stage: str, lora: LoraConfig, layout: VocabLayout | None) -> StagePlan:
    """The plan of `stage`; `layout` (the extended vocabulary) is needed unless all rows train."""
    unknown = [name for name in lora.targets if name not in LORA_INPUT_AXES]
    if lora.rank and unknown:
        raise UserError(f"lora.targets: {unknown} are not projection kernels; choose from {list(LORA_INPUT_AXES)}")
    full_rows = stage == "preference" or (stage == "instruct" and not lora.rank)
    return StagePlan(stage, None if full_rows else learned_token_rows(layout), lora)


def init_adapter(shape: tuple[int, ...], input_axes: int, rank: int, key: jax.Array) -> dict[str, jax.Array]:
    """`A` `[in, rank]` ~ N(0, 1/in), `B` `[rank, out]` = 0, so the adapted model starts unchanged."""
    fan_in, fan_out = math.prod(shape[:input_axes]), math.prod(shape[input_axes:])
    a = jax.random.normal(key, (fan_in, rank), jnp.float32) / np.sqrt(fan_in)
    return {"a": a, "b": jnp.zeros((rank, fan_out), jnp.float32)}


def mask_updates(masks: Params) -> optax.GradientTransformation:
    """Multiply each update by its mask (frozen rows get exactly 0.0)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, masks), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_masked_updates(params: Params, updates: Params, masks: Params) -> Params:
    """`params + updates` where the mask allows, the old bits elsewhere."""
    return jax.tree.map(lambda p, u, m: jnp.where(m, p + u, p), params, updates, masks)


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=config.learning_rate * config.end_lr_ratio)


def _decays(path: Path, value: Any) -> bool:
    """Weight decay on matrices (kernels, tables, adapters), not on norm scales or biases."""
    return np.ndim(value) >= 2


def make_optimizer(config: OptimizerConfig, total_steps: int, masks: Params) -> optax.GradientTransformation:
    """Masked gradients -> global-norm clipping -> AdamW (warm-up, cosine decay) -> masked updates.

    The first mask keeps frozen rows out of the clipping norm and the Adam moments; the
    last one zeroes the weight decay AdamW adds, so frozen rows get updates of exactly 0.0.
    """
    decay_mask = lambda tree: jax.tree_util.tree_map_with_path(_decays, tree)
    return optax.chain(
        mask_updates(masks),
        optax.clip_by_global_norm(config.clip_norm) if config.clip_norm else optax.identity(),
        optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2, eps=config.eps,
                    weight_decay=config.weight_decay, mask=decay_mask),
        mask_updates(masks),
    )
