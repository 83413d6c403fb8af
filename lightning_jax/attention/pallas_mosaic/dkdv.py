"""The backward's dK and dV in one reverse sweep (`dkdv`): the dV and dK sweeps of
`kernels.backward` share their carried state, so one kernel reads q, k, v and dO once and writes
both gradients (6 streams where the two sweeps move 8).

Both are anti-causal sums over the later tokens s >= t of a sequence of n tokens, with
G_f = dL/dS_final entering at the last token (reverse tables, `kernels.decay_tables`):

    dV_t = sum_(s>=t) scale lambda^(s-t) (k_t . q_s) dO_s  + lambda^(n-1-t) k_t G_f
    dK_t = sum_(s>=t) scale lambda^(s-t) (v_t . dO_s) q_s  + lambda^(n-1-t) v_t G_f^T

and per block of the sweep (last block first), with G [dim_k, dim_v] the later tokens' terms
aged to the block's end:

    dV_i = ((K_i Q_i^T) * M) dO_i + diag(qdec) K_i G          M[a, b] = scale lambda^(b-a), b >= a
    dK_i = ((V_i dO_i^T) * M) Q_i + diag(qdec) V_i G^T
    G   <- lambda^m G + Q_i^T diag(kdec) dO_i

dK contracts over all of dim_v (and dV over dim_k), so a program owns a whole row (a sequence,
or a piece of one, of one head): G [dim_k, dim_v] in fp32 registers of one warpgroup (dims <=
128). Programs run over (head, group of rows); with pieces, each piece starts from the later
pieces' G (`kernels._reverse_starts`). Three warpgroups:

- memory (wg 2): TMA-streams q, k, dO, v of block n into slot n % stages once both compute
  warpgroups have released the slot's previous block;
- state (wg 1): publishes bf16(G) before block n (one buffer: it waits until the output
  warpgroup has read the previous one), then updates G;
- output (wg 0): dV, then dK, each stored by TMA.

On the GPU (`registers=True`) the products take their left operand from registers and
accumulate in place (G's update adds into `plgpu.ACC.init(lambda^m G)`; dV's two products share
one accumulator), which keeps G's warpgroup within its registers. GPU interpret mode has no rule
for either, so there (`registers=False`) the left operands are staged in shared memory and the
products summed (`_products`).

Shared memory at dims 128, two stages, registers: q, k, v, dO 128 KB; the bf16 G 32 KB, which
also carries the fp32 G in and out in two 64-column halves (a `plgpu.RefUnion`: the state
warpgroup uses one or the other, never both at once); the dV and dK staging 32 KB, which holds the
fp32 mask until the output warpgroup has read it into registers (another union); tables 4 KB.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lightning_jax.attention.pallas_mosaic.kernels import (_TILE, _block_decays, _block_kdec_columns, _block_qdec,
                                                           _document_mask, _interpret_params, _load_tables, _pad_to,
                                                           _reverse_starts, _rows, _smem_operand, _stream_blocks,
                                                           _walker, decay_tables, segment_tables)


def _products(pairs, *, registers, init=None):
    """fp32 init + the sum of a @ b over `pairs`, every b a shared-memory operand. `registers`
    (GPU only): the products accumulate in place into `plgpu.ACC.init(init)` and an a may be
    16-bit registers in the WGMMA layout; otherwise every a is a shared-memory operand and the
    products go to a fresh accumulator that is then added to init (the form GPU interpret mode
    runs)."""
    (a0, b0), *_ = pairs
    m, n = a0.shape[0], b0.shape[1]
    if registers:
        start = init if init is not None else plgpu.layout_cast(jnp.zeros((m, n), jnp.float32), plgpu.Layout.WGMMA)

        def accumulate(acc_ref):
            for a, b in pairs:
                plgpu.wgmma(acc_ref, a, b)

        return pl.run_state(accumulate)(plgpu.ACC.init(start))

    def body(acc_ref):
        for a, b in pairs:
            plgpu.wgmma(acc_ref, a, b)
        return acc_ref[...]

    out = pl.run_scoped(body, plgpu.ACC((m, n), jnp.float32))
    return out if init is None else init + out


def _kernel(q_ref, k_ref, v_ref, do_ref, mask_ref, qdec_ref, kdec_ref, sdec_ref, *refs, block, blocks_per_piece,
            real_blocks, pieces, rows_per_program, dim_k, dim_v, stages, has_g0, has_segments, registers):
    refs = list(refs)
    g0_ref = refs.pop(0) if has_g0 else None
    seg_ref = refs.pop(0) if has_segments else None
    dk_ref, dv_ref, g_ref = refs
    dt = q_ref.dtype
    h = lax.axis_index("head")
    wg = lax.axis_index("wg")
    wgmma = plgpu.Layout.WGMMA
    steps = rows_per_program * blocks_per_piece
    where = _walker(lax.axis_index("rows") * rows_per_program, blocks_per_piece, pieces, reverse=True)
    halves = dim_v // _TILE  # the fp32 G goes in and out in 64-column halves

    def scoped(q_s, k_s, v_s, do_s, g_union, out_union, stage_s, qdec_s, kdec_s, sdec_s, full, consumed, ready,
               free, tbars, done, *segments):
        seg_s, seg_full = segments if has_segments else (None, None)  # [stages, 5, block] fp32
        r_s, st_s = g_union  # bf16 G [dim_k, dim_v] | fp32 [dim_k, 64] for G in and out
        (dk_s, dv_s), mask_s = out_union  # the dK, dV staging | the fp32 mask before it is read
        kq_s, vq_s, p_s, up_s = stage_s  # interpret mode's staged operands (placeholders with registers)

        @pl.when(wg == 2)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def issue(n, slot):
                b, _, g = where(n)
                rows = pl.ds(g * block, block)
                for t, (src, dst) in enumerate(((q_ref, q_s), (k_ref, k_s), (do_ref, do_s), (v_ref, v_s))):
                    plgpu.copy_gmem_to_smem(src.at[b, rows, h, :], dst.at[slot], full.at[4 * slot + t])
                if has_segments:
                    plgpu.copy_gmem_to_smem(seg_ref.at[b, g], seg_s.at[slot], seg_full.at[slot])

            _stream_blocks(steps, stages, consumed, issue)

        @pl.when(wg == 1)
        def _state():
            plgpu.set_max_registers(232, action="increase")
            _load_tables((kdec_ref.at[h], kdec_s, tbars.at[0]), (sdec_ref.at[h], sdec_s, tbars.at[1]))

            def step(n, g_state):
                slot = n % stages
                _, _, g = where(n)
                kdec, sdec = _block_decays(kdec_s, sdec_s, g, real_blocks)

                @pl.when(n % blocks_per_piece > 0)  # (a row's first block: its start waited for the last free)
                def _():
                    plgpu.barrier_wait(free)

                r_s[...] = g_state.astype(dt)
                plgpu.commit_smem()
                plgpu.barrier_arrive(ready)
                plgpu.barrier_wait(full.at[4 * slot])  # q
                plgpu.barrier_wait(full.at[4 * slot + 2])  # dO
                aged = g_state * _rows(sdec, g_state.shape)
                if has_segments:  # G carries on only within its document; the block adds its first token's
                    plgpu.barrier_wait(seg_full.at[slot])
                    aged = aged * seg_s[slot, 4, 0]
                if registers:  # A = Q^T diag(kdec) from registers (a transposed load of q)
                    qt = plgpu.load(q_s.at[slot].transpose((1, 0)), layout=wgmma).astype(jnp.float32)
                    kdec_cols = _block_kdec_columns(kdec_s, g, real_blocks)
                    if has_segments:
                        kdec_cols = kdec_cols * plgpu.load(seg_s.at[slot, 3], layout=wgmma.reduce(0))
                    kdec_cols = lax.broadcast_in_dim(kdec_cols, qt.shape, [1])
                    g_state = _products([((qt * kdec_cols).astype(dt), do_s.at[slot])], registers=True, init=aged)
                else:  # diag(kdec) dO staged
                    if has_segments:
                        kdec = kdec * plgpu.load(seg_s.at[slot, 3], layout=wgmma.reduce(1))
                    d_o = plgpu.load(do_s.at[slot], layout=wgmma).astype(jnp.float32)
                    up_s[...] = (d_o * _rows(kdec, d_o.shape)).astype(dt)
                    plgpu.commit_smem()
                    g_state = _products([(q_s.at[slot].transpose((1, 0)), up_s)], registers=False, init=aged)
                plgpu.barrier_arrive(consumed.at[slot])
                return g_state

            def row(r, carry):
                b, piece, _ = where(r * blocks_per_piece)
                # G in (the row's start: G_f or the piece's, or zero) through st_s; r_s, which shares its
                # memory, is free (the last row's end waited for it).
                if g0_ref is None:
                    g_state = plgpu.layout_cast(jnp.zeros((dim_k, dim_v), jnp.float32), wgmma)
                else:
                    parts = []
                    for j in range(halves):
                        plgpu.copy_gmem_to_smem(g0_ref.at[b, piece, h, :, pl.ds(j * _TILE, _TILE)], st_s, tbars.at[2])
                        plgpu.barrier_wait(tbars.at[2])
                        parts.append(plgpu.load(st_s, layout=wgmma))
                        plgpu.commit_smem()  # every thread has read st_s before the next copy or r_s
                    g_state = jnp.concatenate(parts, axis=1) if halves > 1 else parts[0]
                g_state = lax.fori_loop(r * blocks_per_piece, (r + 1) * blocks_per_piece, step, g_state)
                plgpu.barrier_wait(free)  # the output warpgroup is done with the row's last bf16 G
                for j in range(halves):
                    st_s[...] = g_state[:, j * _TILE:(j + 1) * _TILE]
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(st_s, g_ref.at[b, piece, h, :, pl.ds(j * _TILE, _TILE)])
                    plgpu.wait_smem_to_gmem(0)  # st_s is rewritten next (and r_s shares its memory)
                return carry

            lax.fori_loop(0, rows_per_program, row, 0)

        @pl.when(wg == 0)
        def _output():
            plgpu.set_max_registers(232, action="increase")
            _load_tables((mask_ref.at[h], mask_s, tbars.at[3]), (qdec_ref.at[h], qdec_s, tbars.at[4]))
            mask = plgpu.load(mask_s, layout=wgmma)  # [block, block]
            plgpu.commit_smem()  # every thread has read the mask before dK and dV take its memory

            def gradient(x_s, y_s, z_s, g_view, xq_s, block_mask, qdec, wait_ready):
                """((X Y^T) * M) Z + diag(qdec) X G' for one block (G' = G or G^T, the bf16 G)."""
                scores = (_products([(x_s, y_s.transpose((1, 0)))], registers=False) * block_mask).astype(dt)
                x = plgpu.load(x_s, layout=wgmma).astype(jnp.float32)
                xq = (x * _rows(qdec, x.shape)).astype(dt)  # diag(qdec) X
                if not registers:
                    p_s[...] = scores
                    xq_s[...] = xq
                    plgpu.commit_smem()
                    scores, xq = p_s, xq_s
                if wait_ready:
                    plgpu.barrier_wait(ready)
                return _products([(scores, z_s), (xq, g_view)], registers=registers)

            def store(x, out_s, ref, b, g):
                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this buffer's last store has read it
                out_s[...] = x.astype(dt)
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_s, ref.at[b, pl.ds(g * block, block), h, :])

            def step(n, carry):
                slot = n % stages
                b, _, g = where(n)
                qdec = _block_qdec(qdec_s, g, real_blocks)
                for t in range(4):  # q, k, dO, v
                    plgpu.barrier_wait(full.at[4 * slot + t])
                block_mask = mask
                if has_segments:  # same-document pairs; the carried G's document only
                    plgpu.barrier_wait(seg_full.at[slot])
                    block_mask, qdec = _document_mask(seg_s, slot, mask, qdec)
                d_v = gradient(k_s.at[slot], q_s.at[slot], do_s.at[slot], r_s, kq_s, block_mask, qdec, wait_ready=True)
                store(d_v, dv_s, dv_ref, b, g)
                d_k = gradient(v_s.at[slot], do_s.at[slot], q_s.at[slot], r_s.transpose((1, 0)), vq_s, block_mask, qdec,
                               wait_ready=False)
                plgpu.barrier_arrive(free)
                plgpu.barrier_arrive(consumed.at[slot])
                store(d_k, dk_s, dk_ref, b, g)
                return carry

            lax.fori_loop(0, steps, step, 0)
            plgpu.wait_smem_to_gmem(0)

        plgpu.barrier_arrive(done)  # no warpgroup leaves before the others
        plgpu.barrier_wait(done)

    placeholder = plgpu.SMEM((1,), jnp.float32)
    staged = (placeholder,) * 4 if registers else (
        _smem_operand((block, dim_k), dt), _smem_operand((block, dim_v), dt), _smem_operand((block, block), dt),
        _smem_operand((block, dim_v), dt))
    pl.run_scoped(
        scoped,
        _smem_operand((stages, block, dim_k), dt),  # q
        _smem_operand((stages, block, dim_k), dt),  # k
        _smem_operand((stages, block, dim_v), dt),  # v
        _smem_operand((stages, block, dim_v), dt),  # dO
        plgpu.RefUnion(_smem_operand((dim_k, dim_v), dt), plgpu.SMEM((dim_k, _TILE), jnp.float32)),
        plgpu.RefUnion((_smem_operand((block, dim_k), dt), _smem_operand((block, dim_v), dt)),
                       plgpu.SMEM((block, block), jnp.float32)),
        staged,
        plgpu.SMEM((3, block), jnp.float32),  # qdec
        plgpu.SMEM((3, block), jnp.float32),  # kdec
        plgpu.SMEM((4, dim_k), jnp.float32),  # sdec
        plgpu.Barrier(num_barriers=4 * stages),  # full
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # consumed
        plgpu.Barrier(),  # ready
        plgpu.Barrier(),  # free
        plgpu.Barrier(num_barriers=5),  # tables, G in
        plgpu.Barrier(num_arrivals=3),  # done
        *([plgpu.SMEM((stages, 5, block), jnp.float32), plgpu.Barrier(num_barriers=stages)] if has_segments else []),
        collective_axes="wg",
    )


@functools.partial(jax.jit, static_argnames=("block", "scale", "stages", "pieces", "state_split", "rows_per_program",
                                             "interpret", "registers"))
def dkdv(q, k, v, d_o, rates, d_final=None, segment_ids=None, *, block: int = 64, scale: float = 1.0, stages: int = 2, pieces: int = 1,
         state_split: int = 1, rows_per_program: int = 1, interpret=False, registers: bool | None = None):
    """dK and dV of `kernels.forward` in one reverse sweep, and G = dL/dS_in / lambda.

    Args:
      q, k: [batch, time, heads, dim_k]; v, d_o: [batch, time, heads, dim_v]; one 16-bit dtype,
        dims <= 128 (zero-padded to multiples of 64 inside).
      rates: [heads] decay rates >= 0. d_final: optional fp32 [batch, heads, dim_k, dim_v],
        dL/dS_final (None: zero).
      segment_ids: optional [batch, time] integers, non-decreasing along each row (packed
        documents, as `kernels.forward` takes them): the sums stay within a document, and G_f
        reaches the last document only. Pieces then sum whole pieces (no `state_split`).
      block: tokens per block (64: wgmma's M, and what fits in shared memory with dims 128).
      stages: q, k, v, dO loads in flight (2 fits in shared memory at dims 128).
      pieces: cut each sequence into this many pieces of whole blocks, run as separate programs
        (for grids of few sequences x heads); each piece starts from the later pieces' G, which a
        first kernel (summing Q^T dO over every piece but the first, reading q and dO) and a scan
        provide, as `kernels.forward(reverse=True)` does. state_split: that first kernel's
        sub-pieces (`kernels.forward`'s). Capped at the number of blocks.
      rows_per_program: rows (pieces of sequences) each program sweeps one after the other (a
        divisor of batch x pieces).
      interpret: as `kernels.forward`'s. registers: left operands from registers and in-place
        accumulation (GPU only); None: on when compiling.

    Returns:
      (dk [batch, time, heads, dim_k], dv [batch, time, heads, dim_v] in q's dtype,
      g fp32 [batch, heads, dim_k, dim_v]: every token's term aged to token 0, plus
      lambda^(time - 1) d_final; dL/dS_in = lambda g).
    """
    batch, time, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != q.shape[:3] or d_o.shape != v.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}, d_o {d_o.shape}: expected [batch, time, heads, dim]")
    if max(dim_k, dim_v) > 128:
        raise ValueError(f"dims must be <= 128, got dim_k={dim_k}, dim_v={dim_v}")
    if pieces < 1 or state_split < 1:
        raise ValueError(f"pieces and state_split must be >= 1, got {pieces}, {state_split}")
    real_blocks = pl.cdiv(time, block)
    blocks_per_piece = pl.cdiv(real_blocks, pieces)
    pieces = pl.cdiv(real_blocks, blocks_per_piece)  # whole blocks a piece; padding lies in the last
    if (batch * pieces) % rows_per_program:
        raise ValueError(f"rows_per_program must divide batch x pieces ({batch * pieces}), got {rows_per_program}")
    registers = (interpret is False) if registers is None else registers
    if registers and interpret is not False:
        raise ValueError("registers=True needs interpret=False (GPU interpret mode has no rule for wgmma with A in "
                         "registers nor for ACC.init)")
    padded = pieces * blocks_per_piece * block
    q, k, v, d_o = (_pad_to(_pad_to(x, 1, padded), 3, _TILE) for x in (q, k, v, d_o.astype(q.dtype)))
    dk, dv = q.shape[-1], v.shape[-1]
    mask, qdec, kdec, sdec = decay_tables(rates, block=block, length=time, dim_k=dk, scale=scale, reverse=True)
    start = None
    if d_final is not None:
        start = jnp.pad(d_final.astype(jnp.float32), ((0, 0), (0, 0), (0, dk - dim_k), (0, dv - dim_v)))
    if segment_ids is not None and segment_ids.shape != (batch, time):
        raise ValueError(f"segment_ids: expected shape {(batch, time)}, got {segment_ids.shape}")
    segments = [] if segment_ids is None else [segment_tables(segment_ids, block=block, padded=padded, reverse=True)]
    if pieces > 1:  # each piece's start G: the sums of the pieces after it (Q^T dO, the dV sweep's k and v roles)
        split = max(d for d in range(1, (1 if segments else state_split) + 1)
                    if blocks_per_piece % d == 0 and (d == 1 or blocks_per_piece // d >= 4))
        start = _reverse_starts(q, d_o, kdec, sdec, rates, start, time=time, pieces=pieces,
                                blocks_per_piece=blocks_per_piece, split=split, shape=(batch, time, heads, dk, dv),
                                real_blocks=real_blocks, head_offset=0, segments=segments, segment_ids=segment_ids,
                                block=block, stages=2, rows_per_program=1, warp_specialized=False, interpret=interpret)
    elif start is not None:
        start = start[:, None]
    args = [q, k, v, d_o, mask, qdec, kdec, sdec] + ([start] if start is not None else []) + segments
    kernel = functools.partial(_kernel, block=block, blocks_per_piece=blocks_per_piece, real_blocks=real_blocks,
                               pieces=pieces, rows_per_program=rows_per_program, dim_k=dk, dim_v=dv, stages=stages,
                               has_g0=start is not None, has_segments=bool(segments), registers=registers)
    grads_k, grads_v, g = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(v.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, pieces, heads, dk, dv), jnp.float32)),
        grid=(heads, batch * pieces // rows_per_program),
        grid_names=("head", "rows"),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params(interpret),
    )(*args)
    # The G left after the sweep is the first piece's.
    return grads_k[:, :time, :, :dim_k], grads_v[:, :time, :, :dim_v], g[:, 0, :, :dim_k, :dim_v]
