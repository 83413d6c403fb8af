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

from typing import Any, Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightning_jax.checks import ArgumentError

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
        # Groups are created in layer order, so a given Rngs seed gives the same parameters as
        # building the layers one by one.
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
