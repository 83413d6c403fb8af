"""Logical axis names -> mesh axes, sharded model creation, and the per-shard attention wrapper.

Every parameter carries logical axis names through `nnx.with_partitioning` (see `layers.py`):

    vocab    token embedding rows, lm_head columns
    embed    the residual stream width D
    heads    attention heads (q/k/v/gate projections, LRPE thetas, output projection)
    mlp      the SGLU / SwiGLU hidden width
    layers   the stacked-layer axis added when `scan_layers` stacks identical layers
    batch    activations only: the batch dimension
    time     activations only: the sequence dimension (training forward; context parallelism)

`DEFAULT_RULES` maps them onto a mesh with axes ("data", "fsdp", "tensor", "context"): batch over
data and fsdp, parameters' embed dimension over fsdp (ZeRO-3 style), heads / mlp / vocab over
tensor, time over context (one sequence split over devices: TNL runs its attention with
`lightning_attention(..., context_axis="context")`, see `context_axis_of`). Rules naming a mesh axis
the current mesh lacks are dropped, so the same rules serve a ("data",) mesh.

The model is written for meshes whose axes are `AxisType.Auto` (XLA propagates shardings from the
parameters and the few constraints we add); `make_mesh` builds one.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import AxisType, PartitionSpec

P = PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "context")

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("time", "context"),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, context: int = 1, *,
              devices=None) -> jax.sharding.Mesh:
    """A ("data", "fsdp", "tensor", "context") mesh with Auto axes; `data=-1` takes the remaining
    devices. `context` splits each sequence over that many devices (context parallelism)."""
    devices = jax.devices() if devices is None else list(devices)
    others = fsdp * tensor * context
    if data == -1:
        if len(devices) % others:
            raise ValueError(
                f"fsdp, tensor, context: got {fsdp} x {tensor} x {context}, expected a divisor of the "
                f"{len(devices)} devices"
            )
        data = len(devices) // others
    if data * others != len(devices):
        raise ValueError(
            f"data, fsdp, tensor, context: got {data} x {fsdp} x {tensor} x {context} = {data * others}, "
            f"expected the number of devices ({len(devices)})"
        )
    return jax.make_mesh(
        (data, fsdp, tensor, context), MESH_AXES, axis_types=(AxisType.Auto,) * 4, devices=devices
    )


def current_rules() -> tuple[tuple[str, Any], ...]:
    """The rules set by `nnx.logical_axis_rules(...)` if any, else `DEFAULT_RULES`."""
    return tuple(core_spmd.get_logical_axis_rules()) or DEFAULT_RULES


def _check_auto(mesh) -> None:
    explicit = [a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit]
    if explicit:
        raise ValueError(
            f"mesh: got Explicit axes {explicit} (jax.make_mesh's default), expected Auto axes: the "
            "models rely on sharding propagation. Build the mesh with lightning_jax.models.make_mesh, "
            "or jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))."
        )


def _current_mesh():
    """The abstract mesh in context, or None (no mesh, or only manual axes as inside jax.pmap)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    _check_auto(mesh)
    return mesh


def _usable_axes(mesh, mesh_axes, size: int | None) -> tuple[str, ...]:
    """The mesh axes of one logical axis that exist, are not manual, and (if `size` is given) whose
    product divides `size`; axes that would not divide it are dropped from the right."""
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        mesh_axes = (mesh_axes,)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    axes = [a for a in mesh_axes if a in types and types[a] != AxisType.Manual]
    while axes and size is not None and size % math.prod(mesh.shape[a] for a in axes):
        axes.pop()
    return tuple(axes)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int] | None = None, rules=None):
    """PartitionSpec for `logical` axis names on the current mesh (None if no mesh is set).

    Mesh axes missing from the mesh, manual there, or not dividing the dimension are left out."""
    mesh = _current_mesh()
    if mesh is None:
        return None
    table = dict(rules if rules is not None else current_rules())
    entries = []
    for i, name in enumerate(logical):
        axes = _usable_axes(mesh, table.get(name), None if shape is None else shape[i]) if name else ()
        entries.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*entries)


