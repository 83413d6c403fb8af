"""The backward: chunk states and a reversed scan give G^(j) = dL/dR^(j+1), then one launch runs
three program kinds side by side per chunk:

    dQ  a forward sweep from R^(j) (saved by the forward), tiled along the key dim
    dK  a reverse sweep from G^(j), tiled along the key dim
    dV  a reverse sweep from G^(j), tiled along the value dim; chunk 0 also gives dL/dR^(0)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lightning_jax.attention.pallas_triton.plan import Plan
from lightning_jax.attention.pallas_triton.states import chunk_gates, chunk_states, pad_state, scan, unpad_state
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


SPLIT = {"dq": "k", "dk": "k", "dv": "v"}


def _gated(gates, t0, decays: "Decays", *pair_products):
    """(pair products masked to one segment, lambda^a, lambda^E, lambda^(E - a)) of the block at t0,
    each times its gate (`tiles.Gates`) when `gates` is given (packed documents)."""
    state_decay, row_decay = decays.block(t0)
    from_start = decays.from_start
    if gates is None:
        return (*pair_products, from_start, state_decay, row_decay)
    same, gate_q, gate_k, gate_state = gates.block(t0)
    masked = tuple(jnp.where(same, x, 0.0) for x in pair_products)
    return (*masked, from_start * gate_q, state_decay * gate_state, row_decay * gate_k)


def _dq_program(plan: Plan, tile: Tile, decays: "Decays", k_ref, v_ref, do_ref, r_ref, dq_ref, gates=None):
    """dQ_i = P_i K_i + diag(lambda^a) dO_i R_i^T with P_i = (dO_i V_i^T) * D: a forward sweep over
    chunk j's blocks from rows of R^(j)."""
    dt = k_ref.dtype

    def body(i, r):
        t0 = i * plan.block
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        do = tile.load(do_ref, t0, "v")
        p = dot(do, v, plan, trans_b=True) * decays.intra
        from_start = decays.from_start
        if gates is not None:
            same, gate_q, gate_k, gate_state = gates.block(t0)
            p = jnp.where(same, p, 0.0)
            from_start = from_start * gate_q
        dq = dot(do, r.astype(dt), plan, trans_b=True) * from_start[:, None]
        dq = dq + dot(p.astype(dt), k, plan)
        tile.store(dq_ref, t0, dq * plan.scale, "k")
        state_decay, row_decay = decays.block(t0)
        if gates is not None:
            state_decay, row_decay = state_decay * gate_state, row_decay * gate_k
        return state_decay * r + dot(k, scaled(v, row_decay, dt), plan, trans_a=True)

    r = tile.zero_state() if r_ref is None else tile.load_state(r_ref)
    lax.fori_loop(0, plan.blocks_per_chunk, body, r)


