"""Lightning Attention as Pallas Mosaic GPU kernels (Hopper): the forward, and the backward as
sweeps of the same kernels (`backward`; a reverse sweep walks the blocks last to first; dK and dV
can instead come from one fused sweep, `dkdv.py`).

Programs run over (64-wide value tile, head, group of rows), a row being one piece of one sequence
(`forward`'s `pieces`, `rows_per_program`). Each walks its rows in blocks of `block` tokens,
carrying the true fp32 state S (convention B of docs/lightning-math.md: S after the block's last
token, S_in before the first block) in registers::

    O_i     = ((Q_i K_i^T) * D) V_i + diag(lambda^(a+1)) Q_i S            D[a, b] = lambda^(a-b), a >= b
    S      <- lambda^m S + K_i^T diag(lambda^(m-1-a)) V_i                 m = real length of block i

Every block has m = block except the last real one, whose tokens past the end are zero padding
(zero k and v add nothing, and it uses its real length m in both decays, so the padding does not
age the state); whole padding blocks after it (when the length is cut into equal pieces) decay
nothing. The final state is exact for any length.

All decays are built in the wrapper in fp32 as exp(-rate * delta) with delta >= 0 (masked exponent),
as small per-head tables that each program copies into shared memory once (`decay_tables`).

Two kernels: `_kernel`, one warpgroup that loads and computes in turn (the next block's loads in
flight with two stages); it also computes the states pieces add (k and v only). `_kernel_ws`, three
warpgroups (memory, state, output) for the outputs. The Triton kernels use convention A (the
state aged to the block's first token); here the state lives in registers for the whole sweep, and
convention B gives the ragged final state exactly without dividing by lambda. Both are right;
mixing them within a kernel is the bug to avoid.

Tests: GPU interpret mode on CPU (race detector on) and cross-lowering for sm_90
(tests/test_pallas_mosaic.py); GPU correctness and speed: benchmarks/mosaic_forward.py.

Every matmul goes through `_mm`: wgmma with both operands in shared memory into a scoped
accumulator, the form GPU interpret mode supports (it has no rule for A from registers nor for
`ACC.init`). Operands that are computed in registers (the masked scores, the bf16 copy of the
state, the decayed V) are therefore staged in shared memory first.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# wgmma wants M a multiple of 64; the 128-byte swizzle of 16-bit operands is 64 elements wide.
_TILE = 64
_SWIZZLE = 128
_DTYPES = (jnp.bfloat16, jnp.float16)


def _smem_operand(shape, dtype):
    """A 16-bit shared-memory buffer laid out for TMA and wgmma (8 x 64 tiles, 128-byte swizzle)."""
    elems = _SWIZZLE // jnp.dtype(dtype).itemsize
    return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, elems)), plgpu.SwizzleTransform(_SWIZZLE)))


def _mm(a_ref, b_ref):
    """fp32 a @ b of two shared-memory operands (either may be a `.transpose((1, 0))` view).

    The one place matmuls are issued: wgmma(smem, smem) into a fresh accumulator, then read back
    to registers (the read waits for the wgmma). Supported both on the GPU and in interpret mode."""
    m, n = a_ref.shape[0], b_ref.shape[1]

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))


def _mm_registers(a, b_ref):
    """fp32 a @ b with a in registers (16-bit, WGMMA layout) and b in shared memory: wgmma reads A
    from registers, so a needs no shared-memory staging. GPU only: interpret mode has no rule for
    this form."""
    m, n = a.shape[0], b_ref.shape[1]

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a, b_ref)
        return acc_ref[...]

    return pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))


def _rows(vec, shape):
    """Broadcast a (shape[0],) vector along the columns of `shape` (scales rows)."""
    return lax.broadcast_in_dim(vec, shape, [0])


def _walker(first_row, blocks_per_piece, pieces, reverse=False):
    """Step n of a program whose rows start at `first_row` -> (batch row, piece, block of the
    whole sequence). A row is one piece of one sequence; each has `blocks_per_piece` blocks, walked
    first to last, or last to first when `reverse`."""

    def where(n):
        row = first_row + n // blocks_per_piece
        piece = row % pieces
        step = n % blocks_per_piece
        return row // pieces, piece, piece * blocks_per_piece + (blocks_per_piece - 1 - step if reverse else step)

    return where


def _block_kind(g, real_blocks):
    """The row of the decay tables for global block g: 0 a full block, 1 the last real block
    (ragged), 2 padding past the end."""
    return (g >= real_blocks - 1).astype(jnp.int32) + (g >= real_blocks).astype(jnp.int32)


def _block_decays(kdec_s, sdec_s, g, real_blocks):
    """The k decays [block] and the state decay [dim_k] of global block g (`_block_kind`)."""
    kind = _block_kind(g, real_blocks)
    layout = plgpu.Layout.WGMMA.reduce(1)
    return plgpu.load(kdec_s.at[kind], layout=layout), plgpu.load(sdec_s.at[kind], layout=layout)


def _block_kdec_columns(kdec_s, g, real_blocks):
    """The k decays [block] of global block g, laid out to scale the columns of a [dim_k, block] K^T."""
    return plgpu.load(kdec_s.at[_block_kind(g, real_blocks)], layout=plgpu.Layout.WGMMA.reduce(0))


def _block_qdec(qdec_s, g, real_blocks):
    """The q decays [block] of global block g (`_block_kind`)."""
    return plgpu.load(qdec_s.at[_block_kind(g, real_blocks)], layout=plgpu.Layout.WGMMA.reduce(1))


def _store_chunk_state(s, g, b, *, chunk_blocks, real_blocks, rs_ref, st_s, sdec_s, h, cols):
    """R^(j) = lambda S (the state aged to chunk j's first token; convention A, what the Triton
    backward reads) to rs_ref[b, h, j] when global block g is chunk j's first (chunk_blocks blocks
    each), through the fp32 buffer st_s (waited free first: it also carries the rows' end states)."""

    @pl.when((g % chunk_blocks == 0) & (g < real_blocks))
    def _():
        lam = plgpu.load(sdec_s.at[3], layout=plgpu.Layout.WGMMA.reduce(1))
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        st_s[...] = s * _rows(lam, s.shape)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_s, rs_ref.at[b, h, g // chunk_blocks, :, cols])


def _sweep_rows(step, where, *, rows_per_program, blocks_per_piece, s0_ref, sf_ref, st_s, barrier, h, cols):
    """Runs `step(n, s) -> s` over a program's rows in turn: each row starts from its initial
    state (s0_ref, or zeros when None), and its state after the last block goes to sf_ref, both
    through the fp32 buffer st_s [dim_k, tile_v]."""
    wgmma = plgpu.Layout.WGMMA

    def row_sweep(r, carry):
        b, piece, _ = where(r * blocks_per_piece)
        if s0_ref is not None:
            plgpu.copy_gmem_to_smem(s0_ref.at[b, piece, h, :, cols], st_s, barrier)
            plgpu.barrier_wait(barrier)
            s = plgpu.load(st_s, layout=wgmma)
        else:
            s = plgpu.layout_cast(jnp.zeros(st_s.shape, jnp.float32), wgmma)
        s = lax.fori_loop(r * blocks_per_piece, (r + 1) * blocks_per_piece, step, s)
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # a chunk state's store may still read st_s
        st_s[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_s, sf_ref.at[b, piece, h, :, cols])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # st_s is reused by the next row
        return carry

    lax.fori_loop(0, rows_per_program, row_sweep, 0)


def _kernel(*refs, block, blocks_per_piece, real_blocks, pieces, rows_per_program, dim_k, tile_v, stages,
            has_s0, outputs, chunk_blocks=None, reverse=False, head_offset=0, block_offset=0, has_segments=False):
    refs = list(refs)
    q_ref = refs.pop(0) if outputs else None
    k_ref, v_ref = refs.pop(0), refs.pop(0)
    mask_ref, qdec_ref = (refs.pop(0), refs.pop(0)) if outputs else (None, None)
    kdec_ref, sdec_ref = refs.pop(0), refs.pop(0)
    s0_ref = refs.pop(0) if has_s0 else None
    # Packed documents (the sums pieces add: k and v only): the three-warpgroup kernel's rules.
    seg_ref = refs.pop(0) if has_segments else None
    o_ref = refs.pop(0) if outputs else None
    sf_ref = refs.pop(0)
    (rs_ref,) = refs if chunk_blocks else (None,)
    dt = k_ref.dtype
    j = lax.axis_index("tile")
    hs = lax.axis_index("head")  # the head within the launch: indexes the states (s0, sf, rs)
    h = hs + head_offset  # the head of q, k, v, o and the tables
    cols = pl.ds(j * tile_v, tile_v)
    wgmma = plgpu.Layout.WGMMA
    streams = (3 if outputs else 2) + has_segments  # q, k, v (or k, v) and the segment tables per pipeline slot
    steps = rows_per_program * blocks_per_piece
    where = _walker(lax.axis_index("rows") * rows_per_program, blocks_per_piece, pieces, reverse)

    def scoped(q_s, k_s, v_s, p_s, vs_s, r_s, o_s, mask_s, qdec_s, kdec_s, sdec_s, st_s, seg_s, bars, tbars):
        def issue(n, slot):
            b, _, g = where(n)
            rows = pl.ds((g + block_offset) * block, block)  # (the reverse first kernel starts a piece in)
            srcs = [k_ref.at[b, rows, h, :], v_ref.at[b, rows, h, cols]]
            dsts = [k_s.at[slot], v_s.at[slot]]
            if outputs:
                srcs.append(q_ref.at[b, rows, h, :])
                dsts.append(q_s.at[slot])
            if has_segments:
                srcs.append(seg_ref.at[b, g + block_offset])
                dsts.append(seg_s.at[slot])
            for t, (src, dst) in enumerate(zip(srcs, dsts)):
                plgpu.copy_gmem_to_smem(src, dst, bars.at[slot * streams + t])

        # The decay tables of this head and the first block, all in flight at once.
        tables = [(kdec_ref, kdec_s), (sdec_ref, sdec_s)]
        if outputs:
            tables += [(mask_ref, mask_s), (qdec_ref, qdec_s)]
        for t, (src, dst) in enumerate(tables):
            plgpu.copy_gmem_to_smem(src.at[h], dst, tbars.at[t])
        if stages > 1:
            issue(0, 0)
        for t in range(len(tables)):
            plgpu.barrier_wait(tbars.at[t])
        if outputs:
            mask = plgpu.load(mask_s, layout=wgmma)  # [block, block]

        def step(n, s):
            b, _, g = where(n)
            if stages == 1:
                slot = 0
                issue(n, 0)
            else:
                slot = n % stages

                @pl.when(n + 1 < steps)
                def _():
                    issue(n + 1, (n + 1) % stages)

            kdec, sdec = _block_decays(kdec_s, sdec_s, g, real_blocks)
            if chunk_blocks:
                _store_chunk_state(s, g, b, chunk_blocks=chunk_blocks, real_blocks=real_blocks, rs_ref=rs_ref,
                                   st_s=st_s, sdec_s=sdec_s, h=hs, cols=cols)
            if outputs:
                r_s[...] = s.astype(dt)  # the bf16 state for Q S while the copies fly
            for t in range(streams):
                plgpu.barrier_wait(bars.at[slot * streams + t])
            if has_segments:  # keep the state only within its document; add the block's last one
                s = s * seg_s[slot, 4, 0]
                kdec = kdec * plgpu.load(seg_s.at[slot, 3], layout=wgmma.reduce(1))
            k_blk, v_blk = k_s.at[slot], v_s.at[slot]
            if outputs:
                q_blk = q_s.at[slot]
                scores = _mm(q_blk, k_blk.transpose((1, 0))) * mask  # [block, block], masked and decayed
                p_s[...] = scores.astype(dt)
            v = plgpu.load(v_blk, layout=wgmma).astype(jnp.float32)
            vs_s[...] = (v * _rows(kdec, v.shape)).astype(dt)  # diag(lambda^(m-1-a)) V
            plgpu.commit_smem()  # make the register stores visible to wgmma
            if outputs:
                qdec = _block_qdec(qdec_s, g, real_blocks)
                o = _mm(p_s, v_blk) + _mm(q_blk, r_s) * _rows(qdec, (block, tile_v))
                o_s[...] = o.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, pl.ds(g * block, block), h, cols])
            s = s * _rows(sdec, s.shape) + _mm(k_blk.transpose((1, 0)), vs_s)
            if outputs:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_s is reused by the next block
            return s

        _sweep_rows(step, where, rows_per_program=rows_per_program, blocks_per_piece=blocks_per_piece,
                    s0_ref=s0_ref, sf_ref=sf_ref, st_s=st_s, barrier=tbars.at[0], h=hs, cols=cols)
        plgpu.wait_smem_to_gmem(0)

    scratch = dict(
        k_s=_smem_operand((stages, block, dim_k), dt),
        v_s=_smem_operand((stages, block, tile_v), dt),
        vs_s=_smem_operand((block, tile_v), dt),  # decayed v
        kdec_s=plgpu.SMEM((3, block), jnp.float32),
        sdec_s=plgpu.SMEM((4, dim_k), jnp.float32),
        st_s=plgpu.SMEM((dim_k, tile_v), jnp.float32),  # fp32 state in/out
        bars=plgpu.Barrier(num_barriers=stages * streams),
        **(dict(seg_s=plgpu.SMEM((stages, 5, block), jnp.float32)) if has_segments else {}),
        tbars=plgpu.Barrier(num_barriers=4 if outputs else 2),
    )
    if outputs:
        scratch.update(
            q_s=_smem_operand((stages, block, dim_k), dt),
            p_s=_smem_operand((block, block), dt),  # masked scores
            r_s=_smem_operand((dim_k, tile_v), dt),  # bf16 state
            o_s=_smem_operand((block, tile_v), dt),
            mask_s=plgpu.SMEM((block, block), jnp.float32),
            qdec_s=plgpu.SMEM((3, block), jnp.float32),
        )
    pl.run_scoped(lambda **bufs: scoped(**{n: bufs.get(n) for n in _SCRATCH}), **scratch)


