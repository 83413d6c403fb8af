"""The entry point: `lightning_attention_triton`, a `custom_vjp` over the forward and backward
kernels (see the package docstring for the algorithm)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from lightning_jax.attention.pallas_triton.backward import backward
from lightning_jax.attention.pallas_triton.config import DEFAULT_CONFIG, HOPPER, TritonConfig, gpu_facts
from lightning_jax.attention.pallas_triton.forward import forward
from lightning_jax.attention.pallas_triton.plan import Plan, make_plan
from lightning_jax.attention.pallas_triton.tiles import F32


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: Plan, q, k, v, rates, s_in):
    o, final, _ = forward(plan, q, k, v, rates, s_in)
    return o, final


def _attention_fwd(plan: Plan, q, k, v, rates, s_in):
    o, final, r = forward(plan, q, k, v, rates, s_in)
    # Residuals: the inputs and one fp32 state per chunk (R^(j)); nothing per token.
    return (o, final), (q, k, v, rates, r, s_in)


def _attention_bwd(plan: Plan, residuals, cotangents):
    q, k, v, rates, r, s_in = residuals
    d_o, d_final = cotangents
    dq, dk, dv, d_s_in = backward(plan.for_backward(), q, k, v, rates, r, d_o.astype(q.dtype), d_final)
    # The API refuses to differentiate rates (api.lightning_attention), so zero is never used wrongly.
    return dq, dk, dv, jnp.zeros_like(rates), None if s_in is None else d_s_in


_attention.defvjp(_attention_fwd, _attention_bwd)


# Packed documents: the same kernels compiled with the segment gates (`tiles.Gates`); `starts` is
# each token's segment start position, [batch, time] int32. A separate custom_vjp, so the default
# path's program is unchanged.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_segments(plan: Plan, q, k, v, rates, s_in, starts):
    o, final, _ = forward(plan, q, k, v, rates, s_in, starts)
    return o, final


def _attention_segments_fwd(plan: Plan, q, k, v, rates, s_in, starts):
    o, final, r = forward(plan, q, k, v, rates, s_in, starts)
    return (o, final), (q, k, v, rates, r, s_in, starts)


def _attention_segments_bwd(plan: Plan, residuals, cotangents):
    q, k, v, rates, r, s_in, starts = residuals
    d_o, d_final = cotangents
    dq, dk, dv, d_s_in = backward(
        plan.for_backward(), q, k, v, rates, r, d_o.astype(q.dtype), d_final, starts
    )
    return dq, dk, dv, jnp.zeros_like(rates), None if s_in is None else d_s_in, None


_attention_segments.defvjp(_attention_segments_fwd, _attention_segments_bwd)


def segment_starts(segment_ids):
    """[batch, time] int32: the position of the first token of each token's segment (segment ids
    non-decreasing per row). Two tokens share a segment iff their starts are equal."""
    seg = segment_ids.astype(jnp.int32)
    position = jnp.arange(seg.shape[1], dtype=jnp.int32)[None, :]
    boundary = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return lax.cummax(jnp.where(boundary, position, 0), axis=1)


def plan_for(
    q_shape: tuple[int, ...],
    dim_v: int,
    dtype,
    *,
    scale: float = 1.0,
    block_size: int | None = None,
    config: TritonConfig | None = None,
    interpret: bool | None = None,
) -> Plan:
    """The forward's `Plan` of a call (tiling, chunks), as `lightning_attention_triton` makes it:
    for benchmarks and tests that time or check one kernel alone."""
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    # Interpret mode plans for the GPU the defaults were tuned on, as gpu_facts() does without a GPU.
    facts = HOPPER if interpret else gpu_facts()
    return make_plan(
        tuple(q_shape),
        dim_v,
        dtype,
        scale=scale,
        block_size=block_size,
        interpret=interpret,
        config=DEFAULT_CONFIG if config is None else config,
        facts=facts,
    )


def lightning_attention_triton(
    q,
    k,
    v,
    rates,
    initial_state,
    *,
    scale: float = 1.0,
    block_size: int | None = None,
    config: TritonConfig | None = None,
    interpret: bool | None = None,
    segment_ids=None,
):
    """Pallas (Triton) implementation. Shapes as in `lightning_jax.attention.registry`.

    Returns (o [batch, time, heads, dim_v] in q's dtype, final_state fp32 [batch, heads, dk, dv]).
    `block_size` overrides `config.block` (the intra-block size C of the forward kernels).
    `interpret`: True runs the kernels in Pallas interpret mode (any backend; slow), False lowers
    them for the GPU (also on a CPU-only machine, e.g. under `jax.jit(...).lower`), None
    interprets when the default backend is not a GPU.
    `segment_ids` ([batch, time] int, non-decreasing per row): packed documents, the state resets at
    each boundary; the kernels take each token's segment start (`segment_starts`) tiled like time.
    """
    plan = plan_for(
        q.shape, v.shape[-1], q.dtype, scale=scale, block_size=block_size, config=config, interpret=interpret
    )
    # The kernels build every decay from the rate in-kernel; the few XLA-side factors (the first
    # token's decay of the initial state and of its gradient) stay opaque to constant folding when
    # the caller's rates are a compile-time constant, as the XLA path's are (xla.py).
    rates = lax.optimization_barrier(rates.astype(F32))
    if initial_state is not None:
        initial_state = initial_state.astype(F32)
    if segment_ids is not None:
        return _attention_segments(plan, q, k, v, rates, initial_state, segment_starts(segment_ids))
    return _attention(plan, q, k, v, rates, initial_state)
