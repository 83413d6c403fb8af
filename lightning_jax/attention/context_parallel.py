"""Context parallelism: one sequence split over the devices of a mesh axis, one collective per call.

`lightning_attention(..., context_axis="context")` inside `jax.shard_map`: device i of that axis
(n devices) holds tokens [i T, (i + 1) T) of the sequence, T = q.shape[1] its slice length (shard_map
splits time evenly, so every slice has the same length; any T, odd ones included). The op is linear
in its initial state, so the sequence splits exactly (LASP-2's scheme, for a constant decay):

1. Each device reduces its slice to its local state from zero, U_i = sum_t lambda^(T-1-t) k_t^T v_t
   (one [dk, dv] contraction over T per head, no attention).
2. ONE collective: an all-gather of U_i over the axis (fp32 [batch, heads, dk, dv] per device,
   whatever the length). The slice decay lambda^T needs no message: T and the rates are the same on
   every device.
3. A local combine gives the state entering slice i and the state after the whole sequence:

       S_in_i = lambda^(T i) S_0 + sum_{j < i} lambda^(T (i-1-j)) U_j
       S_fin  = lambda^(T n) S_0 + sum_{j < n} lambda^(T (n-1-j)) U_j        (the same everywhere)

   each weight one exp(-rate * delta) with delta >= 0 (never a division by a decay).
4. The chosen implementation computes the slice once, from S_in_i: its own inter-block path adds
   diag(lambda^(t+1)) (scale q) S_in_i, so o is rounded once, exactly as a single-device call with
   an initial state. The alternative, computing the slice from zero and then adding that term as
   an fp32 correction, has the same FLOPs (step 1's contraction is the correction's size) but reads
   q and o and writes o again where step 1 reads k and v, and rounds o twice. Measured on one H200
   (bf16, batch 1, 16 heads, dim 128, 8K-128K tokens per device, Pallas): the forward is 7-30 %
   faster this way.

The backward is JAX autodiff through the combine and the all-gather: the all-gather transposes to a
reduce-scatter, which sums on device j the cotangents every later slice sends to U_j (the reverse
exclusive combine); the implementation returns the cotangent of S_in_i, and step 1 has its own
small backward (two contractions, operands rounded as the kernels round theirs). A differentiated
`initial_state` (replicated) also gets the usual all-reduce of its gradient over the axis.

Packed documents (`segment_ids`, this device's slice of them): the state resets at each document
boundary, so step 1 reduces only the slice's last document (tokens from its last start on), and
each device also contributes three small integers per row to a second all-gather: its first and
last segment ids and whether a document starts inside it. A slice blocks the state from earlier
slices when a document starts in it or at its first token (its first id differs from the previous
slice's last); S_in_i sums only the local states that reach slice i unblocked, and is zero when
slice i itself starts a new document. The implementation then runs the slice with its segment ids,
applying S_in_i to its first document only.

Collective cost per device and call, with S = 4 x batch x heads x dk x dv bytes (the fp32 state of
this device's batch and heads; 1 MiB for batch 1, 16 heads, dims 128): the forward's all-gather
receives (n - 1) S and holds n S; the backward's reduce-scatter sends (n - 1) S. Independent of
the sequence length.

The final state: by default the all-gather's result is typed as varying along the axis (shard_map's
`check_vma`), which a replicated `out_specs` refuses. With `return_final_state=True` under
`check_vma` the gather is made invariant (`all_gather(..., to="invarying")`): the state can be
returned with an out_spec that omits the axis; its backward is then an all-reduce of the n S
cotangent instead of the reduce-scatter (about twice the bytes). Without `check_vma` the plain
all-gather is kept (an invariant gather transposes to a local slice, which is only right when JAX
tracks what varies) and the state, equal on every device, may still be returned replicated. The
Pallas implementation needs `check_vma=False` under shard_map in any case (its kernels' outputs
carry no varying-axes type), as models/sharding.py does.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from lightning_jax import checks

_F32 = jnp.float32
_HIGHEST = lax.Precision.HIGHEST


def check_context_axis(context_axis) -> str:
    """A str naming a mesh axis bound here (inside `jax.shard_map` over it, or `pmap`)."""
    if not isinstance(context_axis, str):
        checks.fail("context_axis", context_axis, "a mesh axis name (a str) or None", kind=checks.ArgumentTypeError)
    try:
        lax.axis_size(context_axis)
    except NameError:
        in_scope = tuple(jax.sharding.get_abstract_mesh().manual_axes)
        checks.fail(
            "context_axis", context_axis,
            "the name of a mesh axis in scope: call lightning_attention inside jax.shard_map over a mesh "
            "with that axis, with q, k, v split along time over it "
            f"(manual mesh axes in scope here: {list(in_scope) or 'none'})",
        )
    return context_axis


def context_parallel_attention(
    impl: Callable,
    q,
    k,
    v,
    rates,
    initial_state,
    *,
    context_axis: str,
    return_final_state: bool,
    scale: float,
    block_size,
    config,
    interpret,
    segment_ids=None,
):
    """This device's slice of a sequence split along time over `context_axis`.

    `impl` is an implementation from the registry (its common signature); the other arguments are
    the op's, already checked, with `rates` fp32 [heads], `initial_state` fp32 or None (the state
    before the sequence's first token, the same on every device) and `segment_ids` None or int32
    [batch, T], this slice's. Returns (o of this slice, final_state after the whole sequence, the
    same on every device).
    """
    time = q.shape[1]  # T: this slice's length, the same on every device
    index, size = lax.axis_index(context_axis), lax.axis_size(context_axis)

    def gather(x):  # [n, ...]: invariant along the axis when the final state is returned (see above)
        invariant = return_final_state and context_axis in _varying_axes(x)
        return lax.all_gather(x, context_axis, to="invarying" if invariant else "varying")

    gates, k_last = None, k
    if segment_ids is not None:
        starts = segment_ids[:, 1:] != segment_ids[:, :-1]  # [batch, T - 1]: a document starts at t + 1
        last_start = jnp.max(jnp.where(starts, jnp.arange(1, time), 0), axis=1, initial=0)  # [batch]
        # Only the slice's last document reaches its end state.
        in_last = jnp.arange(time)[None, :] >= last_start[:, None]
        k_last = jnp.where(in_last[:, :, None, None], k, jnp.zeros((), k.dtype))
        facts = jnp.stack([segment_ids[:, 0], segment_ids[:, -1], jnp.any(starts, axis=1).astype(jnp.int32)], -1)
        gates = _segment_gates(gather(facts), index, size)
    gathered = gather(_local_state(k_last, v, rates))  # the local states U_j, [n, batch, heads, dk, dv]
    s_in, final_state = _combine(gathered, rates, initial_state, time, index, size, gates)
    documents = {} if segment_ids is None else {"segment_ids": segment_ids}
    o, _ = impl(q, k, v, rates, s_in, scale=scale, block_size=block_size, config=config, interpret=interpret,
                **documents)
    return o, final_state


def _varying_axes(x) -> frozenset:
    """The mesh axes x varies along, as shard_map's `check_vma` tracks them (empty when it does
    not track them, then every collective keeps its untyped meaning)."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
    return frozenset(vma)