_SCRATCH = ("q_s", "k_s", "v_s", "p_s", "vs_s", "r_s", "o_s", "mask_s", "qdec_s", "kdec_s", "sdec_s", "st_s", "seg_s",
            "bars", "tbars")


def _stream_blocks(steps, stages, consumed, issue):
    """The memory warpgroup's loop: `issue(n, slot)` starts block n's copies into slot n % stages
    once both compute warpgroups have released the slot's previous block (`consumed`); at the end it
    waits for the last releases, so every arrival is waited for before the program ends."""

    def load(n, carry):
        slot = n % stages

        @pl.when(n >= stages)
        def _():
            plgpu.barrier_wait(consumed.at[slot])

        issue(n, slot)
        return carry

    lax.fori_loop(0, steps, load, 0)
    for n in range(max(steps - stages, 0), steps):  # the last releases
        plgpu.barrier_wait(consumed.at[n % stages])


def _load_tables(*copies):
    """(source, destination, barrier) copies of per-head tables to shared memory, all in flight at
    once, then waited for."""
    for src, dst, barrier in copies:
        plgpu.copy_gmem_to_smem(src, dst, barrier)
    for _, _, barrier in copies:
        plgpu.barrier_wait(barrier)


def _document_mask(seg_s, slot, mask, qdec):
    """With packed documents (`segment_tables`, slot's block): the mask [block, block] kept to
    same-document pairs, and the q decays [block] to the tokens of the carried state's document."""
    wgmma = plgpu.Layout.WGMMA
    block = mask.shape[0]
    rows_seg = plgpu.load(seg_s.at[slot, 0], layout=wgmma.reduce(1))
    cols_seg = plgpu.load(seg_s.at[slot, 1], layout=wgmma.reduce(0))
    # Documents are whole numbers: 1 - min(d^2, 1) is 1 within one, 0 across.
    d = lax.broadcast_in_dim(rows_seg, (block, block), [0]) - lax.broadcast_in_dim(cols_seg, (block, block), [1])
    ones = plgpu.layout_cast(jnp.ones((block, block), jnp.float32), wgmma)
    return mask * (ones - jnp.minimum(d * d, ones)), qdec * plgpu.load(seg_s.at[slot, 2], layout=wgmma.reduce(1))