def _dk_program(plan: Plan, tile: Tile, decays: "Decays", q_ref, v_ref, do_ref, g_ref, dk_ref, gates=None):
    """Reverse sweep over chunk j's blocks from rows of G = dL/dR^(j+1):
    dK_i = P_i^T Q_i + diag(lambda^(E - a)) V_i G^T,  G <- lambda^E G + (diag(lambda^a) Q_i)^T dO_i."""
    dt = q_ref.dtype

    def body(i, g):
        t0 = (plan.blocks_per_chunk - 1 - i) * plan.block
        q = tile.load(q_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        do = tile.load(do_ref, t0, "v")
        p_t = dot(v, do, plan, trans_b=True) * decays.intra_t  # P^T = (V dO^T) * D^T
        p_t, from_start, state_decay, row_decay = _gated(gates, t0, decays, p_t)
        dk = dot(v, g.astype(dt), plan, trans_b=True) * row_decay[:, None]
        dk = dk + dot(p_t.astype(dt), q, plan)
        tile.store(dk_ref, t0, dk, "k")
        return state_decay * g + dot(q, scaled(do, from_start, dt), plan, trans_a=True)

    lax.fori_loop(0, plan.blocks_per_chunk, body, tile.load_state(g_ref))


def _dv_program(plan: Plan, tile: Tile, decays: "Decays", q_ref, k_ref, do_ref, g_ref, dv_ref, gates=None):
    """Reverse sweep over chunk j's blocks from columns of G = dL/dR^(j+1):
    dV_i = A_i^T dO_i + diag(lambda^(E - a)) K_i G,  A_i = (Q_i K_i^T) * D.  Returns G at the chunk's
    start: dL/dR^(0) for chunk 0."""
    dt = q_ref.dtype

    def body(i, g):
        t0 = (plan.blocks_per_chunk - 1 - i) * plan.block
        q = tile.load(q_ref, t0, "k")
        k = tile.load(k_ref, t0, "k")
        do = tile.load(do_ref, t0, "v")
        scores_t = dot(k, q, plan, trans_b=True) * decays.intra_t  # A^T = (K Q^T) * D^T
        scores_t, from_start, state_decay, row_decay = _gated(gates, t0, decays, scores_t)
        dv = dot(k, g.astype(dt), plan) * row_decay[:, None]
        dv = dv + dot(scores_t.astype(dt), do, plan)
        tile.store(dv_ref, t0, dv, "v")
        return state_decay * g + dot(q, scaled(do, from_start, dt), plan, trans_a=True)

    return lax.fori_loop(0, plan.blocks_per_chunk, body, tile.load_state(g_ref))


def _backward_kernel(
    rates_ref, q_ref, k_ref, v_ref, do_ref, *rest, plan: Plan, kinds, has_r0: bool, has_seg: bool = False
):
    """Programs of the given kinds side by side: program_id 0 runs over the tiles of each kind in
    turn (e.g. dQ key tiles, then dK key tiles, then dV value tiles), so the programs of one chunk
    run together and share its q, k, v, dO in L2. Registers are those of the hungriest kind, not
    their sum: the kinds are branches of one kernel, never live at once.

    Refs after do: the segment starts (if has_seg: packed documents), R^(j) (if has_r0 and dq runs),
    G^(j) (if dk or dv runs), one output per kind, then dL/dR^(0) (if dv runs)."""
    rest = list(rest)
    starts_ref = rest.pop(0) if has_seg else None
    r_ref = rest.pop(0) if has_r0 and "dq" in kinds else None
    g_ref = rest.pop(0) if {"dk", "dv"} & set(kinds) else None
    out = {kind: rest.pop(0) for kind in kinds}
    dr0_ref = rest.pop(0) if "dv" in kinds else None
    t, j = pl.program_id(0), pl.program_id(1)
    rate = head_rate(rates_ref, plan)

    def run(kind, index):
        tile = Tile(plan, j, SPLIT[kind], index)
        # dQ is scaled once at its store; dK and dV take q's scale in their q-side factors.
        decays = Decays(rate, plan, j, 1.0 if kind == "dq" else plan.scale)
        gates = {"gates": Gates(tile, starts_ref)} if has_seg else {}
        if kind == "dq":
            _dq_program(plan, tile, decays, k_ref, v_ref, do_ref, r_ref, out["dq"], **gates)
        elif kind == "dk":
            _dk_program(plan, tile, decays, q_ref, v_ref, do_ref, g_ref, out["dk"], **gates)
        else:
            g = _dv_program(plan, tile, decays, q_ref, k_ref, do_ref, g_ref, out["dv"], **gates)

            @pl.when(j == 0)
            def _():
                tile.store_state(dr0_ref, g)

    offset = 0
    for kind in kinds:
        n = plan.num_tiles(SPLIT[kind])
        if len(kinds) == 1:
            run(kind, t)
        else:
            pl.when((t >= offset) & (t < offset + n))(functools.partial(run, kind, t - offset))
        offset += n


def backward_call(plan: Plan, kinds, q, k, v, rates, r, d_o, g, starts=None):
    """One launch running `kinds` (a tuple of "dq", "dk", "dv"); returns their outputs by kind, and
    dL/dR^(0) as "dr0" when dv runs. `starts`: packed documents' segment starts, or None."""
    has_r0, has_seg = r is not None, starts is not None
    with_g = bool({"dk", "dv"} & set(kinds))
    operands = [rates, q, k, v, d_o] + ([starts] if has_seg else [])
    operands += ([r] if has_r0 and "dq" in kinds else []) + ([g] if with_g else [])
    in_specs = [WHOLE, *(token_spec(plan, dim) for dim in "kkvv")] + ([starts_spec(plan)] if has_seg else [])
    in_specs += [state_spec(plan)] * (len(operands) - len(in_specs))
    like = {"dq": q, "dk": k, "dv": v}
    out_specs = [token_spec(plan, SPLIT[kind]) for kind in kinds]
    out_shape = [jax.ShapeDtypeStruct(like[kind].shape, like[kind].dtype) for kind in kinds]
    if "dv" in kinds:
        out_specs.append(single_state_spec(plan))
        out_shape.append(states_shape(plan, None))
    kernel = functools.partial(
        _backward_kernel, plan=plan, kinds=kinds, has_r0=has_r0, **({"has_seg": True} if has_seg else {})
    )
    name = "lightning_backward" if len(kinds) > 1 else f"lightning_backward_{kinds[0]}"
    tiles = sum(plan.num_tiles(SPLIT[kind]) for kind in kinds)
    outs = call(kernel, plan, tiles, in_specs, out_specs, out_shape, name)(*operands)
    return dict(zip([*kinds, "dr0"], outs))


def backward(plan: Plan, q, k, v, rates, r, d_o, d_final, starts=None):
    """`starts` (packed documents): [batch, time] int32 segment start positions, or None."""
    g = pad_state(plan, d_final)[:, None]  # G^(N-1) = dL/dS_final
    if plan.num_chunks > 1 and starts is not None:
        y = chunk_states(plan, q, d_o, rates, from_start=True, starts=starts)
        g = scan(plan, y, g[:, 0], rates, reverse=True, gates=chunk_gates(plan, starts))
    elif plan.num_chunks > 1:
        y = chunk_states(plan, q, d_o, rates, from_start=True)
        g = scan(plan, y, g[:, 0], rates, reverse=True)
    groups = (("dq", "dk", "dv"),) if plan.config.fuse_backward else (("dq",), ("dk",), ("dv",))
    grads = {}
    seg = {} if starts is None else {"starts": starts}
    for kinds in groups:
        grads.update(backward_call(plan, kinds, q, k, v, rates, r, d_o, g, **seg))
    first = jnp.tile(jnp.exp(-rates), plan.batch)[:, None, None]
    d_s_in = unpad_state(plan, first * grads["dr0"])
    return grads["dq"], grads["dk"], grads["dv"], d_s_in
