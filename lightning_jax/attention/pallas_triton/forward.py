"""The forward kernel: per chunk, from its incoming state R^(j), blocks of C tokens in order,

    O_i = ((Q_i K_i^T) * D) V_i + (diag(lambda^a) Q_i) R_i,   R_{i+1} = lambda^E R_i + K_i^T diag(lambda^(E - a)) V_i

tiled along the value dim; the last chunk also writes the final state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lightning_jax.attention.pallas_triton.plan import Plan
from lightning_jax.attention.pallas_triton.states import start_states, unpad_state
from lightning_jax.attention.pallas_triton.tiles import (
    WHOLE,
    Decays,
    Gates,
    Tile,
    call,
    dot,
    head_rate,
    scaled,
    single_state_spec,
    starts_spec,
    state_spec,
    states_shape,
    token_spec,
)


def _forward_kernel(rates_ref, q_ref, k_ref, v_ref, *rest, plan: Plan, has_r0: bool, has_seg: bool = False):
    """Value dim split. Outputs of chunk j from its incoming state R^(j); the last chunk also writes
    the final state. With `has_seg` (packed documents) the first of `rest` is the segment starts
    and every factor is gated (`tiles.Gates`)."""
    if has_seg:
        starts_ref, *rest = rest
    if has_r0:
        r0_ref, o_ref, final_ref = rest
    else:
        o_ref, final_ref = rest
    j = pl.program_id(1)
    tile = Tile(plan, j, "v", pl.program_id(0))
    decays = Decays(head_rate(rates_ref, plan), plan, j, plan.scale)
    gates = Gates(tile, starts_ref) if has_seg else None
    dt = q_ref.dtype

    def body(i, r):
        t0 = i * plan.block
        q = tile.load(q_ref, t0, "k")
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        scores = dot(q, k, plan, trans_b=True) * decays.intra
        from_start = decays.from_start
        if gates is not None:
            same, gate_q, gate_k, gate_state = gates.block(t0)
            scores = jnp.where(same, scores, 0.0)
            from_start = from_start * gate_q
        # diag(lambda^a) (Q R): the decay scales the product's rows, so q is only ever read raw.
        o = dot(q, r.astype(dt), plan) * from_start[:, None]
        o = o + dot(scores.astype(dt), v, plan)
        tile.store(o_ref, t0, o, "v")
        # R_{i+1} = lambda^E R_i + K^T diag(lambda^(E - a)) V, E the block's end exponent.
        state_decay, row_decay = decays.block(t0)
        if gates is not None:
            state_decay, row_decay = state_decay * gate_state, row_decay * gate_k
        return state_decay * r + dot(k, scaled(v, row_decay, dt), plan, trans_a=True)

    r = tile.load_state(r0_ref) if has_r0 else tile.zero_state()
    r = lax.fori_loop(0, plan.blocks_per_chunk, body, r)

    @pl.when(j == plan.num_chunks - 1)
    def _():
        tile.store_state(final_ref, r)


# The backward's three program kinds and the dim each splits. dQ and dK are tiled along the key dim

def forward(plan: Plan, q, k, v, rates, s_in, starts=None):
    """`starts` (packed documents): [batch, time] int32 segment start positions, or None."""
    r = start_states(plan, k, v, rates, s_in, starts)
    has_r0, has_seg = r is not None, starts is not None
    kernel = functools.partial(_forward_kernel, plan=plan, has_r0=has_r0, **({"has_seg": True} if has_seg else {}))
    seg_specs, seg_args = ([starts_spec(plan)], [starts]) if has_seg else ([], [])
    o, final = call(
        kernel,
        plan,
        plan.num_tiles("v"),
        [WHOLE, *(token_spec(plan, dim) for dim in "kkv")] + seg_specs + ([state_spec(plan)] if has_r0 else []),
        [token_spec(plan, "v"), single_state_spec(plan)],
        [jax.ShapeDtypeStruct(v.shape, q.dtype), states_shape(plan, None)],
        "lightning_forward",
    )(rates, q, k, v, *seg_args, *([r] if has_r0 else []))
    return o, unpad_state(plan, final), r