def _kernel_ws(q_ref, k_ref, v_ref, mask_ref, qdec_ref, kdec_ref, sdec_ref, *refs, block, blocks_per_piece,
               real_blocks, pieces, rows_per_program, dim_k, tile_v, stages, has_s0, chunk_blocks=None, reverse=False,
               scores_in_registers=False, update_in_registers=False, has_segments=False, head_offset=0):
    """The forward with three warpgroups, each running its own loop over the program's blocks:

    - memory (wg 2): TMA-streams q, k, v of block n into slot n % stages once both compute
      warpgroups have released the slot's previous block;
    - state (wg 1): publishes bf16(S) before block n for the output warpgroup (two buffers), then
      S <- lambda^m S + K^T diag(kdec) V in fp32 registers;
    - output (wg 0): O = ((Q K^T) * D) V + diag(qdec) Q S, stored by TMA.

    The output warpgroup's three matmuls per block overlap the state warpgroup's one and the loads.
    Barriers: full (a copy landed), consumed (both compute warpgroups are done with a slot), ready
    (a bf16 state is published) and free (the output warpgroup has read it). Every arrival is waited
    for before the program ends (the interpreter checks it; on the GPU it keeps warpgroups together).

    With `has_segments` a fourth stream, the block's segment tables (`segment_tables`), lands in
    each slot: the output warpgroup masks the scores to same-segment pairs and the inter-block term
    to tokens of the carried state's segment; the state warpgroup drops the carried state where a
    document starts in the block and adds only the block's last document.
    """
    refs = list(refs)
    s0_ref = refs.pop(0) if has_s0 else None
    seg_ref = refs.pop(0) if has_segments else None
    o_ref, sf_ref = refs.pop(0), refs.pop(0)
    (rs_ref,) = refs if chunk_blocks else (None,)
    dt = q_ref.dtype
    j = lax.axis_index("tile")
    hs = lax.axis_index("head")  # the head within the launch: indexes the states (s0, sf, rs)
    h = hs + head_offset  # the head of q, k, v, o and the tables
    wg = lax.axis_index("wg")
    cols = pl.ds(j * tile_v, tile_v)
    wgmma = plgpu.Layout.WGMMA
    steps = rows_per_program * blocks_per_piece
    where = _walker(lax.axis_index("rows") * rows_per_program, blocks_per_piece, pieces, reverse)

    def scoped(q_s, k_s, v_s, p_s, vs_s, r_s, o_s, mask_s, qdec_s, kdec_s, sdec_s, st_s, full, consumed, ready,
               free, tbars, done, *segments):
        seg_s, seg_full = segments if has_segments else (None, None)  # [stages, 5, block] fp32
        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(n, slot):
                b, _, g = where(n)
                rows = pl.ds(g * block, block)
                plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, :], q_s.at[slot], full.at[3 * slot])
                plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, :], k_s.at[slot], full.at[3 * slot + 1])
                plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, cols], v_s.at[slot], full.at[3 * slot + 2])
                if has_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, g], seg_s.at[slot], seg_full.at[slot])

            _stream_blocks(steps, stages, consumed, issue)

        @pl.when(wg == 1)
        def _state():
            plgpu.set_max_registers(232, action="increase")
            _load_tables((kdec_ref.at[h], kdec_s, tbars.at[0]), (sdec_ref.at[h], sdec_s, tbars.at[1]))

            def step(n, s):
                slot = n % stages
                b, _, g = where(n)
                kdec, sdec = _block_decays(kdec_s, sdec_s, g, real_blocks)
                if chunk_blocks:
                    _store_chunk_state(s, g, b, chunk_blocks=chunk_blocks, real_blocks=real_blocks, rs_ref=rs_ref,
                                       st_s=st_s, sdec_s=sdec_s, h=hs, cols=cols)

                @pl.when(n >= 2)
                def _():
                    plgpu.barrier_wait(free.at[n % 2])

                r_s.at[n % 2][...] = s.astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready.at[n % 2])
                plgpu.barrier_wait(full.at[3 * slot + 1])
                plgpu.barrier_wait(full.at[3 * slot + 2])
                if has_segments:  # keep the state only within its document; add the block's last one
                    plgpu.barrier_wait(seg_full.at[slot])
                    s = s * seg_s[slot, 4, 0]
                if update_in_registers:  # A = K^T diag(lambda^(m-1-a)) from registers: no staging
                    kt = plgpu.load(k_s.at[slot].transpose((1, 0)), layout=wgmma).astype(jnp.float32)
                    kdec_cols = _block_kdec_columns(kdec_s, g, real_blocks)
                    if has_segments:
                        kdec_cols = kdec_cols * plgpu.load(seg_s.at[slot, 3], layout=wgmma.reduce(0))
                    kdec_cols = lax.broadcast_in_dim(kdec_cols, kt.shape, [1])
                    s = s * _rows(sdec, s.shape) + _mm_registers((kt * kdec_cols).astype(dt), v_s.at[slot])
                else:
                    if has_segments:
                        kdec = kdec * plgpu.load(seg_s.at[slot, 3], layout=wgmma.reduce(1))
                    v = plgpu.load(v_s.at[slot], layout=wgmma).astype(jnp.float32)
                    vs_s[...] = (v * _rows(kdec, v.shape)).astype(dt)  # diag(lambda^(m-1-a)) V
                    plgpu.commit_smem()
                    s = s * _rows(sdec, s.shape) + _mm(k_s.at[slot].transpose((1, 0)), vs_s)
                plgpu.barrier_arrive(consumed.at[slot])
                return s

            _sweep_rows(step, where, rows_per_program=rows_per_program, blocks_per_piece=blocks_per_piece,
                        s0_ref=s0_ref, sf_ref=sf_ref, st_s=st_s, barrier=tbars.at[4], h=hs, cols=cols)
            for n in range(max(steps - 2, 0), steps):  # the output warpgroup's last frees
                plgpu.barrier_wait(free.at[n % 2])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 0)
        def _output():
            plgpu.set_max_registers(232, action="increase")
            _load_tables((mask_ref.at[h], mask_s, tbars.at[2]), (qdec_ref.at[h], qdec_s, tbars.at[3]))
            mask = plgpu.load(mask_s, layout=wgmma)  # [block, block]

            def step(n, carry):
                slot = n % stages
                b, _, g = where(n)
                plgpu.barrier_wait(full.at[3 * slot])
                plgpu.barrier_wait(full.at[3 * slot + 1])
                qdec = _block_qdec(qdec_s, g, real_blocks)
                block_mask = mask
                if has_segments:  # same-document pairs; the carried state's document only
                    plgpu.barrier_wait(seg_full.at[slot])
                    block_mask, qdec = _document_mask(seg_s, slot, mask, qdec)
                scores = _mm(q_s.at[slot], k_s.at[slot].transpose((1, 0))) * block_mask
                if scores_in_registers:  # (P V with A from registers: no staging of P)
                    plgpu.barrier_wait(full.at[3 * slot + 2])
                    o = _mm_registers(scores.astype(dt), v_s.at[slot])
                else:
                    p_s[...] = scores.astype(dt)
                    plgpu.commit_smem()
                    plgpu.barrier_wait(full.at[3 * slot + 2])
                    o = _mm(p_s, v_s.at[slot])
                plgpu.barrier_wait(ready.at[n % 2])
                o = o + _mm(q_s.at[slot], r_s.at[n % 2]) * _rows(qdec, (block, tile_v))
                plgpu.barrier_arrive(free.at[n % 2])
                plgpu.barrier_arrive(consumed.at[slot])
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last block's store has read o_s
                o_s[...] = o.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, pl.ds(g * block, block), h, cols])
                return carry

            lax.fori_loop(0, steps, step, 0)
            plgpu.wait_smem_to_gmem(0)

        plgpu.barrier_arrive(done)  # no warpgroup leaves before the others
        plgpu.barrier_wait(done)

    pl.run_scoped(
        scoped,
        _smem_operand((stages, block, dim_k), dt),  # q
        _smem_operand((stages, block, dim_k), dt),  # k
        _smem_operand((stages, block, tile_v), dt),  # v
        # The staged masked scores and decayed v; unused (a placeholder) where registers carry them.
        plgpu.SMEM((1,), jnp.float32) if scores_in_registers else _smem_operand((block, block), dt),
        plgpu.SMEM((1,), jnp.float32) if update_in_registers else _smem_operand((block, tile_v), dt),
        _smem_operand((2, dim_k, tile_v), dt),  # bf16 states for the output warpgroup
        _smem_operand((block, tile_v), dt),  # o
        plgpu.SMEM((block, block), jnp.float32),
        plgpu.SMEM((3, block), jnp.float32),
        plgpu.SMEM((3, block), jnp.float32),
        plgpu.SMEM((4, dim_k), jnp.float32),
        plgpu.SMEM((dim_k, tile_v), jnp.float32),  # fp32 state in/out
        plgpu.Barrier(num_barriers=3 * stages),  # full
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # consumed
        plgpu.Barrier(num_barriers=2),  # ready
        plgpu.Barrier(num_barriers=2),  # free
        plgpu.Barrier(num_barriers=5),  # tables and initial states
        plgpu.Barrier(num_arrivals=3),  # done
        *([plgpu.SMEM((stages, 5, block), jnp.float32), plgpu.Barrier(num_barriers=stages)] if has_segments else []),
        collective_axes="wg",
    )


