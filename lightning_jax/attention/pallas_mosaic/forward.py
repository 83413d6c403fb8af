"""Lightning Attention forward as a Pallas Mosaic GPU kernel (Hopper), first and simplest version.

One program (CTA, one warpgroup) per (value tile, head, batch). It walks the sequence in blocks of
`block` tokens, carrying the true fp32 state S (convention B of docs/lightning-math.md: S after the
block's last token, S_in before the first block) in registers::

    O_i     = ((Q_i K_i^T) * D) V_i + diag(lambda^(a+1)) Q_i S            D[a, b] = lambda^(a-b), a >= b
    S      <- lambda^m S + K_i^T diag(lambda^(m-1-a)) V_i                 m = real length of block i

Every block has m = block except the last one, whose tokens past the end are zero padding (zero k
and v add nothing, and the last block uses its real length m in both decays, so the padding does
not age the state: the final state is exact for any length).

All decays are built in the wrapper in fp32 as exp(-rate * delta) with delta >= 0 (masked exponent),
as small per-head tables that each program copies into shared memory once: the intra-block mask
D (times `scale`), the q decays lambda^(a+1) (times `scale`), the k decays and the block decay for
a full block and for the last block.

The Triton kernels use convention A (the state aged to the block's first token); here the state
lives in registers for the whole sweep, and convention B gives the ragged final state exactly
without dividing by lambda. Both are right; mixing them within a kernel is the bug to avoid.

Status: tested in GPU interpret mode on CPU and cross-lowered for sm_90 (tests/test_pallas_mosaic.py);
not yet run on a GPU, not registered as an implementation of `lightning_attention`, forward only.

Every matmul goes through `_mm`: wgmma with both operands in shared memory into a scoped
accumulator, the form GPU interpret mode supports (it has no rule for A from registers nor for
`ACC.init`). Operands that are computed in registers (the masked scores, the bf16 copy of the
state, the decayed V) are therefore staged in shared memory first.
"""

from __future__ import annotations

import functools

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


def _rows(vec, shape):
    """Broadcast a (shape[0],) vector along the columns of `shape` (scales rows)."""
    return lax.broadcast_in_dim(vec, shape, [0])


def _kernel(*refs, block, num_blocks, dim_k, tile_v, has_s0):
    if has_s0:
        q_ref, k_ref, v_ref, mask_ref, qdec_ref, kdec_ref, sdec_ref, s0_ref, o_ref, sf_ref = refs
    else:
        q_ref, k_ref, v_ref, mask_ref, qdec_ref, kdec_ref, sdec_ref, o_ref, sf_ref = refs
        s0_ref = None
    dt = q_ref.dtype
    j = lax.axis_index("tile")
    h = lax.axis_index("head")
    b = lax.axis_index("batch")
    cols = pl.ds(j * tile_v, tile_v)
    wgmma = plgpu.Layout.WGMMA
    row = plgpu.Layout.WGMMA.reduce(1)

    def scoped(q_s, k_s, v_s, p_s, vs_s, r_s, o_s, mask_s, qdec_s, kdec_s, sdec_s, st_s, bars, tbar):
        # Decay tables of this head: once per program.
        for src, dst in ((mask_ref, mask_s), (qdec_ref, qdec_s), (kdec_ref, kdec_s), (sdec_ref, sdec_s)):
            plgpu.copy_gmem_to_smem(src.at[h], dst, tbar)
            plgpu.barrier_wait(tbar)
        mask = plgpu.load(mask_s, layout=wgmma)  # [block, block]
        qdec = plgpu.load(qdec_s, layout=row)  # [block]
        kdecs = [plgpu.load(kdec_s.at[r], layout=row) for r in range(2)]  # full block, last block
        sdecs = [plgpu.load(sdec_s.at[r], layout=row) for r in range(2)]  # [dim_k]

        if s0_ref is not None:
            plgpu.copy_gmem_to_smem(s0_ref.at[b, h, :, cols], st_s, tbar)
            plgpu.barrier_wait(tbar)
            s = plgpu.load(st_s, layout=wgmma)
        else:
            s = plgpu.layout_cast(jnp.zeros((dim_k, tile_v), jnp.float32), wgmma)

        def step(i, s, kdec, sdec):
            rows = pl.ds(i * block, block)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h, :], q_s, bars.at[0])
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows, h, :], k_s, bars.at[1])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows, h, cols], v_s, bars.at[2])
            # The bf16 state for Q S while the copies fly.
            r_s[...] = s.astype(dt)
            for n in range(3):
                plgpu.barrier_wait(bars.at[n])
            scores = _mm(q_s, k_s.transpose((1, 0))) * mask  # [block, block], masked and decayed
            p_s[...] = scores.astype(dt)
            v = plgpu.load(v_s, layout=wgmma).astype(jnp.float32)
            vs_s[...] = (v * _rows(kdec, v.shape)).astype(dt)  # diag(lambda^(m-1-a)) V
            plgpu.commit_smem()  # make the register stores visible to wgmma
            o = _mm(p_s, v_s) + _mm(q_s, r_s) * _rows(qdec, (block, tile_v))
            o_s[...] = o.astype(dt)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_s, o_ref.at[b, rows, h, cols])
            s = s * _rows(sdec, s.shape) + _mm(k_s.transpose((1, 0)), vs_s)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # o_s is reused by the next block
            return s

        s = lax.fori_loop(0, num_blocks - 1, lambda i, s: step(i, s, kdecs[0], sdecs[0]), s)
        s = step(num_blocks - 1, s, kdecs[1], sdecs[1])
        st_s[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(st_s, sf_ref.at[b, h, :, cols])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped,
        _smem_operand((block, dim_k), dt),  # q
        _smem_operand((block, dim_k), dt),  # k
        _smem_operand((block, tile_v), dt),  # v
        _smem_operand((block, block), dt),  # masked scores
        _smem_operand((block, tile_v), dt),  # decayed v
        _smem_operand((dim_k, tile_v), dt),  # bf16 state
        _smem_operand((block, tile_v), dt),  # o
        plgpu.SMEM((block, block), jnp.float32),
        plgpu.SMEM((block,), jnp.float32),
        plgpu.SMEM((2, block), jnp.float32),
        plgpu.SMEM((2, dim_k), jnp.float32),
        plgpu.SMEM((dim_k, tile_v), jnp.float32),  # fp32 state in/out
        plgpu.Barrier(num_barriers=3),
        plgpu.Barrier(num_barriers=1),
    )


