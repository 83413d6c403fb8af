"""A forward that reads q, k, v from HBM once at grids with few chains: built, checked and
measured here, not used by the op (it is slower than `"pallas"`'s pieces on an H200; the numbers
and why are in docs/kernels.md, Leads, "Few programs").

The kernel, `forward_windows`: with few (value tile, head, sequence) chains, `kernels.forward`
cuts each sequence into pieces and first sums k and v of every piece to link them, so k and v are
read twice from HBM. Here a cluster of P programs walks each chain in windows of P segments of W
blocks, program p taking segment p of every window, and the programs link their segments as they
go:

    U_(w,p)  the state segment (w, p) adds from zero (its k and v only)
    D_(w,p)  its decay, lambda^(real tokens in the segment)
    T_p(w)   the state entering segment (w, p):  T_(p+1)(w) = D_(w,p) T_p(w) + U_(w,p),  T_P(w) = T_0(w+1)

Each program's state warpgroup sums U of its segment of window w + 1 while it runs the chain of
window w (each of the first W/2 blocks of the chain is followed by two blocks of the sum), then
publishes it: a TMA store to a board in global memory, fences, an arrival on a cluster barrier.
The exchange has the second half of the window to complete: after its own segment of window w
the state warpgroup holds T_(p+1)(w) and folds in the later segments of window w and the earlier
ones of window w + 1 (P - 1 U loads that the memory warpgroup issues once the cluster has
published). k and v of window w + 1 are read twice, the second time a window later (from L2).

Three warpgroups as `kernels._kernel_ws`: memory (2) streams one ring of entries, each an output
block (q, k, v) or a sum block (k, v); state (1) runs the chain and the sums; output (0) computes
O = ((Q K^T) * D) V + diag(qdec) Q S from the published bf16 states and releases the sum entries
unread. Ring order in window w: out(w, 0), sum(0), sum(1), out(w, 1), ..., out(w, W/2 - 1),
sum(W - 2), sum(W - 1), out(w, W/2), ..., out(w, W - 1); window 0's W sum entries come first, and
the last window's sum entries re-read blocks whose sum nobody uses (uniform code). Barriers as
`_kernel_ws` (full, consumed, ready, free), plus `meet` (a cluster barrier, one arrival per
program per publication) and `u_full` / `u_free` for two fp32 U slots. The board keeps three
windows of U (a slot is rewritten only after every program has read it); U goes out through U
slot 0. Pallas' cluster-barrier arrive is a CTA-scope release, so each side fences
(`fence.proxy.async.global; fence.acq_rel.cluster`; benchmarks/cluster_exchange.py measured stale
reads without); GPU interpret mode skips the fences (`inline_mgpu="ignore"`).

Checks on a CPU (tests/test_benchmarks.py): GPU interpret mode against the fp32 quadratic form,
which needs more XLA:CPU threads than a 2-core machine gives by default (tests/conftest.py sets
NPROC), and cross-lowering for sm_90. The benchmark: --check compares o and the final state with
the fp32 quadratic form at small shapes (ragged lengths, an initial state, P = 2 and 4) and with
the Mosaic forward with pieces at the first long shape; then it times the forward beside
`"pallas"` and jla (back-to-back calls, one sync per batch: attention.py's `time_jax`, medians)
and prints a table last.

    PYTHONPATH=$PWD python3 benchmarks/read_once.py [--check] [--shapes 1x65536x16x128,...]
        [--layouts 4x8,4x8s,2x8] [--peers pallas,jla] [--out F.json]

A layout PxW is P programs per chain and W blocks per segment; a suffix s stages the state
warpgroup's update operand in shared memory instead of taking it from registers, and n (timing
only, the output is wrong) skips the sums' arithmetic (`sum_arithmetic=False`).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

sys.path.insert(0, "benchmarks")
from attention import jax_variants, log, time_jax  # noqa: E402
from cluster_exchange import _fence  # noqa: E402

from lightning_jax.attention import lightning_attention, reference  # noqa: E402
from lightning_jax.attention.pallas_mosaic import forward as pieces_forward  # noqa: E402
from lightning_jax.attention.pallas_mosaic.kernels import (  # noqa: E402
    _DTYPES,
    _TILE,
    _block_decays,
    _block_kdec_columns,
    _block_kind,
    _block_qdec,
    _mm,
    _mm_registers,
    _pad_to,
    _rows,
    _smem_operand,
    decay_tables,
)
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

_RELEASE = "fence.proxy.async.global; fence.acq_rel.cluster;"
_ACQUIRE = "fence.acq_rel.cluster; fence.proxy.async.global;"


def _entry(w, k, *, W, P):
    """Entry k (0 .. 2W - 1) of window w -> (is_output, global block). Output entries walk segment
    (w, p); sum entries segment (w + 1, p) (p is added by the caller)."""
    half = 3 * (W // 2)
    j, r = k // 3, k % 3
    early = k < half
    is_out = jnp.where(early, r == 0, True)
    out_j = jnp.where(early, j, W // 2 + k - half)
    sum_i = 2 * j + r - 1
    window = jnp.where(is_out, w, w + 1)
    within = jnp.where(is_out, out_j, sum_i)
    return is_out, window * (P * W) + within


def _kernel(q_ref, k_ref, v_ref, mask_ref, qdec_ref, kdec_ref, sdec_ref, *refs, block, W, P, windows, real_blocks,
            dim_k, tile_v, stages, has_s0, scores_in_registers, update_in_registers, sum_arithmetic=True):
    refs = list(refs)
    s0_ref = refs.pop(0) if has_s0 else None
    o_ref, sf_ref, board_ref = refs
    dt = q_ref.dtype
    j_tile, h, b = lax.axis_index("tile"), lax.axis_index("head"), lax.axis_index("batch")
    p = lax.axis_index("seg")
    wg = lax.axis_index("wg")
    cols = pl.ds(j_tile * tile_v, tile_v)
    wgmma = plgpu.Layout.WGMMA
    last_block = windows * P * W - 1  # (the last window's sum entries stay inside the arrays)
    half = W // 2

    def seg_first(w):  # the first block of segment (w, p)
        return w * (P * W) + p * W

    def entry_block(w, k):
        is_out, g = _entry(w, k, W=W, P=P)
        return is_out, jnp.minimum(g + p * W, last_block)

    def u_count(w):  # U loads before window w's boundary: p at boundary 0, P - 1 at each after
        return jnp.where(w == 0, 0, p + (w - 1) * (P - 1))

    def u_load(w, l):  # boundary w's load l -> (load number, U's window, U's segment):
        old = jnp.where(w == 0, 0, P - 1 - p)  # U_(w-1, q > p) first, then U_(w, q < p)
        return u_count(w) + l, jnp.where(l < old, w - 1, w), jnp.where(l < old, p + 1 + l, l - old)

    def scoped(q_s, k_s, v_s, p_s, vs_s, r_s, o_s, mask_s, qdec_s, kdec_s, sdec_s, u_s, full, consumed, ready, free,
               u_full, u_free, tbars, meet, done):
        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(n, is_out, g):
                slot = n % stages

                @pl.when(n >= stages)
                def _():
                    plgpu.barrier_wait(consumed.at[slot])

                rows = pl.ds(g * block, block)

                def load_q():
                    plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, :], q_s.at[slot], full.at[3 * slot])

                if is_out is not False:  # (window 0's sums: statically no q)
                    pl.when(is_out)(load_q)

                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, :], k_s.at[slot], full.at[3 * slot + 1])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, cols], v_s.at[slot], full.at[3 * slot + 2])

            def load_u(w, first, stop):  # boundary w's U loads first .. stop - 1
                def one(l, carry):
                    u, src_w, q = u_load(w, l)

                    @pl.when(u >= 2)
                    def _():
                        plgpu.barrier_wait(u_free.at[u % 2])

                    plgpu.copy_gmem_to_smem(board_ref.at[b, h, j_tile, src_w % 3, q], u_s.at[u % 2], u_full.at[u % 2])
                    return carry

                lax.fori_loop(first, stop, one, 0)

            lax.fori_loop(0, W, lambda i, c: (issue(i, False, seg_first(0) + i), c)[1], 0)  # window 0's sums

            def window(w, carry):
                n0 = W + 2 * W * w
                plgpu.barrier_wait(meet)  # every program has published U_w
                _fence(_ACQUIRE)
                count = jnp.where(w == 0, p, P - 1)
                early = jnp.minimum(count, 2)  # two U slots: the rest wait for the state warpgroup
                load_u(w, 0, early)

                def issue_k(k, c):
                    is_out, g = entry_block(w, k)
                    issue(n0 + k, is_out, g)
                    return c

                lax.fori_loop(0, stages, issue_k, 0)  # the window's first entries before the waits
                load_u(w, early, count)
                lax.fori_loop(stages, 2 * W, issue_k, 0)
                return carry

            lax.fori_loop(0, windows, window, 0)
            total = W + 2 * W * windows
            for n in range(total - stages, total):  # the last releases
                plgpu.barrier_wait(consumed.at[n % stages])
            loads = u_count(windows)  # the last two U loads' releases

            def drain(u, carry):
                plgpu.barrier_wait(u_free.at[u % 2])
                return carry

            lax.fori_loop(jnp.maximum(loads - 2, 0), loads, drain, 0)

        @pl.when(wg == 1)
        def _state():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(kdec_ref.at[h], kdec_s, tbars.at[0])
            plgpu.copy_gmem_to_smem(sdec_ref.at[h], sdec_s, tbars.at[1])
            if has_s0:  # through U slot 1, whose first load follows this program's first publication
                plgpu.copy_gmem_to_smem(s0_ref.at[b, h, :, cols], u_s.at[1], tbars.at[4])
            plgpu.barrier_wait(tbars.at[0])
            plgpu.barrier_wait(tbars.at[1])
            zero = plgpu.layout_cast(jnp.zeros((dim_k, tile_v), jnp.float32), wgmma)
            if has_s0:
                plgpu.barrier_wait(tbars.at[4])
                s_in = plgpu.load(u_s.at[1], layout=wgmma)
            else:
                s_in = zero

            def update(n, s, g):  # entry n: s <- lambda^m s + K^T diag(kdec) V
                slot = n % stages
                kdec, sdec = _block_decays(kdec_s, sdec_s, g, real_blocks)
                plgpu.barrier_wait(full.at[3 * slot + 1])
                plgpu.barrier_wait(full.at[3 * slot + 2])
                if update_in_registers:
                    kt = plgpu.load(k_s.at[slot].transpose((1, 0)), layout=wgmma).astype(jnp.float32)
                    kdec_cols = lax.broadcast_in_dim(_block_kdec_columns(kdec_s, g, real_blocks), kt.shape, [1])
                    s = s * _rows(sdec, s.shape) + _mm_registers((kt * kdec_cols).astype(dt), v_s.at[slot])
                else:
                    v = plgpu.load(v_s.at[slot], layout=wgmma).astype(jnp.float32)
                    vs_s[...] = (v * _rows(kdec, v.shape)).astype(dt)
                    plgpu.commit_smem()
                    s = s * _rows(sdec, s.shape) + _mm(k_s.at[slot].transpose((1, 0)), vs_s)
                plgpu.barrier_arrive(consumed.at[slot])
                return s

            def publish(u, w):  # U_(w, p) to the board, then the cluster barrier
                u_s.at[0][...] = u
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(u_s.at[0], board_ref.at[b, h, j_tile, w % 3, p])
                plgpu.wait_smem_to_gmem(0)
                _fence(_RELEASE)
                plgpu.barrier_arrive(meet)

            def seg_decay(first):  # D: lambda^(real tokens of the W blocks from `first`)
                d = plgpu.load(sdec_s.at[_block_kind(first, real_blocks)], layout=wgmma.reduce(1))
                return lax.fori_loop(
                    1, W, lambda i, d: d * plgpu.load(sdec_s.at[_block_kind(first + i, real_blocks)],
                                                      layout=wgmma.reduce(1)), d)

            def fold(t, w, first, stop):  # boundary w's U loads first .. stop - 1 into t
                def one(l, t):
                    u, src_w, q = u_load(w, l)
                    plgpu.barrier_wait(u_full.at[u % 2])
                    add = plgpu.load(u_s.at[u % 2], layout=wgmma)
                    plgpu.barrier_arrive(u_free.at[u % 2])
                    d = seg_decay(src_w * (P * W) + q * W)
                    return t * _rows(d, t.shape) + add

                return lax.fori_loop(first, stop, one, t)

            publish(lax.fori_loop(0, W, lambda i, u: update(i, u, seg_first(0) + i), zero), 0)
            t0 = fold(s_in, 0, 0, p)  # T_p(0)

            def window(w, t):
                n0 = W + 2 * W * w

                def publish_state(c, s):  # bf16(S) before the chain's block c for the output warpgroup
                    @pl.when(c >= 2)
                    def _():
                        plgpu.barrier_wait(free.at[c % 2])

                    r_s.at[c % 2][...] = s.astype(dt)
                    plgpu.commit_smem()
                    plgpu.barrier_arrive(ready.at[c % 2])

                def early(j, su):  # out(w, j), then two blocks of the next window's sum
                    s, u = su
                    publish_state(w * W + j, s)
                    s = update(n0 + 3 * j, s, seg_first(w) + j)
                    nxt = jnp.minimum(seg_first(w + 1) + 2 * j, last_block - 1)
                    for i in (1, 2):
                        if sum_arithmetic:
                            u = update(n0 + 3 * j + i, u, nxt + i - 1)
                        else:  # (timing only: the sum blocks land and are released unread)
                            slot = (n0 + 3 * j + i) % stages
                            plgpu.barrier_wait(full.at[3 * slot + 1])
                            plgpu.barrier_wait(full.at[3 * slot + 2])
                            plgpu.barrier_arrive(consumed.at[slot])
                    return s, u

                def late(j, s):
                    publish_state(w * W + j, s)
                    return update(n0 + 3 * half + j - half, s, seg_first(w) + j)

                s, u = lax.fori_loop(0, half, early, (t, zero))

                @pl.when(w + 1 < windows)
                def _():
                    publish(u, w + 1)

                s = lax.fori_loop(half, W, late, s)  # s = T_(p+1)(w)

                @pl.when((w == windows - 1) & (p == P - 1))
                def _():  # the final state
                    u_s.at[0][...] = s
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(u_s.at[0], sf_ref.at[b, h, :, cols])
                    plgpu.wait_smem_to_gmem(0)

                more = w + 1 < windows
                return fold(s, w + 1, 0, jnp.where(more, P - 1, 0))  # T_p(w + 1)

            lax.fori_loop(0, windows, window, t0)
            for c in range(max(windows * W - 2, 0), windows * W):  # the output warpgroup's last frees
                plgpu.barrier_wait(free.at[c % 2])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 0)
        def _output():
            plgpu.set_max_registers(232, action="increase")
            plgpu.copy_gmem_to_smem(mask_ref.at[h], mask_s, tbars.at[2])
            plgpu.copy_gmem_to_smem(qdec_ref.at[h], qdec_s, tbars.at[3])
            plgpu.barrier_wait(tbars.at[2])
            plgpu.barrier_wait(tbars.at[3])
            mask = plgpu.load(mask_s, layout=wgmma)  # [block, block]

            def skip(n):  # a sum entry: released once it has landed
                slot = n % stages
                plgpu.barrier_wait(full.at[3 * slot + 1])
                plgpu.barrier_wait(full.at[3 * slot + 2])
                plgpu.barrier_arrive(consumed.at[slot])

            def out(n, c, g):
                slot = n % stages
                plgpu.barrier_wait(full.at[3 * slot])
                plgpu.barrier_wait(full.at[3 * slot + 1])
                qdec = _block_qdec(qdec_s, g, real_blocks)
                scores = _mm(q_s.at[slot], k_s.at[slot].transpose((1, 0))) * mask
                if scores_in_registers:
                    plgpu.barrier_wait(full.at[3 * slot + 2])
                    o = _mm_registers(scores.astype(dt), v_s.at[slot])
                else:
                    p_s[...] = scores.astype(dt)
                    plgpu.commit_smem()
                    plgpu.barrier_wait(full.at[3 * slot + 2])
                    o = _mm(p_s, v_s.at[slot])
                plgpu.barrier_wait(ready.at[c % 2])
                o = o + _mm(q_s.at[slot], r_s.at[c % 2]) * _rows(qdec, (block, tile_v))
                plgpu.barrier_arrive(free.at[c % 2])
                plgpu.barrier_arrive(consumed.at[slot])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                o_s[...] = o.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, pl.ds(g * block, block), h, cols])

            lax.fori_loop(0, W, lambda i, c: (skip(i), c)[1], 0)

            def window(w, carry):
                n0 = W + 2 * W * w

                def early(j, c):
                    out(n0 + 3 * j, w * W + j, seg_first(w) + j)
                    skip(n0 + 3 * j + 1)
                    skip(n0 + 3 * j + 2)
                    return c

                def late(j, c):
                    out(n0 + 3 * half + j - half, w * W + j, seg_first(w) + j)
                    return c

                lax.fori_loop(0, half, early, 0)
                lax.fori_loop(half, W, late, 0)
                return carry

            lax.fori_loop(0, windows, window, 0)
            plgpu.wait_smem_to_gmem(0)

        plgpu.barrier_arrive(done)  # no warpgroup leaves before the others
        plgpu.barrier_wait(done)

    pl.run_scoped(
        scoped,
        _smem_operand((stages, block, dim_k), dt),  # q
        _smem_operand((stages, block, dim_k), dt),  # k
        _smem_operand((stages, block, tile_v), dt),  # v
        plgpu.SMEM((1,), jnp.float32) if scores_in_registers else _smem_operand((block, block), dt),
        plgpu.SMEM((1,), jnp.float32) if update_in_registers else _smem_operand((block, tile_v), dt),
        _smem_operand((2, dim_k, tile_v), dt),  # bf16 states for the output warpgroup
        _smem_operand((block, tile_v), dt),  # o
        plgpu.SMEM((block, block), jnp.float32),
        plgpu.SMEM((3, block), jnp.float32),
        plgpu.SMEM((3, block), jnp.float32),
        plgpu.SMEM((4, dim_k), jnp.float32),
        # U slots: the loads; slot 0 also U out and the final state, slot 1 the initial state
        plgpu.SMEM((2, dim_k, tile_v), jnp.float32),
        plgpu.Barrier(num_barriers=3 * stages),  # full
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # consumed
        plgpu.Barrier(num_barriers=2),  # ready
        plgpu.Barrier(num_barriers=2),  # free
        plgpu.Barrier(num_barriers=2),  # u_full
        plgpu.Barrier(num_barriers=2),  # u_free
        plgpu.Barrier(num_barriers=5),  # tables and the initial state
        plgpu.ClusterBarrier(collective_axes=("seg",)),  # meet: U published
        plgpu.Barrier(num_arrivals=3),  # done
        collective_axes="wg",
    )


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams(inline_mgpu="ignore")
    if interpret is False or interpret is None:
        return None
    return interpret


@functools.partial(jax.jit, static_argnames=("block", "scale", "segments", "window", "stages", "interpret",
                                             "sum_arithmetic",
                                             "scores_in_registers", "update_in_registers"))
def forward_windows(q, k, v, rates, initial_state=None, *, block: int = 64, scale: float = 1.0, segments: int = 4,
                    window: int = 8, stages: int = 2, interpret=False, scores_in_registers: bool | None = None,
                    update_in_registers: bool | None = None, sum_arithmetic: bool = True):
    """Causal linear attention with a constant per-head decay, as `kernels.forward`, reading q, k,
    v from HBM once with `segments` programs per (value tile, head, sequence) chain in a cluster.

    Args:
      q, k: [batch, time, heads, dim_k] bfloat16 or float16, dim_k <= 128; v: [batch, time,
        heads, dim_v], same dtype; rates [heads] >= 0; initial_state optional fp32 [batch,
        heads, dim_k, dim_v].
      segments: P, programs per chain (a cluster; 2 .. 8 on Hopper).
      window: W, blocks per segment (even). A window is P x W blocks; the sequence is padded to
        whole windows, so the kernel is meant for sequences of many windows.
      stages: ring slots (2: shared memory holds no more with the U slots).
      interpret: True or a `plgpu.InterpretGPUParams` (with inline_mgpu="ignore") runs GPU
        interpret mode; False compiles for the GPU.
      scores_in_registers, update_in_registers: as `kernels.forward`; None: on when compiling.
      sum_arithmetic: False skips the sums' arithmetic (their blocks still load), for timing
        only: the segments are then linked with zero sums, so o and the final state are wrong.

    Returns (o [batch, time, heads, dim_v] in q's dtype, final_state fp32 [batch, heads, dim_k, dim_v]).
    """
    batch, time, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: expected [batch, time, heads, dim]")
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a 16-bit dtype (bfloat16/float16), got {q.dtype}, {k.dtype}, {v.dtype}")
    if rates.shape != (heads,):
        raise ValueError(f"rates: expected shape ({heads},), got {rates.shape}")
    if initial_state is not None and initial_state.shape != (batch, heads, dim_k, dim_v):
        raise ValueError(f"initial_state: expected {(batch, heads, dim_k, dim_v)}, got {initial_state.shape}")
    if not 2 <= segments <= 8:
        raise ValueError(f"segments must be in 2 .. 8 (a cluster), got {segments}")
    if window < 2 or window % 2:
        raise ValueError(f"window must be an even number of blocks >= 2, got {window}")
    if block != _TILE:
        raise ValueError(f"block must be {_TILE}, got {block}")
    if stages < 2:
        raise ValueError(f"stages must be >= 2, got {stages}")
    compiled = interpret is False
    scores_in_registers = compiled if scores_in_registers is None else scores_in_registers
    update_in_registers = compiled if update_in_registers is None else update_in_registers
    if (scores_in_registers or update_in_registers) and not compiled:
        raise ValueError("scores_in_registers and update_in_registers need interpret=False (GPU interpret mode has "
                         "no rule for wgmma with A in registers)")
    real_blocks = pl.cdiv(time, block)
    span = segments * window
    windows = pl.cdiv(real_blocks, span)
    padded = windows * span * block
    q, k = (_pad_to(_pad_to(x, 1, padded), 3, _TILE) for x in (q, k))
    v = _pad_to(_pad_to(v, 1, padded), 3, _TILE)
    dk, dv = q.shape[-1], v.shape[-1]
    if dk > 128:
        raise ValueError(f"dim_k must be <= 128 (shared memory), got {dim_k}")
    mask, qdec, kdec, sdec = decay_tables(rates, block=block, length=time, dim_k=dk, scale=scale)
    args = [q, k, v, mask, qdec, kdec, sdec]
    if initial_state is not None:
        args.append(jnp.pad(initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, dk - dim_k), (0, dv - dim_v))))
    tiles = dv // _TILE
    kernel = functools.partial(
        _kernel, block=block, W=window, P=segments, windows=windows, real_blocks=real_blocks, dim_k=dk, tile_v=_TILE,
        stages=stages, has_s0=initial_state is not None, scores_in_registers=scores_in_registers,
        update_in_registers=update_in_registers, sum_arithmetic=sum_arithmetic)
    o, final, _ = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((batch, padded, heads, dv), q.dtype),
                  jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32),
                  jax.ShapeDtypeStruct((batch, heads, tiles, 3, segments, dk, _TILE), jnp.float32)),  # the board
        grid=(tiles, heads, batch),
        grid_names=("tile", "head", "batch"),
        cluster=(segments,),
        cluster_names=("seg",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params(interpret),
    )(*args)
    return o[:, :time, :, :dim_v], final[:, :, :dim_k, :dim_v]


# 1 x 65,536 at 4 to 16 heads: 8 to 32 chains (clusters of P programs); 2 x 16,384 x 16: 64 chains.
SHAPES = [(1, 65536, 16, 128), (1, 65536, 12, 128), (1, 65536, 8, 128), (1, 65536, 4, 128), (2, 16384, 16, 128)]
# (batch, time, heads, dim_k, dim_v, P, W, initial state): against the fp32 quadratic form.
SMALL = [(1, 3001, 4, 128, 128, 4, 2, True), (2, 1000, 2, 64, 128, 2, 4, False), (1, 4099, 2, 128, 64, 4, 8, True)]


def _inputs(shape, dim_v, seed):
    b, t, h, d = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (jax.random.normal(keys[i], (b, t, h, d), jnp.bfloat16) for i in range(2))
    v = jax.random.normal(keys[2], (b, t, h, dim_v), jnp.bfloat16)
    s0 = jax.random.normal(keys[3], (b, h, d, dim_v), jnp.float32)
    return q, k, v, s0


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def checks(shapes, layouts):
    rows = []
    for b, t, h, dk, dv, p, w, with_s0 in SMALL:
        q, k, v, s0 = _inputs((b, t, h, dk), dv, 1)
        s0 = s0 if with_s0 else None
        rates = jnp.asarray(alibi_slopes(h), jnp.float32).at[0].set(0.0)
        o, final = forward_windows(q, k, v, rates, s0, segments=p, window=w)
        want_o, want_final = reference.quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), rates, s0)
        rows.append({"case": [b, t, h, dk, dv, p, w, with_s0], "against": "fp32 quadratic", "o": _rel(o, want_o),
                     "final": _rel(final, want_final)})
        log("check", rows[-1])
    for shape in shapes:
        q, k, v, s0 = _inputs(shape, shape[3], 2)
        rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
        want_o, want_final = pieces_forward(q, k, v, rates, s0, pieces=4, warp_specialized=True)
        for p, w in layouts:
            o, final = forward_windows(q, k, v, rates, s0, segments=p, window=w)
            rows.append({"case": [*shape, p, w], "against": "Mosaic forward, 4 pieces", "o": _rel(o, want_o),
                         "final": _rel(final, want_final)})
            log("check", rows[-1])
    return rows


def _layout(text):
    """"PxW" with optional suffixes s (the update's operand staged) and n (no sum arithmetic: timing
    only) -> (P, W, update_in_registers: None (on when compiled) or False, sum_arithmetic)."""
    p, w = (int(x) for x in text.rstrip("sn").split("x"))
    return p, w, False if "s" in text[-2:] else None, not text.endswith("n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated BxTxHxD")
    ap.add_argument("--layouts", default="4x8,4x8s,2x8,2x8s",
                    help="comma-separated PxW with optional suffixes s (staged update), n (no sum arithmetic)")
    ap.add_argument("--peers", default="pallas,jla", help="comma-separated: pallas, pallas_triton, jla")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split("x"))
                                                 for s in args.shapes.split(",") if s]
    layouts = {name: _layout(name) for name in args.layouts.split(",") if name}
    peers = [n for n in args.peers.split(",") if n]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__,
               "command": "python benchmarks/read_once.py " + " ".join(sys.argv[1:]), "checks": [], "times": {}}
    if args.check:
        results["checks"] = checks(shapes[:1], sorted({(p, w) for p, w, _, _ in layouts.values()}))
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    names = [f"windows_{n}" for n in layouts] + peers
    for shape in shapes:
        rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
        arg_sets = [_inputs(shape, shape[3], s)[:3] for s in range(2)]
        fns = {f"windows_{n}": functools.partial(lambda q, k, v, p, w, r, a: forward_windows(
            q, k, v, rates, segments=p, window=w, update_in_registers=r, sum_arithmetic=a)[0], p=p, w=w, r=r, a=a)
            for n, (p, w, r, a) in layouts.items()}
        others = jax_variants(shape, rates)
        for name in peers:
            if name in ("pallas", "pallas_triton"):
                fns[name] = lambda q, k, v, name=name: lightning_attention(q, k, v, rates, implementation=name)[0]
            elif name in others:
                fns[name] = others[name]
        row = {}
        for name, fn in fns.items():
            try:
                row[name] = time_jax(jax.jit(fn), arg_sets)
            except Exception as e:  # noqa: BLE001
                row[name] = repr(e)[:300]
            log("x".join(map(str, shape)), name, row[name])
        results["times"]["x".join(map(str, shape))] = row
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    for row in results["checks"]:
        print("check", row)
    print("\nshape | chains | " + " | ".join(names) + "   (forward, ms)")
    for key, row in results["times"].items():
        b, _, h, d = map(int, key.split("x"))
        cells = [f"{row[n] * 1e3:.4f}" if isinstance(row.get(n), float) else "-" for n in names]
        print(f"{key} | {b * h * -(-d // 64)} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
