"""The device mesh and where every parameter lives on it.

One mesh with axes `('data', 'fsdp', 'tensor')` built from `MeshConfig`. Parameters
name their dimensions with logical axes (metadata `logical_axes` on each `nnx.Param`,
e.g. `('vocab', 'embed')`); `LOGICAL_AXIS_RULES` maps each logical axis to mesh axes.
A mesh axis is used at most once per array, dimensions claiming axes in order: the
embedding `[vocab, embed]` splits its rows over `tensor` and `fsdp` (the tokenizer pads
the vocabulary for this, to a multiple of 128 unless `tokenizer build --pad-multiple` says
otherwise: every power-of-two split up to 128 ways) and leaves `embed` whole.

Nothing falls back silently: a mesh axis that does not divide the dimension it is meant
to split is an error naming the parameter, the dimension and the axis (`UserError`),
raised while the shardings are worked out, before anything is compiled or placed. The
way round it is explicit: `MeshConfig.allow_replicated` (`mesh.allow_replicated=[kv_heads]`,
`--mesh.allow_replicated kv_heads`) lists logical axes whose dimension may stay whole on
such an axis (a 1-head KV projection on a 4-way `tensor` axis), and every parameter that
uses it is logged on stderr. Restoring or importing a model whose vocabulary is a pre-trained
one (not extended, so never padded) adds `vocab` to that list
(`neo_jax.checkpoint.model_allow_replicated`).

Models are created straight into their shardings: `create_sharded` traces the
constructor with `nnx.eval_shape` and runs it under `jax.jit(out_shardings=...)`, and
`load_sharded` fills an abstract model one tensor at a time with
`jax.make_array_from_callback`, so no device ever holds the whole model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Callable, Iterable, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

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
    """Axis sizes for `num_devices`, resolving one `-1` to the remaining devices (and checking that
    `allow_replicated` names logical axes)."""
    unknown = [name for name in config.allow_replicated if name not in LOGICAL_AXIS_RULES]
    if unknown:
        raise UserError(f"mesh.allow_replicated: {unknown[0]!r} is not a logical axis; choose from "
                        f"{sorted(LOGICAL_AXIS_RULES)}")
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


def abstract_mesh(config: MeshConfig, num_devices: int) -> AbstractMesh:
    """The mesh `make_mesh` would build over `num_devices` devices, which need not exist: enough
    to work out shardings and shard shapes (`neo-jax shard-plan`), not to place arrays."""
    return AbstractMesh(mesh_shape(config, num_devices), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


@dataclasses.dataclass(frozen=True)
class KeptWhole:
    """A dimension left whole on a mesh axis that does not divide it, as `allow_replicated` allows."""

    param: str
    logical_axis: str
    size: int
    mesh_axes: tuple[str, ...]  # the axes it would be split over; the last is the one that does not divide it
    ways: int  # the product of their sizes

    def describe(self) -> str:
        return (f"its {self.logical_axis} dimension ({self.size}) is not divisible by mesh axis "
                f"{' x '.join(self.mesh_axes)} = {self.ways}")


def logical_to_spec(name: str, logical_axes: Iterable[str | None], shape: tuple[int, ...],
                    mesh: Mesh | AbstractMesh, allow_replicated: Iterable[str] = ()
                    ) -> tuple[PartitionSpec, list[KeptWhole]]:
    """The PartitionSpec of the array `name` of `shape` whose dimensions are named `logical_axes`,
    and the dimensions it keeps whole on an axis that does not divide them (only logical axes in
    `allow_replicated` may; any other is a `UserError` naming the array, the dimension and the axis)."""
    logical_axes, allowed = tuple(logical_axes), set(allow_replicated)
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {logical_axes} do not match shape {shape}")
    used: set[str] = set()
    spec, kept = [], []
    for logical, size in zip(logical_axes, shape):
        chosen = []
        for axis in LOGICAL_AXIS_RULES[logical] if logical is not None else ():
            if axis in used:  # an earlier dimension of this array is split over it
                continue
            axes = (*chosen, axis)
            ways = math.prod(mesh.shape[a] for a in axes)
            if size % ways == 0:
                chosen.append(axis)
                continue
            whole = KeptWhole(name, logical, size, axes, ways)
            if logical not in allowed:
                padding = " (or pad it: tokenizer build --pad-multiple)" if logical == "vocab" else ""
                raise UserError(f"{name}: {whole.describe()}; choose a mesh whose axes divide it{padding}, or add "
                                f"{logical} to mesh.allow_replicated to keep it whole on {axis}")
            kept.append(whole)
        used.update(chosen)
        spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*spec), kept


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Sharding of a `[batch, ...]` input: batch over `data` and `fsdp`, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def state_shardings(state, mesh: Mesh | AbstractMesh, allow_replicated: Iterable[str] = ()):
    """`NamedSharding`s for every Variable of an (abstract or concrete) `nnx.State`, as its
    `logical_axes` metadata say (variables without it are replicated); see `logical_to_spec` for
    `allow_replicated`. Each dimension it keeps whole is logged, one line per kind. Works for model
    state and for optimizer state, whose variables copy the parameters' `logical_axes` metadata."""
    kept: list[KeptWhole] = []

    def sharding(path, variable: nnx.Variable) -> nnx.Variable:
        shape = variable.get_value().shape
        axes = variable.get_metadata().get("logical_axes", (None,) * len(shape))
        spec, whole = logical_to_spec(jax.tree_util.keystr(path, simple=True, separator="."), axes, shape, mesh,
                                      allow_replicated)
        kept.extend(whole)
        return variable.replace(NamedSharding(mesh, spec))

    shardings = jax.tree_util.tree_map_with_path(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    _log_kept_whole(kept)
    return shardings


def _log_kept_whole(kept: list[KeptWhole]) -> None:
    """One stderr line (process 0) per kind of dimension kept whole, naming its first parameter."""
    if jax.process_index() != 0:
        return
    groups: dict[tuple, list[KeptWhole]] = {}
    for whole in kept:
        groups.setdefault((whole.logical_axis, whole.size, whole.mesh_axes), []).append(whole)
    for same in groups.values():
        more = f" and {len(same) - 1} more" if len(same) > 1 else ""
        print(f"neo_jax: {same[0].param}{more}: {same[0].describe()}; kept whole on {same[0].mesh_axes[-1]} "
              "(allow_replicated)", file=sys.stderr, flush=True)


def create_sharded(constructor: Callable[[], M], mesh: Mesh, allow_replicated: Iterable[str] = ()) -> M:
    """Run `constructor` (e.g. a random init) with every parameter created in its sharding."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(constructor))
    shardings = state_shardings(abstract_state, mesh, allow_replicated)
    state = jax.jit(lambda: nnx.state(constructor()), out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def load_sharded(abstract_model: M, read_param: Callable[[tuple, tuple[int, ...]], np.ndarray], mesh: Mesh,
                 progress_label: str | None = None, allow_replicated: Iterable[str] = ()) -> M:
    """Fill `abstract_model` (from `nnx.eval_shape`) one parameter at a time.

    `read_param(path, shape)` returns the host array of the parameter at `path`, already
    in the model's layout; each device receives only its own slice of it.
    """
    graphdef, abstract_state = nnx.split(abstract_model)
    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh, allow_replicated)))
    flat = nnx.to_flat_state(abstract_state)
    progress = Progress(len(flat), label=progress_label, unit="array") if progress_label else None
    loaded = []
    for path, variable in flat:
        value = variable.get_value()
        sharding = shardings[path].get_value()
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
    """`--mesh.data/--mesh.fsdp/--mesh.tensor`: the device mesh a command runs on, and
    `--mesh.allow_replicated` (`args.mesh_allow_replicated`, for the loaders' `allow_replicated`)."""
    defaults = MeshConfig()
    for axis in MESH_AXES:
        parser.add_argument(f"--mesh.{axis}", dest=f"mesh_{axis}", type=int, metavar="N", default=getattr(defaults, axis),
                            help=f"size of the '{axis}' mesh axis (-1: all remaining devices; "
                                 f"default {getattr(defaults, axis)})")
    parser.add_argument("--mesh.allow_replicated", dest="mesh_allow_replicated", metavar="AXES", default=(),
                        type=lambda text: tuple(name for name in text.split(",") if name),
                        help="comma-separated logical axes (e.g. kv_heads,vocab) whose dimension may stay whole on a "
                             "mesh axis that does not divide it (logged); any other such dimension is an error")


def mesh_from_arguments(args: argparse.Namespace) -> Mesh:
    return make_mesh(MeshConfig(**{axis: getattr(args, f"mesh_{axis}") for axis in MESH_AXES},
                                allow_replicated=args.mesh_allow_replicated))
