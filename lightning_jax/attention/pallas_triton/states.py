"""Chunk states and the scan over chunks: the state each chunk starts from (forward), and the
state cotangent each chunk ends with (backward).

    forward   chunk_states  U_j = sum_a k_a^T lambda^(E_j - a) v_a, chunk j < N - 1 alone
              scan          R^(j+1) = lambda^(E_j) R^(j) + U_j, R^(0) = lambda S_in
    backward  chunk_states  Y_j = sum_a lambda^a q_a^T dO_a, chunk j > 0 alone
              scan          reversed: G^(j-1) = lambda^(E_j) G^(j) + Y_j, G^(N-1) = dL/dS_final
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lightning_jax.attention.pallas_triton.plan import Plan
from lightning_jax.attention.pallas_triton.tiles import (
    F32,
    WHOLE,
    Tile,
    call,
    dot,
    end_exponent,
    head_rate,
    scaled,
    starts_spec,
    state_spec,
    states_shape,
    token_spec,
)


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Each runs one program: chunk j (program_id 1) of one batch x head (program_id 2),
# tile `index` of its split dim. Kernels read program ids at their top level only: interpret mode
# cannot see them inside loop bodies or conditionals.


def _chunk_state_kernel(rates_ref, a_ref, b_ref, *rest, plan: Plan, from_start: bool, has_seg: bool = False):
    """Value dim split. One chunk's own contribution to a state, from zero:

    forward  (a, b) = (k, v):  U_j = sum_t k_t^T lambda^(E_j - t) v_t, decays to the chunk's end;
    backward (a, b) = (q, dO): Y_j = sum_t (scale q_t)^T lambda^t dO_t, decays from its start (the
                               chunk's own term of dL/dR^(j), for the reverse scan).

    Program j computes chunk j forward (j < N - 1) and chunk j + 1 backward (j + 1 > 0).

    Packed documents (`has_seg`: rest = segment starts, out): forward, only the rows of the chunk's
    last segment (starts == the last row's start; chunks j < N - 1 are whole); backward, only the
    rows of the segment of the token before the chunk (starts < the chunk's first position).
    """
    if has_seg:
        starts_ref, out_ref = rest
    else:
        (out_ref,) = rest
    rate = head_rate(rates_ref, plan)
    j = pl.program_id(1) + (1 if from_start else 0)
    tile = Tile(plan, j, "v", pl.program_id(0))
    end = end_exponent(plan, j * plan.chunk, plan.chunk)
    rows = jnp.arange(plan.block).astype(F32)
    scale = plan.scale if from_start else 1.0  # q's scale rides on dO's factors
    dt = a_ref.dtype
    if has_seg and not from_start:
        last_start = jnp.max(tile.load_starts(starts_ref, plan.chunk - plan.block))

    def body(i, u):
        t0 = i * plan.block
        a = tile.load(a_ref, t0, "k")
        b = tile.load(b_ref, t0, "v")
        # Padded rows have b = 0; the max keeps their (unused) factor finite.
        delta = t0 + rows if from_start else jnp.maximum(end - (t0 + rows), 0.0)
        factors = scale * jnp.exp(-rate * delta)
        if has_seg:
            starts = tile.load_starts(starts_ref, t0)
            gate = starts < tile.chunk_start if from_start else starts == last_start
            factors = factors * gate.astype(F32)
        return u + dot(a, scaled(b, factors, dt), plan, trans_a=True)

    tile.store_state(out_ref, lax.fori_loop(0, plan.blocks_per_chunk, body, tile.zero_state()))


def _scan_kernel(rates_ref, *refs, plan: Plan, reverse: bool, group: int, has_gates: bool = False):
    """The recurrence over chunks, on a flat tile of the state. x has N - 1 rows: the one chunk
    term no state needs (U of the last chunk, Y of the first) is never computed.

    forward:  x[c] = U_c (c < N - 1);  out[0] = init, out[c + 1] = lambda^(E_c) out[c] + x[c]
              (out[j] = R^(j))
    reverse:  x[c] = Y_(c + 1);        out[N - 1] = init, out[c] = lambda^(E_(c+1)) out[c + 1] + x[c]
              (out[j] = dL/dR^(j+1))

    Packed documents (`has_gates`: refs start with gates [batch * N], 1 where the state passes
    through chunk c, else 0): lambda^E becomes gate_c lambda^E.

    Both are "carry = lambda^E carry + x[c]; store carry" over c ascending (forward) or descending
    (reverse). The chain is short work on long latency, so G rows go per step, all loaded first:
    one memory round trip per G chunks, not per chunk (end to end within noise of the per-chunk loop
    so far; docs/kernels.md). N is static: the rows left over after the whole steps are a step
    of their own, unrolled in Python.
    """
    if has_gates:
        gates_ref, x_ref, init_ref, out_ref = refs
        gate_row = (pl.program_id(1) // plan.heads) * plan.num_chunks
    else:
        x_ref, init_ref, out_ref = refs
    rate = rates_ref[pl.program_id(1) % plan.heads]
    rows = plan.num_chunks - 1
    steps, rest = divmod(rows, group)
    shift = 1 if reverse else 0  # row c holds chunk c + shift's term, and its decay

    def run(c0, size: int, carry):  # rows c0 .. c0 + size - 1, in the sweep's order
        order = range(size - 1, -1, -1) if reverse else range(size)
        xs = [x_ref[c0 + i, :] for i in order]
        for i, x in zip(order, xs):
            c = c0 + i
            decay = jnp.exp(-rate * end_exponent(plan, (c + shift) * plan.chunk, plan.chunk))
            if has_gates:
                decay = decay * gates_ref[gate_row + c + shift]
            carry = decay * carry + x
            out_ref[c + 1 - shift, :] = carry
        return carry

    def step(s, carry):
        return run((steps - 1 - s if reverse else s) * group, group, carry)

    carry = init_ref[...].astype(F32)
    out_ref[rows if reverse else 0, :] = carry
    if reverse and rest:  # the top rows first
        carry = run(steps * group, rest, carry)
    carry = lax.fori_loop(0, steps, step, carry)
    if not reverse and rest:
        run(steps * group, rest, carry)


def chunk_states(plan: Plan, a, b, rates, *, from_start: bool = False, starts=None):
    """U_j (j < N - 1) from (k, v), or Y_j (j > 0) from (q, dO) with from_start:
    [batch * heads, N - 1, dk_pad, dv_pad]. No state needs U of the last chunk or Y of the first, so
    they are never computed (a 1 / N share of the pass). `starts`: packed documents' segment starts
    [batch, time] int32, or None."""
    plan = plan.for_chunk_states()
    first = 1 if from_start else 0
    has_seg = starts is not None
    kernel = functools.partial(
        _chunk_state_kernel, plan=plan, from_start=from_start, **({"has_seg": True} if has_seg else {})
    )
    seg_specs, seg_args = ([starts_spec(plan, first)], [starts]) if has_seg else ([], [])
    return call(
        kernel,
        plan,
        plan.num_tiles("v"),
        [WHOLE, token_spec(plan, "k", first), token_spec(plan, "v", first)] + seg_specs,
        state_spec(plan),
        states_shape(plan, plan.num_chunks - 1),
        "lightning_backward_y" if from_start else "lightning_chunk_states",
        chunks=plan.num_chunks - 1,
    )(rates, a, b, *seg_args)


def chunk_gates(plan: Plan, starts):
    """Packed documents: [batch * N] fp32, 1 where the state entering chunk c passes through it
    (the segment of the token before the chunk reaches its last token), else 0."""
    first = jnp.arange(plan.num_chunks) * plan.chunk
    last = jnp.minimum(first + plan.chunk - 1, plan.time - 1)
    return (starts[:, last] < jnp.maximum(first, 1)[None, :]).astype(F32).reshape(-1)


def scan(plan: Plan, x, init, rates, *, reverse: bool, gates=None):
    """x: [batch * heads, N - 1, dk_pad, dv_pad] (see _scan_kernel); init: [batch * heads, dk_pad,
    dv_pad]; gates (packed documents): `chunk_gates`, or None. Returns [batch * heads, N, dk_pad,
    dv_pad]."""
    bh, n = x.shape[0], plan.num_chunks
    flat = plan.dk_pad * plan.dv_pad
    tile = min(plan.config.scan_tile, flat)
    has_gates = gates is not None
    kernel = functools.partial(
        _scan_kernel, plan=plan, reverse=reverse, group=plan.config.scan_group,
        **({"has_gates": True} if has_gates else {}),
    )
    out = pl.pallas_call(
        kernel,
        grid=(flat // tile, bh),
        in_specs=[
            WHOLE,
            *([WHOLE] if has_gates else []),
            pl.BlockSpec((None, n - 1, tile), lambda f, b: (b, 0, f)),
            pl.BlockSpec((None, tile), lambda f, b: (b, f)),
        ],
        out_specs=pl.BlockSpec((None, n, tile), lambda f, b: (b, 0, f)),
        out_shape=jax.ShapeDtypeStruct((bh, n, flat), F32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
        interpret=plan.interpret,
        name="lightning_chunk_scan_reverse" if reverse else "lightning_chunk_scan",
    )(rates, *([gates] if has_gates else []), x.reshape(bh, n - 1, flat), init.reshape(bh, flat))
    return out.reshape(bh, n, plan.dk_pad, plan.dv_pad)


def pad_state(plan: Plan, state):
    """[batch, heads, dim_k, dim_v] -> [batch * heads, dk_pad, dv_pad] fp32, zero padded."""
    state = state.astype(F32).reshape(plan.batch * plan.heads, plan.dim_k, plan.dim_v)
    return jnp.pad(state, ((0, 0), (0, plan.dk_pad - plan.dim_k), (0, plan.dv_pad - plan.dim_v)))


def unpad_state(plan: Plan, state):
    state = state[:, : plan.dim_k, : plan.dim_v]
    return state.reshape(plan.batch, plan.heads, plan.dim_k, plan.dim_v)


def start_states(plan: Plan, k, v, rates, s_in, starts=None):
    """R^(j) for every chunk, [batch * heads, N, dk_pad, dv_pad]; None when all are zero.
    `starts`: packed documents' segment starts [batch, time] int32, or None."""
    if s_in is None and plan.num_chunks == 1:
        return None
    if s_in is None:
        r0 = jnp.zeros((plan.batch * plan.heads, plan.dk_pad, plan.dv_pad), F32)
    else:  # R^(0) = lambda S_in: the state aged to the first token.
        first = jnp.tile(jnp.exp(-rates), plan.batch)[:, None, None]
        r0 = first * pad_state(plan, s_in)
    if plan.num_chunks == 1:
        return r0[:, None]
    if starts is not None:
        u = chunk_states(plan, k, v, rates, starts=starts)
        return scan(plan, u, r0, rates, reverse=False, gates=chunk_gates(plan, starts))
    return scan(plan, chunk_states(plan, k, v, rates), r0, rates, reverse=False)