def decay_tables(rates, *, block, length, dim_k, scale=1.0):
    """The per-head fp32 tables the kernel reads, built from exp(-rate * delta), delta >= 0.

    mask [H, B, B] = scale * lambda^(a-b) (a >= b, else 0); qdec [H, B] = scale * lambda^(a+1);
    kdec [H, 2, B]: lambda^(B-1-a) for a full block, lambda^(m-1-a) (a < m, else 0) for the last
    block of real length m; sdec [H, 2, dim_k]: lambda^B and lambda^m, repeated along dim_k."""
    rates = rates.astype(jnp.float32)[:, None]
    last = length - (pl.cdiv(length, block) - 1) * block
    a = jnp.arange(block, dtype=jnp.float32)
    lag = a[:, None] - a[None, :]
    mask = scale * jnp.exp(jnp.where(lag >= 0, -rates[:, :, None] * lag, -jnp.inf))
    qdec = scale * jnp.exp(-rates * (a + 1))
    kdec = jnp.stack(
        [jnp.exp(-rates * (block - 1 - a)), jnp.exp(jnp.where(a < last, -rates * (last - 1 - a), -jnp.inf))], axis=1
    )
    sdec = jnp.broadcast_to(jnp.exp(-rates * jnp.array([block, last], jnp.float32))[:, :, None], (len(rates), 2, dim_k))
    return mask, qdec, kdec, sdec


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


@functools.partial(jax.jit, static_argnames=("block", "scale", "interpret"))
def forward(q, k, v, rates, initial_state=None, *, block: int = 64, scale: float = 1.0, interpret=False):
    """Causal linear attention with a constant per-head decay lambda_h = exp(-rates[h]).

    Args:
      q, k: [batch, time, heads, dim_k] bfloat16 or float16; v: [batch, time, heads, dim_v], same dtype.
      rates: [heads] decay rates >= 0.
      initial_state: optional fp32 [batch, heads, dim_k, dim_v], the state before the first token.
      block: tokens per block, a positive multiple of 64 (wgmma's M).
      scale: multiplies q (folded into the fp32 decay tables, q itself is never rescaled).
      interpret: False compiles for the GPU (or cross-lowers on a CPU); True or a
        `plgpu.InterpretGPUParams` runs GPU interpret mode (any backend, slow). When interpreting,
        `jax.block_until_ready` the result before dispatching other JAX work: on jax 0.11.2 the
        interpreter's host callbacks run jax ops themselves and can deadlock behind it on XLA:CPU.

    Returns:
      (o [batch, time, heads, dim_v] in q's dtype, final_state fp32 [batch, heads, dim_k, dim_v]).
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
    if time == 0:
        raise ValueError("time must be positive")

    num_blocks = pl.cdiv(time, block)
    q, k = (_pad_to(_pad_to(x, 1, block), 3, _TILE) for x in (q, k))
    v = _pad_to(_pad_to(v, 1, block), 3, _TILE)
    dk, dv = q.shape[-1], v.shape[-1]
    tables = decay_tables(rates, block=block, length=time, dim_k=dk, scale=scale)
    args = [q, k, v, *tables]
    if initial_state is not None:
        s0 = initial_state.astype(jnp.float32)
        args.append(jnp.pad(s0, ((0, 0), (0, 0), (0, dk - dim_k), (0, dv - dim_v))))
    kernel = functools.partial(
        _kernel, block=block, num_blocks=num_blocks, dim_k=dk, tile_v=_TILE, has_s0=initial_state is not None
    )
    o, final = plgpu.kernel(
        kernel,
        out_type=(
            jax.ShapeDtypeStruct(v.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32),
        ),
        grid=(dv // _TILE, heads, batch),
        grid_names=("tile", "head", "batch"),
        compiler_params=plgpu.CompilerParams(),
        interpret=_interpret_params(interpret),
    )(*args)
    return o[:, :time, :, :dim_v], final[:, :, :dim_k, :dim_v]