def decay_tables(rates, *, block, length, dim_k, scale=1.0, reverse=False):
    """The per-head fp32 tables the kernel reads, built from exp(-rate * delta), delta >= 0.

    qdec [H, 3, B], kdec [H, 3, B] and sdec [H, 4, dim_k] have one row per kind of block
    (`_block_kind`): 0 a full block, 1 the last real block, of length m, 2 a padding block past the
    end (it passes the state through: kdec 0, sdec 1); sdec's row 3 is lambda itself (one token's
    decay, for the chunk states). Forward (the causal sweep, first block to last):

      mask [H, B, B] = scale lambda^(a-b) (a >= b, else 0); qdec = scale lambda^(a+1) (every kind);
      kdec: lambda^(B-1-a) full, lambda^(m-1-a) last (0 for a >= m); sdec: lambda^B, lambda^m.

    `reverse` (the anti-causal sweep, last block to first, of the backward's dK and dV: the carried
    state G holds the later tokens' terms aged to the block's end, and the initial state dL/dS_final
    enters at the last token):

      mask = scale lambda^(b-a) (b >= a, else 0); qdec: lambda^(B-a) full, lambda^(m-1-a) last;
      kdec = scale lambda^a (0 for a >= m in the last block); sdec: lambda^B, lambda^(m-1)."""
    rates = rates.astype(jnp.float32)[:, None]
    last = length - (pl.cdiv(length, block) - 1) * block
    a = jnp.arange(block, dtype=jnp.float32)
    lag = (a[None, :] - a[:, None]) if reverse else (a[:, None] - a[None, :])
    mask = scale * jnp.exp(jnp.where(lag >= 0, -rates[:, :, None] * lag, -jnp.inf))
    zeros = jnp.zeros_like(rates * a)
    in_last = a < last
    if reverse:
        qdec = jnp.stack([jnp.exp(-rates * (block - a)),
                          jnp.exp(jnp.where(in_last, -rates * (last - 1 - a), -jnp.inf)), zeros], axis=1)
        kdec = scale * jnp.stack([jnp.exp(-rates * a), jnp.exp(jnp.where(in_last, -rates * a, -jnp.inf)), zeros],
                                 axis=1)
        state = [block, last - 1, 0, 1]
    else:
        qdec = jnp.broadcast_to((scale * jnp.exp(-rates * (a + 1)))[:, None], (len(rates), 3, block))
        kdec = jnp.stack([jnp.exp(-rates * (block - 1 - a)),
                          jnp.exp(jnp.where(in_last, -rates * (last - 1 - a), -jnp.inf)), zeros], axis=1)
        state = [block, last, 0, 1]
    sdec = jnp.exp(-rates * jnp.array(state, jnp.float32))
    sdec = jnp.broadcast_to(sdec[:, :, None], (len(rates), 4, dim_k))
    return mask, qdec, kdec, sdec