@jax.custom_vjp
def _local_state(k, v, rates):
    """U = sum_t lambda^(T-1-t) k_t^T v_t: [batch, heads, dk, dv] fp32, the slice's state from zero.

    Operands as the Pallas kernels take them, forward and backward: bf16/fp16 inputs multiply as
    bf16/fp16 (the decay folded into k, the fp32 cotangent of U rounded, as the kernels round their
    states) with fp32 accumulators; fp32 inputs multiply in true fp32 (HIGHEST, never TF32)."""
    return _local_state_forward(k, v, rates)[0]


def _operands(k, v, rates):
    """(k decayed, v, decay [1, T, heads, 1], rounding dtype, operand dtype, precision)."""
    time = k.shape[1]
    precise = jnp.dtype(k.dtype).itemsize >= 4
    rounding = jnp.promote_types(k.dtype, _F32) if precise else k.dtype
    # XLA's CPU runtime has no bf16 x bf16 -> fp32 dot for every layout: off the GPU, the rounded
    # bf16/fp16 values are multiplied as fp32 (exactly the same products), on it as bf16/fp16.
    operand = rounding if precise or jax.default_backend() == "gpu" else _F32
    delta = jnp.arange(time - 1, -1, -1, dtype=_F32)  # T-1-t >= 0
    # Opaque to constant folding, as in xla.py: with constant rates, the [T, heads] factors would
    # otherwise be folded into a literal by XLA's slow evaluator. Math unchanged.
    rates, delta = lax.optimization_barrier((rates.astype(_F32), delta))
    decay = jnp.exp(-delta[:, None] * rates[None, :])[None, :, :, None]  # [1, T, heads, 1]
    k_decayed = (k.astype(_F32) * decay).astype(rounding).astype(operand)
    precision = _HIGHEST if operand == _F32 or precise else None
    return k_decayed, v.astype(operand), decay, rounding, operand, precision