def constrain(x: jax.Array, logical: Sequence[str | None], rules=None) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op without a mesh (or inside pmap)."""
    spec = logical_to_spec(logical, x.shape, rules)
    if spec is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def context_axis_of(spec) -> str | None:
    """The mesh axis a [batch, time, ...] array's time dimension is split over in `spec` (a
    `logical_to_spec` result), or None: the `context_axis` to give `lightning_attention` per shard.
    Only a single axis of size > 1 counts (time on several mesh axes is not supported)."""
    if spec is None or len(spec) < 2 or spec[1] is None:
        return None
    axes = (spec[1],) if isinstance(spec[1], str) else tuple(spec[1])
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if len(axes) > 1:
        raise ValueError(f"time: split over mesh axes {axes}, expected at most one (the context axis)")
    return axes[0] if axes else None


def batch_sharding(mesh: jax.sharding.Mesh, rules=None, ndim: int = 2) -> jax.sharding.NamedSharding:
    """NamedSharding of a [batch, time, ...] host input (tokens, targets, weights) on `mesh`: the
    batch over its axes, time whole (replicated over `context`): tokens carry seq_len + 1 columns,
    which do not split evenly; the train step splits inputs and targets over `context` after the
    shift (`training/step.py`), a local slice."""
    table = dict(rules if rules is not None else DEFAULT_RULES)
    axes = _usable_axes(mesh, table.get("batch"), None)
    batch = axes[0] if len(axes) == 1 else (axes or None)
    return jax.sharding.NamedSharding(mesh, P(batch, *([None] * (ndim - 1))))


def create_sharded_model(
    model_factory: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules=None
) -> nnx.Module:
    """Builds `model_factory()` (e.g. `lambda: TNL(cfg, rngs=nnx.Rngs(0))`) with every parameter
    created directly in its annotated sharding on `mesh` (never materialised on one device).

    Call the model later inside `with jax.set_mesh(mesh):` (and `nnx.logical_axis_rules(rules)` if
    you pass non-default rules) so that attention runs per shard."""
    _check_auto(mesh)
    rules = DEFAULT_RULES if rules is None else tuple(rules)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        return nnx.jit(model_factory)()


def sharded_call(fn: Callable, args: Sequence, logical: Sequence[Sequence[str | None] | None],
                 out_logical: Any) -> Any:
    """Runs `fn(*args)` per shard under `jax.shard_map` when a mesh is set, else directly.

    `logical[i]` names the axes of `args[i]` (None for an argument that is None); `out_logical` the
    axes of the outputs (same tree structure as fn's result). Only axes that divide evenly are
    split, so any batch or head count works (less parallel if it does not divide)."""
    mesh = _current_mesh()
    if mesh is None:
        return fn(*args)
    present = [i for i, a in enumerate(args) if a is not None]
    specs = tuple(logical_to_spec(logical[i], args[i].shape) for i in present)

    # Output specs follow the input specs axis by axis, so they are always consistent.
    def out_spec(names):
        table = {}
        for i, spec in zip(present, specs):
            for name, entry in zip(logical[i], spec):
                if name is not None:
                    table.setdefault(name, entry)
        return P(*(table.get(n) if n is not None else None for n in names))

    def is_names(x):
        return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)

    out_specs = jax.tree.map(out_spec, out_logical, is_leaf=is_names)

    def local(*present_args):
        full = list(args)
        for i, a in zip(present, present_args):
            full[i] = a
        return fn(*full)

    return jax.shard_map(local, in_specs=specs, out_specs=out_specs, check_vma=False)(
        *(args[i] for i in present)
    )


def unsplit_axes(model: nnx.Module, mesh: jax.sharding.Mesh) -> list[tuple[str, str, int, tuple[str, ...]]]:
    """The parameter dimensions that their sharding rules would split over mesh axes of size > 1
    but that stay whole, because those axes do not divide them (e.g. vocab 257 over tensor = 2):
    (parameter path, logical name, size, the mesh axes left out), for a start-up warning."""
    found = []
    state = nnx.state(model, nnx.Param)
    for path, var in jax.tree.leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        meta = var.get_metadata() if isinstance(var, nnx.Variable) else {}
        logical, rules = meta.get("out_sharding"), meta.get("sharding_rules") or DEFAULT_RULES
        if not logical or not hasattr(var, "shape"):
            continue
        table = dict(rules)
        for name, size in zip(logical, var.shape):
            wanted = [a for a in _usable_axes(mesh, table.get(name), None) if mesh.shape[a] > 1] if name else []
            kept = _usable_axes(mesh, table.get(name), size) if name else ()
            dropped = tuple(a for a in wanted if a not in kept)
            if dropped:
                found.append((".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path), name, size, dropped))
    return found


def partition_specs(model: nnx.Module, rules=None):
    """The PartitionSpec of each parameter of `model` under `rules` (default DEFAULT_RULES)."""
    rules = DEFAULT_RULES if rules is None else tuple(rules)
    with nnx.logical_axis_rules(rules):
        return nnx.get_partition_spec(nnx.state(model, nnx.Param))