def segment_tables(segment_ids, *, block, padded, reverse=False):
    """Per-block fp32 tables [batch, padded / block, 5, block] of packed documents for the
    three-warpgroup kernel, from segment_ids [batch, time] (non-decreasing per row):

      0, 1: each token's document (renumbered 0, 1, ... along the row, exact in fp32), twice: the
         kernel reads one copy as rows and one as columns (one shared-memory row read in two
         register layouts defeats Mosaic GPU's layout inference);
      2: 1 where the token's document is the carried state's as the block starts (the document of
         the token just before the block, or of the row's first token for the first block;
         in reverse, of the token just after it, or the row's last);
      3: 1 where the token's document is the one the state carries out of the block (the block's
         last token's; in reverse, its first token's);
      4: 1 (every entry) where those two are the same document, else 0: the carried state is dropped.

    Positions past the end take the last token's document, so padding passes the state through."""
    ids = segment_ids.astype(jnp.int32)
    batch, time = ids.shape
    starts = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), (ids[:, 1:] != ids[:, :-1]).astype(jnp.int32)], 1)
    doc = jnp.pad(jnp.cumsum(starts, axis=1), ((0, 0), (0, padded - time)), mode="edge")  # [batch, padded]
    blocks = doc.reshape(batch, padded // block, block)
    if reverse:
        entering = jnp.concatenate([doc[:, block::block], doc[:, -1:]], axis=1)  # the token after each block
        leaving = blocks[:, :, 0]
    else:
        entering = jnp.concatenate([doc[:, :1], doc[:, block - 1:-1:block]], axis=1)  # the token before
        leaving = blocks[:, :, -1]
    tables = [blocks, blocks, blocks == entering[..., None], blocks == leaving[..., None],
              jnp.broadcast_to((entering == leaving)[..., None], blocks.shape)]
    return jnp.stack([t.astype(jnp.float32) for t in tables], axis=2)


def _pad_to(x, axis, multiple):
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def _interpret_params(interpret):
    if interpret is True:
        return plgpu.InterpretGPUParams()
    if interpret is False or interpret is None:
        return None
    return interpret  # an InterpretGPUParams


def _sweep(args, *, outputs, shape, pieces, blocks_per_piece, real_blocks, block, stages, rows_per_program,
           has_s0, warp_specialized, interpret, chunk_blocks=None, reverse=False, scores_in_registers=False,
           update_in_registers=False, has_segments=False, head_offset=0, o_into=None, block_offset=0):
    """One kernel launch over (value tiles, heads, groups of rows), a row being one piece of one
    sequence. Returns (o, states) or states, states fp32 [batch, pieces, heads, dim_k, dim_v]: each
    piece's state after its last block; with `chunk_blocks` (outputs only) also the chunk states
    fp32 [batch, heads, chunks, dim_k, dim_v], R^(j) before every chunk of that many blocks.

    The launch covers `shape`'s heads from `head_offset` on: the states count heads from there, q,
    k, v, o and the tables from 0. `o_into`: a mutable array (`jax.new_ref`) the outputs are written
    into (an aliased buffer, so a second launch adds its heads to a first one's o without a copy);
    the launch then returns the states only. `block_offset` (one warpgroup, k and v only): the
    rows start that many blocks into k and v (the block kinds still count from the start)."""
    batch, _, heads, dk, dv = shape
    rows = batch * pieces
    rows_per_program = math.gcd(rows, rows_per_program)
    common = dict(block=block, blocks_per_piece=blocks_per_piece, real_blocks=real_blocks, pieces=pieces,
                  rows_per_program=rows_per_program, dim_k=dk, tile_v=_TILE, stages=stages, has_s0=has_s0)
    if chunk_blocks:
        common["chunk_blocks"] = chunk_blocks
    if reverse:
        common["reverse"] = True
    if head_offset:
        common["head_offset"] = head_offset
    warp_specialized = warp_specialized and outputs
    if block_offset:
        assert not (outputs or warp_specialized), "block_offset: the one-warpgroup sums of k and v only"
        common["block_offset"] = block_offset
    if warp_specialized:
        kernel = functools.partial(_kernel_ws, scores_in_registers=scores_in_registers,
                                   update_in_registers=update_in_registers, has_segments=has_segments, **common)
    else:
        assert not (has_segments and outputs), "segment ids: outputs from the three-warpgroup kernel only"
        kernel = functools.partial(_kernel, outputs=outputs, has_segments=has_segments, **common)
    states = jax.ShapeDtypeStruct((batch, pieces, heads, dk, dv), jnp.float32)
    if outputs and o_into is None:  # q's padded length and all its heads (a later launch may add heads)
        o = jax.ShapeDtypeStruct((batch, args[0].shape[1], args[0].shape[2], dv), args[0].dtype)
        out_type = (o, states)
    else:
        out_type = states
        if o_into is not None:
            args = [*args, o_into]  # after the inputs, where the kernels take o
    if chunk_blocks:
        chunks = jax.ShapeDtypeStruct((batch, heads, pl.cdiv(real_blocks, chunk_blocks), dk, dv), jnp.float32)
        out_type = (o, states, chunks)
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        grid=(dv // _TILE, heads, rows // rows_per_program),
        grid_names=("tile", "head", "rows"),
        **(dict(num_threads=3, thread_name="wg") if warp_specialized else {}),
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params(interpret),
    )(*args)


@functools.partial(jax.jit, static_argnames=("block", "scale", "pieces", "stages", "rows_per_program", "warp_specialized",
                                             "interpret", "chunk", "reverse", "scores_in_registers",
                                             "update_in_registers", "state_split", "tail_heads", "tail_pieces"))
def forward(q, k, v, rates, initial_state=None, segment_ids=None, *, block: int = 64, scale: float = 1.0, pieces: int = 1,
            stages: int = 2, rows_per_program: int = 1, warp_specialized: bool = False, interpret=False,
            chunk: int | None = None, reverse: bool = False, scores_in_registers: bool | None = None,
            update_in_registers: bool | None = None, state_split: int = 1, tail_heads: int = 0, tail_pieces: int = 1):
    """Causal linear attention with a constant per-head decay lambda_h = exp(-rates[h]).

    Args:
      q, k: [batch, time, heads, dim_k] bfloat16 or float16; v: [batch, time, heads, dim_v], same dtype.
      rates: [heads] decay rates >= 0.
      initial_state: optional fp32 [batch, heads, dim_k, dim_v], the state before the first token.
      segment_ids: optional [batch, time] integers, non-decreasing along each row: packed
        documents, as `reference.quadratic` defines them (attention within a document; the initial
        state reaches the first document, the final state is the last one's). Needs
        warp_specialized and no chunk states; pieces and a tail link their pieces only across
        pieces without a document start (`_forward_starts`, `_reverse_starts`), and sum whole
        pieces (no `state_split`).
      block: tokens per block, a positive multiple of 64 (wgmma's M).
      scale: multiplies q (folded into the fp32 decay tables, q itself is never rescaled).
      pieces: cut each sequence into this many pieces of whole blocks that run as separate
        programs, for grids too small to fill the GPU (few heads, long sequences). A first kernel
        computes the state each piece adds (reading k and v of all but the last piece), a scan over
        pieces gives each piece its starting state, then the forward runs on every piece at once.
        Capped at the number of blocks.
      state_split: with pieces, the first kernel cuts each piece into up to this many sub-pieces
        (a divisor of the piece's blocks, at least 4 blocks each) and sums them after, so the pass
        that only reads k and v runs more programs than the output pass.
      tail_heads, tail_pieces: run the last `tail_heads` heads in a second launch, each sequence
        cut into `tail_pieces` pieces (as `pieces` does), after the other heads' launch, writing
        into the same o. For grids whose last wave of programs would leave most SMs idle (one
        program fits an SM): 1 x 8,192 x 96 x 128 is 192 programs on 132 SMs; as 132 whole rows
        and then 60 in halves (120 programs), the second wave takes half as long. Needs one piece
        and no chunk states; `state_split` then applies to the tail.
      stages: 1 loads a block's q, k, v and then computes; 2 loads the next block while computing;
        3 (three warpgroups only) the next two. 2 and 3 need dim_k <= 128; 3 fits in shared memory
        with both register forms (`scores_in_registers`, `update_in_registers`) only.
      rows_per_program: each program sweeps this many rows (pieces of sequences) one after the
        other, the loads running ahead across rows: fewer, longer programs for short sequences.
        Reduced to a divisor of batch * pieces.
      warp_specialized: run the output sweep as three warpgroups (memory, state, output; see
        `_kernel_ws`) instead of one.
      interpret: False compiles for the GPU (or cross-lowers on a CPU); True or a
        `plgpu.InterpretGPUParams` runs GPU interpret mode (any backend, slow). When interpreting,
        `jax.block_until_ready` the result before dispatching other JAX work: on jax 0.11.2 the
        interpreter's host callbacks run jax ops themselves and can deadlock behind it on XLA:CPU.
      chunk: None, or a multiple of `block`: also return the state entering every chunk of that many
        tokens, aged to its first token (R^(j) = lambda S_(j chunk - 1), R^(0) = lambda S_in;
        convention A, the residuals of the Triton backward), written as the sweep passes.
      reverse: the anti-causal sweep instead, the backward's (`backward`): blocks from last to first,
        o_t = sum_(s >= t) scale lambda^(s-t) (q_t . k_s) v_s + lambda^(n-1-t) q_t S_in, and the
        returned state is G = sum_s scale lambda^s k_s^T v_s + lambda^(n-1) S_in (aged to token 0).
        With pieces, a first kernel sums each piece but the first from zero, and a scan from the
        last piece to the first gives each its start state. No chunk states.
      scores_in_registers: the three-warpgroup kernel multiplies the masked scores by V with wgmma
        reading them from registers instead of staging them in shared memory (what jla does). GPU
        only (interpret mode has no rule for it), needs warp_specialized. None (the default): on
        wherever it can run (warp_specialized and interpret=False); on an H200 it took the forward
        from 0.388 to 0.367-0.370 ms at 4 x 16,384 x 16 x 128 and the backward's three sweeps from
        1.093 to 1.057 ms (docs/kernels.md).
      update_in_registers: the three-warpgroup kernel's state update S += (K^T diag(kdec)) V reads
        K^T diag(kdec) from registers (a transposed load of k) instead of staging diag(kdec) V in
        shared memory. GPU only, needs warp_specialized. None (the default): on wherever it can
        run, like scores_in_registers; on an H200 with it the forward took 0.349 against 0.355 ms
        at 4 x 16,384 x 16 x 128 and 0.365 against 0.372 at 64 x 1,024 x 16 x 128 (docs/kernels.md).

    Returns:
      (o [batch, time, heads, dim_v] in q's dtype, final_state fp32 [batch, heads, dim_k, dim_v]),
      and with `chunk` also chunk_states fp32 [batch, heads, ceil(time / chunk), dim_k, dim_v].
      Any length works (padding at the end is exact); dim_k and dim_v are zero-padded to
      multiples of 64 inside.
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
    if block <= 0 or block % _TILE:
        raise ValueError(f"block must be a positive multiple of {_TILE}, got {block}")
    if reverse and chunk is not None:
        raise ValueError(f"reverse takes no chunk states, got chunk={chunk}")
    if chunk is not None and (chunk <= 0 or chunk % block):
        raise ValueError(f"chunk must be None or a positive multiple of block ({block}), got {chunk}")
    if state_split < 1:
        raise ValueError(f"state_split must be >= 1, got {state_split}")
    if pieces < 1 or stages not in (1, 2, 3):
        raise ValueError(f"pieces must be >= 1 and stages 1, 2 or 3, got pieces={pieces}, stages={stages}")
    if stages == 3 and not warp_specialized:
        raise ValueError("stages=3 needs warp_specialized=True (one warpgroup loads one block ahead)")
    if time == 0:
        raise ValueError("time must be positive")
    if segment_ids is not None and segment_ids.shape != (batch, time):
        raise ValueError(f"segment_ids: expected shape {(batch, time)}, got {segment_ids.shape}")
    registers_possible = warp_specialized and interpret is False  # the GPU's faster forms, where they can run
    scores_in_registers = registers_possible if scores_in_registers is None else scores_in_registers
    update_in_registers = registers_possible if update_in_registers is None else update_in_registers
    for name, on in (("scores_in_registers", scores_in_registers), ("update_in_registers", update_in_registers)):
        if on and not registers_possible:
            raise ValueError(f"{name} needs warp_specialized=True and interpret=False (GPU interpret mode has no "
                             "rule for wgmma with A in registers)")

    real_blocks = pl.cdiv(time, block)
    # The launches: (first head, heads, pieces); with a tail, its last `tail_heads` heads run in
    # `tail_pieces` pieces after the others. A piece has whole blocks; padding lies in the last one.
    launches = [(0, heads, pieces)]
    if tail_heads:
        if not 0 < tail_heads < heads or tail_pieces < 2 or pieces > 1 or chunk is not None:
            raise ValueError(f"tail_heads must be in 1 .. heads - 1 ({heads - 1}) with tail_pieces >= 2, one piece and "
                             f"no chunk states; got tail_heads={tail_heads}, tail_pieces={tail_pieces}, "
                             f"pieces={pieces}, chunk={chunk}")
        launches = [(0, heads - tail_heads, 1), (heads - tail_heads, tail_heads, tail_pieces)]
    launches = [(first, count, pl.cdiv(real_blocks, pl.cdiv(real_blocks, n))) for first, count, n in launches]
    if segment_ids is not None and (chunk is not None or not warp_specialized):
        raise ValueError(f"segment_ids need warp_specialized=True and no chunk states; got "
                         f"warp_specialized={warp_specialized}, chunk={chunk}")
    padded = max(n * pl.cdiv(real_blocks, n) for _, _, n in launches) * block
    q, k = (_pad_to(_pad_to(x, 1, padded), 3, _TILE) for x in (q, k))
    v = _pad_to(_pad_to(v, 1, padded), 3, _TILE)
    dk, dv = q.shape[-1], v.shape[-1]
    mask, qdec, kdec, sdec = decay_tables(rates, block=block, length=time, dim_k=dk, scale=scale, reverse=reverse)
    s0 = None
    if initial_state is not None:
        s0 = jnp.pad(initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, dk - dim_k), (0, dv - dim_v)))
    common = dict(block=block, stages=stages, real_blocks=real_blocks, rows_per_program=rows_per_program,
                  warp_specialized=warp_specialized, interpret=interpret)
    segments = [] if segment_ids is None else [segment_tables(segment_ids, block=block, padded=padded, reverse=reverse)]

    o_into, finals = None, []
    for first, count, n in launches:
        blocks_per_piece = pl.cdiv(real_blocks, n)
        shape = (batch, time, count, dk, dv)
        start = None if s0 is None else s0[:, first:first + count]
        if n > 1:
            starts = _reverse_starts if reverse else _forward_starts
            split = max(d for d in range(1, (1 if segments else state_split) + 1)  # (sub-piece sums: no documents)
                        if blocks_per_piece % d == 0 and (d == 1 or blocks_per_piece // d >= 4))
            start = starts(k, v, kdec, sdec, rates[first:first + count], start, time=time, pieces=n,
                           blocks_per_piece=blocks_per_piece, split=split, shape=shape, head_offset=first,
                           segments=segments, segment_ids=segment_ids, **common)
        elif start is not None:
            start = start[:, None]
        out = _sweep(
            [q, k, v, mask, qdec, kdec, sdec] + ([start] if start is not None else []) + segments, outputs=True,
            shape=shape, pieces=n, blocks_per_piece=blocks_per_piece, has_s0=start is not None,
            chunk_blocks=None if chunk is None else chunk // block, reverse=reverse,
            scores_in_registers=scores_in_registers, update_in_registers=update_in_registers,
            has_segments=segment_ids is not None, head_offset=first, o_into=o_into, **common,
        )
        if o_into is None:
            o, states, *chunk_states = out
        else:
            states = out
        # The state after the sweep: the last piece's, or in reverse the first piece's.
        finals.append(states[:, 0 if reverse else -1, :, :dim_k, :dim_v])
        if len(launches) > 1 and o_into is None:
            o_into = jax.new_ref(o)  # the next launch writes its heads into this o
    if o_into is not None:
        o = o_into[...]
    o, finals = o[:, :time, :, :dim_v], jnp.concatenate(finals, axis=1) if len(finals) > 1 else finals[0]
    if chunk is None:
        return o, finals
    return o, finals, chunk_states[0][..., :dim_k, :dim_v]


def _split_sums(adds, rates, *, pieces, split, sub_span, reverse):
    """Sub-piece sums [batch, pieces * split, heads, dk, dv] -> piece sums [batch, pieces, ...].

    Forward sums are aged to their last token, so sub-piece j of `split` counts lambda^((split-1-j)
    sub_span) towards its piece's; reverse sums are aged to their first token: lambda^(j sub_span)."""
    if split == 1:
        return adds
    batch, _, heads, dk, dv = adds.shape
    j = jnp.arange(split, dtype=jnp.float32)
    lags = j if reverse else split - 1 - j
    weights = jnp.exp(-rates.astype(jnp.float32)[None, :] * (lags[:, None] * sub_span))  # [split, heads]
    adds = adds.reshape(batch, pieces, split, heads, dk, dv)
    return jnp.einsum("bpjhkv,jh->bphkv", adds, weights, precision=lax.Precision.HIGHEST)


def _forward_starts(k, v, kdec, sdec, rates, s_in, *, time, pieces, blocks_per_piece, split, shape, head_offset,
                    segments, segment_ids, **common):
    """The forward's start state of each piece, fp32 [batch, pieces, heads, dk, dv]: a first kernel
    sums each piece but the last from zero (U_p, aged to the piece's last token; in `split`
    sub-pieces, `_split_sums`), then a scan from the first piece gives piece p + 1 its start
    lambda^(span) R_p + U_p, from R_0 = S_in. Every piece but the last is whole, so each ages the
    state by lambda^(span).

    Packed documents (`segments`, the tables; `segment_ids`): U_p holds the piece's last document
    only (the first kernel drops its state where a document starts), and R_p carries on only where
    piece p has no document start: R_(p+1) = c_p lambda^(span) R_p + U_p with c_p = 1 when the
    token before the piece (for the first piece, its first token) and the piece's last token are
    in one document."""
    del time  # the reverse sweep's signature: the forward's pieces do not need the length
    batch, _, heads, dk, dv = shape
    span = blocks_per_piece * common["block"]
    head = pieces - 1
    adds = _sweep([k, v, kdec, sdec] + segments, outputs=False, shape=shape,  # (its rows end before the last piece)
                  pieces=head * split, blocks_per_piece=blocks_per_piece // split, has_s0=False,
                  head_offset=head_offset, has_segments=bool(segments), **common)
    adds = _split_sums(adds, rates, pieces=head, split=split, sub_span=span // split, reverse=False)
    age = jnp.exp(-rates.astype(jnp.float32) * span)[:, None, None]
    start = jnp.zeros((batch, heads, dk, dv), jnp.float32) if s_in is None else s_in
    carry = jnp.ones((head, batch), jnp.float32)
    if segment_ids is not None:
        ends = jnp.arange(1, pieces) * span - 1  # pieces 0 .. P-2: their last tokens
        before = jnp.maximum(ends - span, 0)  # and the token before each (the first token for piece 0)
        carry = (segment_ids[:, ends] == segment_ids[:, before]).astype(jnp.float32).T

    def link(state, add_carry):
        add, c = add_carry
        return c[:, None, None, None] * age * state + add, state

    last_start, starts = lax.scan(link, start, (jnp.moveaxis(adds, 1, 0), carry))  # pieces 0 .. P-2, then P-1
    return jnp.concatenate([jnp.moveaxis(starts, 0, 1), last_start[:, None]], axis=1)


def _reverse_starts(k, v, kdec, sdec, rates, s_in, *, time, pieces, blocks_per_piece, split, shape, real_blocks,
                    head_offset, segments, segment_ids, **common):
    """The reverse sweep's start state of each piece, fp32 [batch, pieces, heads, dk, dv].

    Piece p starts from G_(p+1): the later tokens' terms aged to piece p + 1's first token. The last
    piece starts from S_in (it enters at the last token, inside the sweep). A first kernel sums
    each piece but the first from zero, A_p = sum over its tokens s of scale lambda^(s - first)
    k_s^T v_s (the reverse tables); then G_(P-1) = lambda^(n - 1 - first_(P-1)) S_in + A_(P-1)
    and G_p = lambda^(span) G_(p+1) + A_p for the whole pieces before it. With `split` the first
    kernel sums sub-pieces (`_split_sums`).

    Packed documents: A_p holds the document of the piece's first token only, and a state carries
    through piece p only where its first token and the token after it (for the last piece, the
    row's last token, where S_in enters) are in one document."""
    batch, _, heads, dk, dv = shape
    span = blocks_per_piece * common["block"]
    adds = _sweep(  # pieces 1 .. P-1: the block kinds count from the cut (real_blocks less one piece)
        [k, v, kdec, sdec] + segments, outputs=False, shape=shape, pieces=(pieces - 1) * split,
        blocks_per_piece=blocks_per_piece // split, real_blocks=real_blocks - blocks_per_piece, has_s0=False,
        reverse=True, head_offset=head_offset, block_offset=blocks_per_piece, has_segments=bool(segments), **common,
    )
    adds = _split_sums(adds, rates, pieces=pieces - 1, split=split, sub_span=span // split, reverse=True)
    rates = rates.astype(jnp.float32)[:, None, None]
    carry = jnp.ones((pieces - 1, batch), jnp.float32)  # pieces 1 .. P-1
    if segment_ids is not None:
        firsts = jnp.arange(1, pieces) * span
        after = jnp.minimum(firsts + span, time - 1)
        carry = (segment_ids[:, firsts] == segment_ids[:, after]).astype(jnp.float32).T
    last = jnp.zeros((batch, heads, dk, dv), jnp.float32) if s_in is None else s_in
    after_last = (carry[-1][:, None, None, None] * jnp.exp(-rates * (time - 1 - (pieces - 1) * span)) * last
                  + adds[:, -1])

    def link(state, add_carry):  # state: G_(p+1), the start of piece p -> G_p, the start of piece p - 1
        add, c = add_carry
        return c[:, None, None, None] * jnp.exp(-rates * span) * state + add, state

    first, middle = lax.scan(link, after_last, (jnp.moveaxis(adds[:, :-1], 1, 0)[::-1], carry[:-1][::-1]))  # P-2 .. 1
    return jnp.concatenate([first[:, None], jnp.moveaxis(middle[::-1], 0, 1), last[:, None]], axis=1)


def backward(q, k, v, rates, initial_state, d_o, d_final, segment_ids=None, *, block: int = 64, scale: float = 1.0,
             pieces: int = 1,
             stages: int = 2, rows_per_program: int = 1, warp_specialized: bool = False, interpret=False,
             scores_in_registers: bool | None = None, update_in_registers: bool | None = None,
             state_split: int = 1, tail_heads: int = 0, tail_pieces: int = 1, fused: tuple[int, int, int] | None = None):
    """The gradients of `forward` as three sweeps of the same kernels, none of which needs a saved state:

        dQ = forward(dO, V, K; S_in^T)                     causal: dQ_t = scale (sum_(s<=t) lambda^(t-s)
                                                           (dO_t . v_s) k_s + lambda^(t+1) dO_t S_in^T)
        dV, G = forward(K, Q, dO; dL/dS_final, reverse)    anti-causal; G = dL/dS_in / lambda
        dK = forward(V, dO, Q; (dL/dS_final)^T, reverse)

    (the forward with its operands' roles exchanged computes each: the state it carries is S^T for
    dQ and the reverse-time state G of the later tokens for dK and dV). Arguments as `forward`'s;
    d_o like v, d_final fp32 [batch, heads, dim_k, dim_v] or None (zero). Returns (dq, dk, dv in q's dtype, d_initial_state fp32 or None when
    initial_state is None). `pieces` (and a tail, `tail_heads`) cuts the sequence for all three sweeps.

    `fused`: None sweeps dV and dK apart as above; (pieces, rows_per_program, state_split)
    computes both in one sweep with that launch plan of its own (`dkdv.dkdv`, which reads q, k, v
    and dO once; dims <= 128); the dQ sweep is unchanged.

    Interpreting, call it outside `jit`: it waits for each sweep before the next (three
    interpreted kernels in one XLA:CPU program can deadlock on their host callbacks)."""
    common = dict(block=block, scale=scale, stages=stages, rows_per_program=rows_per_program,
                  warp_specialized=warp_specialized, interpret=interpret, scores_in_registers=scores_in_registers,
                  update_in_registers=update_in_registers, state_split=state_split, tail_heads=tail_heads,
                  tail_pieces=tail_pieces)
    wait = jax.block_until_ready if interpret else (lambda x: x)
    d_o = d_o.astype(q.dtype)
    s_in_t = None if initial_state is None else jnp.swapaxes(initial_state, -1, -2)
    dq, _ = wait(forward(d_o, v, k, rates, s_in_t, segment_ids, pieces=pieces, **common))
    if fused is not None:
        from lightning_jax.attention.pallas_mosaic.dkdv import dkdv  # (it imports this module)

        dkdv_pieces, dkdv_rows, dkdv_split = fused
        dk, dv, g = wait(dkdv(q, k, v, d_o, rates, d_final, segment_ids, block=block, scale=scale, pieces=dkdv_pieces,
                              state_split=dkdv_split, rows_per_program=dkdv_rows, interpret=interpret))
    else:
        dv, g = wait(forward(k, q, d_o, rates, d_final, segment_ids, pieces=pieces, reverse=True, **common))
        d_final_t = None if d_final is None else jnp.swapaxes(d_final, -1, -2)
        dk, _ = wait(forward(v, d_o, q, rates, d_final_t, segment_ids, pieces=pieces, reverse=True, **common))
    d_s_in = None if initial_state is None else jnp.exp(-rates.astype(jnp.float32))[None, :, None, None] * g
    return dq, dk, dv, d_s_in