def _local_state_forward(k, v, rates):
    k_decayed, v_op, _, _, _, precision = _operands(k, v, rates)
    u = jnp.einsum("bthd,bthe->bhde", k_decayed, v_op, precision=precision, preferred_element_type=_F32)
    return u, (k, v, rates)


def _local_state_backward(residuals, d_u):
    k, v, rates = residuals
    k_decayed, v_op, decay, rounding, operand, precision = _operands(k, v, rates)
    d_u = d_u.astype(rounding).astype(operand)
    d_k = jnp.einsum("bthe,bhde->bthd", v_op, d_u, precision=precision, preferred_element_type=_F32) * decay
    d_v = jnp.einsum("bthd,bhde->bthe", k_decayed, d_u, precision=precision, preferred_element_type=_F32)
    # No gradient for the rates: the op refuses to differentiate them (api._no_rate_gradient).
    return d_k.astype(k.dtype), d_v.astype(v.dtype), jnp.zeros_like(rates)


_local_state.defvjp(_local_state_forward, _local_state_backward)


def _segment_gates(facts, index, size: int):
    """From every slice's (first segment id, last segment id, a document starts inside) [size,
    batch, 3]: which local states reach slice `index`'s start and the sequence's end, as 0/1 fp32
    (reach_in [size, batch], reach_end [size, batch]), and whether the initial state does (init_in,
    init_end [batch])."""
    first, last, inside = facts[..., 0], facts[..., 1], facts[..., 2] > 0
    starts_new = jnp.concatenate([jnp.zeros_like(first[:1], bool), first[1:] != last[:-1]])  # at the first token
    blocks = jnp.cumsum((starts_new | inside).astype(jnp.int32), axis=0)  # [size, batch], inclusive
    before = jnp.where(index > 0, blocks[jnp.maximum(index - 1, 0)], 0)  # blocking slices among 0..index-1
    open_here = ~starts_new[index]
    # Slice j < index reaches slice index unless a slice strictly between them blocks (j's own
    # inner starts are already in U_j); slices j >= index get weight 0 from _combine anyway.
    reach_in = ((before[None, :] - blocks) == 0) & open_here[None, :]
    reach_end = (blocks[-1][None, :] - blocks) == 0
    init_in = (before == 0) & open_here
    init_end = blocks[-1] == 0
    return tuple(x.astype(_F32) for x in (reach_in, reach_end, init_in, init_end))


def _combine(gathered, rates, initial_state, time: int, index, size: int, gates=None):
    """The state entering slice `index` and the state after all `size` slices, from the gathered
    local states [size, batch, heads, dk, dv]; `gates` (packed documents): `_segment_gates`.
    Elementwise fp32 (no dot: no TF32 on a GPU)."""
    rates = rates.astype(_F32)
    j = jnp.arange(size)
    # Slice j's state reaches the start of slice i after T (i - 1 - j) more tokens; j >= i: masked
    # in the exponent (exp(-inf) = 0), never as exp(+x) * 0.
    lag_in = (index - 1 - j).astype(_F32) * time  # [size]
    w_in = jnp.exp(jnp.where(lag_in[:, None] >= 0, -rates[None, :] * lag_in[:, None], -jnp.inf))  # [size, heads]
    lag_fin = (size - 1 - j).astype(_F32) * time
    w_fin = jnp.exp(-rates[None, :] * lag_fin[:, None])
    w_in, w_fin = w_in[:, None, :], w_fin[:, None, :]  # [size, 1 or batch, heads]
    if gates is not None:
        reach_in, reach_end, init_in, init_end = gates
        w_in, w_fin = w_in * reach_in[:, :, None], w_fin * reach_end[:, :, None]
    s_in = jnp.sum(w_in[..., None, None] * gathered, axis=0)
    final_state = jnp.sum(w_fin[..., None, None] * gathered, axis=0)
    if initial_state is not None:
        s0 = initial_state.astype(_F32)
        w0_in = jnp.exp(-rates * (jnp.asarray(index, _F32) * time))[None, :]  # [1, heads]
        w0_fin = jnp.exp(-rates * float(size * time))[None, :]
        if gates is not None:
            w0_in, w0_fin = w0_in * init_in[:, None], w0_fin * init_end[:, None]
        s_in = s_in + w0_in[..., None, None] * s0
        final_state = final_state + w0_fin[..., None, None] * s0
    return s_in, final_state
