"""`LayerStack`: a decoder's layers and the loop that runs them, shared by TNL and the Transformer.

Groups: consecutive layers of the same structure (the same `kind(layer)`) form a group. With
`scan=True` a group of n > 1 layers is created once with `nnx.vmap` (every parameter gets a leading
[n] "layers" axis) and run with `lax.scan`, so a long model compiles one layer body per group;
otherwise every layer is its own group, run in a Python loop. Either way a group runs through
`nnx.split` / `nnx.merge` inside a pure function, which is what `jax.checkpoint` (the remat policy)
and `lax.scan` need, and what survives NNX's tree mode.

Per-layer values that travel with the loop (TNL's decay rates, a prefill's returned states, a
decode cache) are kept *per group*: a single layer's value as is, a scanned group's stacked on a
leading [count] axis. `per_layer` builds such inputs from a function of the layer index;
`unstack` turns per-group values back into one value per layer.

State paths: the stack is an `nnx.List` whose items are the groups, so a model that assigns it to
`self.groups` keeps its parameters at ``groups/<group index>/...`` (what checkpoints, sharding
rules and optimizer masks see). The layout and remat policy are static (in the graphdef, not the
state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightning_jax.checks import ArgumentError
from lightning_jax.models.layers import laid_out_for_decoding

# fn(layer_module, x, inputs) -> (x, output): one layer's step of the loop. `inputs` is this
# layer's slice of the per-group inputs (None when there are none); `output` (any pytree, or None)
# comes back per group, stacked on [count] for a scanned group.
LayerFn = Callable[[nnx.Module, jax.Array, Any], tuple[jax.Array, Any]]


def remat_policy(name: str):
    """(use_remat, policy) for a config's `remat` field (config.REMAT_POLICIES)."""
    return {
        "none": (False, None),
        "full": (True, None),  # save nothing: recompute the whole layer in the backward pass
        "dots": (True, jax.checkpoint_policies.checkpoint_dots),
        "dots_no_batch": (True, jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    }[name]


def layer_groups(num_layers: int, kind: Callable[[int], Hashable], scan: bool) -> tuple[tuple[int, int], ...]:
    """(first_layer, count) runs: maximal runs of equal `kind` when `scan`, else one per layer."""
    if not scan:
        return tuple((layer, 1) for layer in range(num_layers))
    groups, first = [], 0
    for layer in range(1, num_layers + 1):
        if layer == num_layers or kind(layer) != kind(first):
            groups.append((first, layer - first))
            first = layer
    return tuple(groups)


def create_group(factory: Callable[[int, nnx.Rngs], nnx.Module], first: int, count: int,
                 rngs: nnx.Rngs) -> nnx.Module:
    """One layer (count == 1), or `count` layers stacked on a leading "layers" axis."""
    if count == 1:
        return factory(first, rngs)

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return factory(first, rngs)

    return create(rngs)


def apply_group(module: nnx.Module, count: int, fn: LayerFn, x: jax.Array, inputs: Any,
                remat: str = "none") -> tuple[jax.Array, Any]:
    """Runs `fn` over one group's layers: (x, per-group inputs) -> (x, per-group outputs).

    For a stacked group (count > 1) `inputs` has a leading [count] axis and the outputs come back
    stacked; otherwise they pass as they are. Remat wraps each layer, so the backward pass keeps
    one `x` per layer and recomputes the rest."""
    graphdef, state = nnx.split(module)
    stacked = count > 1

    def body(x, layer_state_and_inputs):
        layer_state, layer_inputs = layer_state_and_inputs
        if stacked:  # scan hands out one layer's slice; drop "layers" from its sharding metadata too
            layer_state = nnx.spmd.remove_axis(layer_state, 0, {nnx.PARTITION_NAME: "layers"})
        return fn(nnx.merge(graphdef, layer_state), x, layer_inputs)

    use_remat, policy = remat_policy(remat)
    if use_remat:
        # Under scan the body is traced once, so CSE cannot undo the remat; a Python loop needs
        # prevent_cse to stop XLA from merging the recomputation with the forward.
        body = jax.checkpoint(body, policy=policy, prevent_cse=not stacked)
    if stacked:
        return jax.lax.scan(body, x, (state, inputs))
    return body(x, (state, inputs))


def _stack(values: Sequence[Any]) -> Any:
    """Per-layer pytrees -> one pytree with a leading [len(values)] axis (numpy stays numpy, so
    constants such as decay rates stay compile-time constants)."""
    return jax.tree.map(lambda *leaves: np.stack(leaves) if all(isinstance(l, np.ndarray) for l in leaves)
                        else jnp.stack(leaves), *values)


class LayerStack(nnx.List):
    """`num_layers` layers built by `factory(layer, rngs)`, held in groups, and the loop over them.

    The items of this list are the groups (`stack[i]` is group i; a scanned group's parameters
    have a leading [count] axis). `layout` holds each group's (first_layer, count).

    `stack(fn, x, inputs)` runs the forward (training, prefill) under the remat policy;
    `stack.decode(fn, x, inputs)` runs one decoding step, without remat (never differentiated).
    Both take and return x [batch, time, D] and per-group `inputs` / outputs (see the module
    docstring and `LayerFn`).
    """

    def __init__(self, num_layers: int, factory: Callable[[int, nnx.Rngs], nnx.Module], *,
                 kind: Callable[[int], Hashable] | None = None, scan: bool = False, remat: str = "none",
                 rngs: nnx.Rngs):
        """kind(layer): layers of equal kind have the same structure and may share a scanned group
        (default: all layers alike). scan: stack and scan such groups. remat: config.REMAT_POLICIES."""
        layout = layer_groups(num_layers, kind or (lambda layer: 0), scan)
        # Groups are created in layer order. A scanned group draws its layers' parameters in one
        # vmapped call, so the same seed gives other values than unscanned layers (`relayout`
        # converts a model's parameters between the two layouts).
        super().__init__(create_group(factory, first, count, rngs) for first, count in layout)
        self.layout = layout
        self.num_layers = num_layers
        self.remat = remat

    # Per-layer values <-> per-group values -----------------------------------------------------

    def per_layer(self, fn: Callable[[int], Any]) -> tuple[Any, ...]:
        """Per-group inputs from a function of the layer index: fn(first) for a single layer,
        [count]-stacked fn(layer)s for a scanned group. E.g. TNL's rates: [heads] or [count, heads]."""
        return tuple(fn(first) if count == 1 else _stack([fn(layer) for layer in range(first, first + count)])
                     for first, count in self.layout)

    def unstack(self, per_group: Sequence[Any]) -> list[Any]:
        """Per-group values (as the loop returns them) -> a list of one value per layer."""
        out = []
        for (_, count), value in zip(self.layout, per_group, strict=True):
            if count == 1:
                out.append(value)
            else:
                out.extend(jax.tree.map(lambda leaf, i=i: leaf[i], value) for i in range(count))
        return out

    # The loop ----------------------------------------------------------------------------------

    def __call__(self, fn: LayerFn, x: jax.Array, inputs: Sequence[Any] | None = None):
        """Forward through every layer under the remat policy. x: [batch, time, D]; inputs: one
        pytree per group, or None. Returns (x [batch, time, D], tuple of per-group outputs)."""
        return self._loop(fn, x, inputs, self.remat)

    def decode(self, fn: LayerFn, x: jax.Array, inputs: Sequence[Any] | None = None):
        """As `__call__` for one decoding step (x [batch, 1, D]), without remat: nothing here is
        differentiated, so recomputation would only cost time."""
        return self._loop(fn, x, inputs, "none")

    def _loop(self, fn: LayerFn, x: jax.Array, inputs: Sequence[Any] | None, remat: str):
        if inputs is None:
            inputs = (None,) * len(self.layout)
        elif len(inputs) != len(self.layout):
            raise ArgumentError("inputs", f"got {len(inputs)} per-group values, expected {len(self.layout)} "
                                          f"(one per group of layout {self.layout})")
        outputs = []
        with jax.named_scope("layers"):
            for (first, count), group, group_inputs in zip(self.layout, self, inputs):
                # One scope per group, named by its layers, so a profile shows where time goes.
                scope = f"layer_{first}" if count == 1 else f"layers_{first}_{first + count - 1}"
                with jax.named_scope(scope):
                    x, out = apply_group(group, count, fn, x, group_inputs, remat)
                outputs.append(out)
        return x, tuple(outputs)


# Layouts: the same layers, scanned or not ------------------------------------------------------


def layer_stacks(model: nnx.Module) -> dict[tuple, LayerStack]:
    """The `LayerStack`s in `model` by path (e.g. {("groups",): model.groups} for TNL / Transformer)."""
    return {tuple(path): node for path, node in nnx.iter_graph(model) if isinstance(node, LayerStack)}


def is_stacked(model: nnx.Module) -> bool:
    """Whether some layer group of `model` is stacked (a scanned group of more than one layer)."""
    return any(count > 1 for stack in layer_stacks(model).values() for _, count in stack.layout)


def _group_of(layout: Sequence[tuple[int, int]], layer: int) -> int:
    for group, (first, count) in enumerate(layout):
        if first <= layer < first + count:
            return group
    raise ValueError(f"layer {layer} is in no group of layout {tuple(layout)}")


def restack(leaves: dict[tuple, Any], layouts_from: dict[tuple, Sequence[tuple[int, int]]],
            layouts_to: dict[tuple, Sequence[tuple[int, int]]]) -> dict[tuple, Any]:
    """A model's state leaves from one layer layout to another (pure: works on traced arrays).

    leaves: flat state, path -> array (as `nnx.to_flat_state`, values taken out of the Variables).
    layouts_from / layouts_to: stack path -> its (first_layer, count) groups before / after, e.g.
    ``{("groups",): ((0, 1), (1, 2))}`` -> ``{("groups",): ((0, 1), (1, 1), (2, 1))}``. A leaf at
    ``<stack>/<group>/<rest>`` belongs to layer(s) of that group (a [count] leading axis when
    count > 1); the result has the leaves of the target groups, a layer's slice for count 1 and
    the layers stacked for count > 1. Leaves outside the stacks pass through."""
    if set(layouts_from) != set(layouts_to):
        raise ValueError(f"layer stacks: got {sorted(layouts_to)}, expected those of the source {sorted(layouts_from)}")
    out, under = {}, {}
    for path, leaf in leaves.items():
        stack = next((s for s in layouts_from if len(path) > len(s) and path[:len(s)] == s), None)
        if stack is None:
            out[path] = leaf
        else:
            under.setdefault(stack, {}).setdefault(path[len(stack)], []).append(path[len(stack) + 1:])
    for stack, layout_to in layouts_to.items():
        layout_from = layouts_from[stack]
        layers_from = sum(count for _, count in layout_from)
        if sum(count for _, count in layout_to) != layers_from:
            raise ValueError(f"layout {tuple(layout_to)} of {'/'.join(map(str, stack))}: got "
                             f"{sum(count for _, count in layout_to)} layers, expected {layers_from}")
        rests = under.get(stack, {})

        def layer_leaf(layer, rest):
            group = _group_of(layout_from, layer)
            first, count = layout_from[group]
            leaf = leaves[(*stack, group, *rest)]
            return leaf if count == 1 else jax.lax.index_in_dim(leaf, layer - first, keepdims=False)

        for group, (first, count) in enumerate(layout_to):
            # Layers of one target group have one structure: that of the source group of its first.
            for rest in rests.get(_group_of(layout_from, first), ()):
                per_layer = [layer_leaf(layer, rest) for layer in range(first, first + count)]
                out[(*stack, group, *rest)] = per_layer[0] if count == 1 else jnp.stack(per_layer)
    return out


def _target_sharding(leaf_path, leaves, layouts_from, layouts_to):
    """The sharding of a restacked leaf: its source's (a NamedSharding) less a sliced leading
    "layers" axis, or with one added when stacking; None when unknown."""
    stack = next((s for s in layouts_to if len(leaf_path) > len(s) and leaf_path[:len(s)] == s), None)
    if stack is None:
        source, add, drop = leaves[leaf_path], False, False
    else:
        group, rest = leaf_path[len(stack)], leaf_path[len(stack) + 1:]
        first, count = layouts_to[stack][group]
        source_group = _group_of(layouts_from[stack], first)
        source = leaves[(*stack, source_group, *rest)]
        stacked_from = layouts_from[stack][source_group][1] > 1
        add, drop = count > 1 and not stacked_from, count == 1 and stacked_from
    sharding = getattr(source, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return None
    spec = tuple(sharding.spec)
    spec = spec[1:] if drop else (None, *spec) if add and spec else spec
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _plan(cls, target_config, paths_from, avals_from, layouts_from):
    """What `relayout` needs of the target model `cls(target_config)`, built with `nnx.eval_shape`
    (nothing allocated): (graphdef, its flat abstract state [(path, Variable)], its layouts), after
    checking that restacking a state of these paths and (shape, dtype)s gives exactly its state."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: cls(target_config, rngs=nnx.Rngs(0))))
    layouts_to = tuple((path, tuple(s.layout)) for path, s in layer_stacks(nnx.merge(graphdef, abstract)).items())
    target = tuple((tuple(path), var) for path, var in nnx.to_flat_state(abstract))
    wanted = {path: (tuple(var.get_value().shape), jnp.dtype(var.get_value().dtype)) for path, var in target}
    try:
        produced = jax.eval_shape(
            lambda v: restack(dict(zip(paths_from, v)), dict(layouts_from), dict(layouts_to)),
            [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in avals_from])
        got = {path: (tuple(leaf.shape), jnp.dtype(leaf.dtype)) for path, leaf in produced.items()}
    except (KeyError, ValueError, TypeError) as e:
        got = f"an error ({e!r})"
    if got != wanted:
        raise ValueError(f"relayout of a {cls.__name__}: its state restacked is {got}, expected that of the "
                         f"model built with scan_layers={target_config.scan_layers}: {wanted}")
    return graphdef, target, layouts_to


_plan_cached = functools.lru_cache(maxsize=16)(_plan)


@functools.lru_cache(maxsize=16)
def _restack_program(paths_from, layouts_from, layouts_to, paths_to, shardings):
    """jit(list of source leaves -> list of target leaves), one per structure (and shardings)."""
    def convert(values):
        out = restack(dict(zip(paths_from, values)), dict(layouts_from), dict(layouts_to))
        return [out[path] for path in paths_to]

    return jax.jit(convert) if shardings is None else jax.jit(convert, out_shardings=list(shardings))


def relayout(model: nnx.Module, scan: bool) -> nnx.Module:
    """`model` (TNL, Transformer: a `config` with `scan_layers`, built as `cls(config, rngs=)`)
    with its layers in the layout of `scan_layers=scan`: the same parameters (and any other state),
    a stacked group's leaves sliced into one leaf per layer (`scan=False`), or single layers'
    leaves stacked on a leading [count] axis (`scan=True`). Returns `model` itself when its config
    already says `scan_layers=scan`; otherwise a new model (config `dataclasses.replace`d), and
    `model` is left as it was (checkpoints keep the layout of the training config; convert after
    loading).

    Costs one copy of the layer weights, in one compiled program (cached per structure). Arrays
    with a `NamedSharding` keep it, less the leading "layers" axis when unstacked (with a
    replicated one added when stacked); the Variables' metadata are those of the target layout
    (no "layers" axis name on an unstacked parameter). Decoding is faster unscanned (no per-step
    dynamic slices of the stacked weights and states): `generate` and `Sampler` decode through
    `relayout(model, scan=False)`."""
    config = model.config
    if config.scan_layers == scan:
        return model
    if laid_out_for_decoding(model):
        raise ValueError("model: got a model laid out for decoding (projection weights with their input axes last, "
                         "`layers.inputs_last`), expected one in the training layout: relayout the model first, "
                         "then lay it out for decoding")
    target_config = dataclasses.replace(config, scan_layers=scan)
    layouts_from = tuple((path, tuple(s.layout)) for path, s in layer_stacks(model).items())
    source = [(tuple(path), var.get_value()) for path, var in nnx.to_flat_state(nnx.state(model))]
    paths_from, values = tuple(p for p, _ in source), [v for _, v in source]
    plan_key = (type(model), target_config, paths_from,
                tuple((tuple(jnp.shape(v)), jnp.result_type(v)) for v in values), layouts_from)
    try:
        graphdef, target, layouts_to = _plan_cached(*plan_key)
    except TypeError:  # an unhashable config: plan each time
        graphdef, target, layouts_to = _plan(*plan_key)
    paths_to = tuple(path for path, _ in target)

    shardings = None
    if all(isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer) for v in values):
        leaves, froms, tos = dict(source), dict(layouts_from), dict(layouts_to)
        shardings = tuple(_target_sharding(path, leaves, froms, tos) for path in paths_to)
        if any(s is None for s in shardings):
            shardings = None
    new = _restack_program(paths_from, layouts_from, layouts_to, paths_to, shardings)(values)
    return nnx.merge(graphdef, nnx.from_flat_state([(path, var.replace(value=value))
                                                    for (path, var), value in zip(target, new)]))
