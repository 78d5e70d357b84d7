"""The device mesh and where every parameter lives on it.

One mesh with axes `('data', 'fsdp', 'tensor')` built from `MeshConfig`. Parameters
name their dimensions with logical axes (metadata `logical_axes` on each `nnx.Param`,
e.g. `('vocab', 'embed')`); `LOGICAL_AXIS_RULES` maps each logical axis to mesh axes.
A mesh axis is used only where it divides the dimension (a 1-head KV projection on a
4-way `tensor` axis stays replicated), and at most once per array, dimensions claiming
axes in order: the embedding `[vocab, embed]` splits its rows over `tensor` and `fsdp`
(the vocabulary is padded to a multiple of 128 for this) and leaves `embed` whole.

Models are created straight into their shardings: `create_sharded` traces the
constructor with `nnx.eval_shape` and runs it under `jax.jit(out_shardings=...)`, and
`load_sharded` fills an abstract model one tensor at a time with
`jax.make_array_from_callback`, so no device ever holds the whole model.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable, Iterable, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from neo_jax.config import MeshConfig
from neo_jax.errors import UserError
from neo_jax.progress import Progress

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it is split over, in order of preference.
LOGICAL_AXIS_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor", "fsdp"),  # embedding and head rows: split on every mesh with model axes
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "length": (),
}

M = TypeVar("M", bound=nnx.Module)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Axis sizes for `num_devices`, resolving one `-1` to the remaining devices."""
    sizes = [config.data, config.fsdp, config.tensor]
    described = ", ".join(f"mesh.{n}={s}" for n, s in zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive with at most one -1, got {described}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if num_devices % known:
            raise UserError(f"{num_devices} devices cannot be split as {described}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise UserError(f"mesh {described} needs {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with axes `MESH_AXES`."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Iterable[str | None], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions are named `logical_axes`."""
    logical_axes = tuple(logical_axes)
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        chosen = []
        for axis in LOGICAL_AXIS_RULES[name] if name is not None else ():
            split = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]
            if axis not in used and size % split == 0:
                chosen.append(axis)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec)


def logical_sharding(logical_axes: Iterable[str | None], shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a `[batch, ...]` input: batch over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def _variable_sharding(variable: nnx.Variable, mesh: Mesh) -> nnx.Variable:
    shape = variable.get_value().shape
    axes = variable.get_metadata().get("logical_axes", (None,) * len(shape))
    return variable.replace(logical_sharding(axes, shape, mesh))


def state_shardings(state, mesh: Mesh):
    """`NamedSharding`s for every Variable of an (abstract or concrete) `nnx.State`.

    Works for model state and for optimizer state, whose variables copy the parameters'
    `logical_axes` metadata; variables without it are replicated.
    """
    return jax.tree.map(lambda v: _variable_sharding(v, mesh), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(constructor: Callable[[], M], mesh: Mesh) -> M:
    """Run `constructor` (e.g. a random init) with every parameter created in its sharding."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
    shardings = state_shardings(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(constructor()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def load_sharded(abstract_model: M, read_param: Callable[[tuple, tuple[int, ...]], np.ndarray], mesh: Mesh,
                 progress_label: str | None = None) -> M:
    """Fill `abstract_model` (from `nnx.eval_shape`) one parameter at a time.

    `read_param(path, shape)` returns the host array of the parameter at `path`, already
    in the model's layout; each device receives only its own slice of it.
    """
    graphdef, abstract_state = nnx.split(abstract_model)
    flat = nnx.to_flat_state(abstract_state)
    progress = Progress(len(flat), label=progress_label, unit="array") if progress_label else None
    loaded = []
    for path, variable in flat:
        value = variable.get_value()
        sharding = _variable_sharding(variable, mesh).get_value()
        host = np.asarray(read_param(path, value.shape), dtype=value.dtype)  # one tensor on the host
        loaded.append((path, variable.replace(
            jax.make_array_from_callback(value.shape, sharding, lambda index, host=host: host[index]))))
        if progress:
            progress.update(len(loaded), {"last": "/".join(map(str, path))}, force=len(loaded) == len(flat))
    if progress:
        progress.close()
    return nnx.merge(graphdef, nnx.from_flat_state(loaded))


# -- command line ------------------------------------------------------------------------
def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    """`--mesh.data/--mesh.fsdp/--mesh.tensor`: the device mesh a command runs on."""
    defaults = MeshConfig()
    for axis in MESH_AXES:
        parser.add_argument(f"--mesh.{axis}", dest=f"mesh_{axis}", type=int, metavar="N", default=getattr(defaults, axis),
                            help=f"size of the '{axis}' mesh axis (-1: all remaining devices; "
                                 f"default {getattr(defaults, axis)})")


def mesh_from_arguments(args: argparse.Namespace) -> Mesh:
    return make_mesh(MeshConfig(**{axis: getattr(args, f"mesh_{axis}") for axis in MESH_AXES}))
