"""The entry point `lightning_attention_mosaic`: the Mosaic GPU forward in a `custom_vjp` whose
gradients come from the Mosaic kernels themselves (`kernels.backward`) or from the Pallas-Triton
backward kernels: `MosaicConfig.backward`, by default `config.choose_backward`.

Differentiated or not, the forward is the Mosaic kernel. For the Triton backward it also writes the
state entering every chunk of the Triton plan (R^(j), the backward's residuals,
`kernels.forward(chunk=)`), so the backward needs nothing else from a forward. Where the Triton
plan's chunk is not a multiple of the Mosaic block (short sequences) the Triton forward runs
instead; both compute the same function (each checked against the fp32 reference on the GPU,
docs/kernels.md). The Mosaic backward (`kernels.backward`) keeps only the inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lightning_jax import checks
from lightning_jax.attention.pallas_mosaic.config import (MOSAIC_BLOCK, MosaicConfig, choose_backward,
                                                          choose_fused_dkdv, choose_stages, choose_state_split,
                                                          dim_limit, dkdv_plan, launch_plan, tail_plan)
from lightning_jax.attention.pallas_mosaic.kernels import backward, forward
from lightning_jax.attention.pallas_triton.config import gpu_facts
from lightning_jax.attention.pallas_triton.op import _attention_bwd as _triton_bwd
from lightning_jax.attention.pallas_triton.op import _attention_fwd as _triton_fwd
from lightning_jax.attention.pallas_triton.op import plan_for as triton_plan_for


# `forward_settings`, `backward_settings`: the kernels' keyword options for each direction, as tuples of
# (name, value) pairs (hashable, for the custom_vjp's static arguments). `backward_settings` is None
# with the Triton backward, which `plan` describes; the forward for it then runs without a tail
# (`_without_tail`: the chunk states it writes come from one launch).


def _without_tail(settings):
    return {name: value for name, value in settings if name not in ("tail_heads", "tail_pieces")}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(forward_settings, backward_settings, plan, q, k, v, rates, s_in, segment_ids):
    return forward(q, k, v, rates, s_in, segment_ids, **dict(forward_settings))


def _attention_fwd(forward_settings, backward_settings, plan, q, k, v, rates, s_in, segment_ids):
    if plan is None:  # the Mosaic backward: it needs the inputs only
        o_final = forward(q, k, v, rates, s_in, segment_ids, **dict(forward_settings))
        return o_final, (q, k, v, rates, s_in, segment_ids)
    # The Triton backward (no segment ids: the op sends those to the Mosaic backward).
    if plan.chunk % MOSAIC_BLOCK:
        return _triton_fwd(plan, q, k, v, rates, s_in)
    if plan.num_chunks == 1 and s_in is None:  # the Triton backward starts from a zero state
        o, final = forward(q, k, v, rates, s_in, **dict(forward_settings))
        r = None
    else:
        o, final, states = forward(q, k, v, rates, s_in, chunk=plan.chunk, **_without_tail(forward_settings))
        # [batch, heads, N, dim_k, dim_v] -> the Triton layout [batch * heads, N, dk_pad, dv_pad].
        r = states.reshape(plan.batch * plan.heads, plan.num_chunks, plan.dim_k, plan.dim_v)
        r = jnp.pad(r, ((0, 0), (0, 0), (0, plan.dk_pad - plan.dim_k), (0, plan.dv_pad - plan.dim_v)))
    return (o, final), (q, k, v, rates, r, s_in)


def _attention_bwd(forward_settings, backward_settings, plan, residuals, cotangents):
    if plan is None:
        q, k, v, rates, s_in, segment_ids = residuals
        d_o, d_final = cotangents
        dq, dk, dv, d_s_in = backward(q, k, v, rates, s_in, d_o, d_final, segment_ids, **dict(backward_settings))
        # The API refuses to differentiate rates (api.lightning_attention), so zero is never used wrongly.
        return dq, dk, dv, jnp.zeros_like(rates), d_s_in, None
    return (*_triton_bwd(plan, residuals, cotangents), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def lightning_attention_mosaic(
    q,
    k,
    v,
    rates,
    initial_state,
    *,
    scale: float = 1.0,
    block_size: int | None = None,
    config: MosaicConfig | None = None,
    interpret: bool | None = None,
    segment_ids=None,
):
    """Pallas Mosaic GPU forward (Hopper, sm_90), gradients by the Mosaic backward or the
    Pallas-Triton one (`MosaicConfig.backward`; None chooses, `config.choose_backward`). Shapes as
    in `lightning_jax.attention.registry`; q, k, v bfloat16 or float16, dim_k <= 128 with two
    stages (<= 192 with `MosaicConfig(stages=1)`), any dim_v (the Mosaic backward: dim_v within the
    same limit), any length. Segment ids (packed documents) run compiled for the GPU only, with the
    Mosaic backward (dim_v within the limit).

    `block_size`: None or 64 (the forward's block). `interpret`: True runs both backends in their
    interpret modes (any platform, slow), False compiles for the GPU, None interprets when the
    default backend is not a GPU."""
    if q.dtype.itemsize != 2:
        raise checks.ArgumentError("q", f"got dtype {q.dtype}, expected bfloat16 or float16 for 'pallas_mosaic'")
    if block_size not in (None, MOSAIC_BLOCK):
        raise checks.ArgumentError("block_size", f"got {block_size}, expected None or {MOSAIC_BLOCK} for 'pallas_mosaic'")
    config = MosaicConfig() if config is None else config
    stages_limit = dim_limit(config.stages or 2)  # None: the forward's 3 (where chosen) and 2 share one limit
    if q.shape[-1] > stages_limit:
        raise checks.ArgumentError(
            "q", f"got dim_k {q.shape[-1]}, expected <= {stages_limit} for 'pallas_mosaic' with stages={config.stages} "
            "(shared memory); use 'pallas_triton' or 'pallas', which chooses"
        )
    if config.backward == "mosaic" and v.shape[-1] > stages_limit:
        raise checks.ArgumentError(
            "v", f"got dim_v {v.shape[-1]}, expected <= {stages_limit} for the Mosaic backward with "
            f"stages={config.stages} (its dQ and dK sweeps read dO and v as their q); use MosaicConfig(backward='triton')"
        )
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    if segment_ids is not None:
        _check_segments(config, v.shape[-1], stages_limit, interpret)
    batch, time, heads, _ = q.shape
    # Without a GPU (cross-lowering, interpret mode) gpu_facts() plans for an H100/H200.
    dim_v, sm_count = v.shape[-1], gpu_facts().sm_count
    pieces, rows = launch_plan(batch, time, heads, dim_v, sm_count)
    pieces = config.pieces or pieces
    if segment_ids is not None:  # documents need the Mosaic backward (the Triton one reads no Mosaic chunk states)
        backward_kind = "mosaic"
    elif config.backward is not None:
        backward_kind = config.backward
    elif config.gradients is not None:  # a TritonConfig for the gradients asks for the Triton backward
        backward_kind = "triton"
    else:
        backward_kind = choose_backward(batch, time, heads, dim_v, pieces, config.stages or 2, sm_count,
                                        dim_k=q.shape[-1], fused=config.fused_dkdv is not False)
    rows = config.rows_per_program or rows
    tail_heads, tail_pieces = 0, 1
    if config.tail_pieces != 1:
        tail_heads, tail_pieces = tail_plan(batch, time, heads, dim_v, pieces, rows, sm_count)
        tail_pieces = config.tail_pieces or tail_pieces
    split_heads, split_pieces = (tail_heads, tail_pieces) if tail_heads else (heads, pieces)
    shared = (
        ("block", MOSAIC_BLOCK),
        ("scale", float(scale)),
        ("warp_specialized", config.warp_specialized),
        ("pieces", pieces),
        ("rows_per_program", rows),
        ("state_split", config.state_split or choose_state_split(batch, split_heads, dim_v, split_pieces, sm_count)),
        ("interpret", interpret),
    )
    tail = (("tail_heads", tail_heads), ("tail_pieces", tail_pieces)) if tail_heads else ()

    def stages(dim):
        return config.stages or choose_stages(pieces, dim, not interpret, config.warp_specialized)

    forward_settings = (*shared, *tail, ("stages", stages(q.shape[-1])))
    # The backward's dQ and dK sweeps run dim_k-wide value tiles: the tail (planned for dim_v's) only
    # where both dims make the same number of 64-wide tiles.
    same_tiles = -(-q.shape[-1] // 64) == -(-dim_v // 64)
    backward_settings, plan = (*shared, *(tail if same_tiles else ()), ("stages", stages(max(q.shape[-1], dim_v)))), None
    fused_plan = dkdv_plan(batch, time, heads, q.shape[-1], dim_v, sm_count)
    fused = config.fused_dkdv
    if fused is None:
        fused = fused_plan is not None and choose_fused_dkdv(batch, heads, dim_v, fused_plan[0], pieces, sm_count)
    if fused and fused_plan is not None:
        backward_settings = (*backward_settings, ("fused", fused_plan))
    if backward_kind == "triton" or interpret:  # (three interpreted Mosaic kernels in one program could deadlock)
        plan = triton_plan_for(q.shape, v.shape[-1], q.dtype, scale=scale, config=config.gradients, interpret=interpret)
        backward_settings = None
    rates = lax.optimization_barrier(rates.astype(jnp.float32))
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    return _attention(forward_settings, backward_settings, plan, q, k, v, rates, initial_state, segment_ids)


def _check_segments(config, dim_v, stages_limit, interpret):
    """Segment ids run the Mosaic kernels both ways, compiled."""
    if interpret:
        raise checks.ArgumentError(
            "segment_ids", "got segment ids with interpret mode; 'pallas_mosaic' runs them compiled for the GPU only "
            "(its backward would put three interpreted kernels in one program); use 'pallas_triton' to interpret"
        )
    if config.backward == "triton" or config.gradients is not None:
        raise checks.ArgumentError(
            "segment_ids", f"got segment ids with MosaicConfig(backward={config.backward!r}, gradients=...); they run "
            "with the Mosaic backward: leave those two unset"
        )
    if dim_v > stages_limit:
        raise checks.ArgumentError(
            "v", f"got dim_v {dim_v} with segment ids, expected <= {stages_limit} (they need the Mosaic backward)"
        )
