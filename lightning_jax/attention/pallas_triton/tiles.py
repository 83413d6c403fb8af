"""Pieces every kernel body shares: matmuls, masked tiles, decay factors, BlockSpecs, the launch.

Arrays stay in [batch, time, heads, dim]; a BlockSpec is only a pointer, so blocks wider than the
real dim (padding to a power of two) cost nothing: loads past it are masked, stores skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lightning_jax.attention.pallas_triton.plan import Plan

F32 = jnp.float32


# ----------------------------------------------------------------------------------------------
# Pieces shared by the kernel bodies.


def dot(a, b, plan: Plan, *, trans_a=False, trans_b=False):
    """2-D matmul with an fp32 accumulator; operands as given (bf16/fp16 hit the tensor cores)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if plan.precise else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def scaled(x, factors, dtype):
    """diag(factors) x in `dtype`: a per-row decay folded into a matmul operand."""
    return (x.astype(F32) * factors[:, None]).astype(dtype)


class Tile:
    """Masked loads and stores of one program's tiles: [C, width] slices of [chunk, dim] token blocks
    and its part of [dk_pad, dv_pad] state blocks.

    `split` names the dim ("k" or "v") whose columns are tiled; the program owns tile `index` of it
    and sees the other dim whole. Every BlockSpec covers the whole (padded) width, so one kernel can
    host programs split along different dims (the fused backward). Rows past `time` (the ragged tail)
    and columns past the real dim read as zero and are never written. Masks are only built where the
    shape needs them, so full tiles load unmasked.
    """

    def __init__(self, plan: Plan, chunk_index, split: str, index):
        self.plan, self.split = plan, split
        self.chunk_start = chunk_index * plan.chunk
        self.ragged = plan.time % plan.chunk != 0
        self.width = {"k": plan.dk_pad, "v": plan.dv_pad}
        self.col0 = {"k": 0, "v": 0}
        self.width[split] = plan.tile_of(split)
        self.col0[split] = index * self.width[split]

    def _mask(self, t0, dim: str):
        plan = self.plan
        width, real = self.width[dim], (plan.dim_k if dim == "k" else plan.dim_v)
        mask = None
        if self.ragged:
            rows = self.chunk_start + t0 + jnp.arange(plan.block)
            mask = (rows < plan.time)[:, None]
        if real != (plan.dk_pad if dim == "k" else plan.dv_pad):
            cols = (self.col0[dim] + jnp.arange(width) < real)[None, :]
            mask = cols if mask is None else mask & cols
        if mask is not None:
            mask = jnp.broadcast_to(mask, (plan.block, width))
        return mask

    def _view(self, ref, t0, dim: str):
        return ref.at[pl.ds(t0, self.plan.block), pl.ds(self.col0[dim], self.width[dim])]

    def load(self, ref, t0, dim: str):
        mask = self._mask(t0, dim)
        view = self._view(ref, t0, dim)
        if mask is None:
            return view[...]
        return plt.load(view, mask=mask, other=0.0)

    def store(self, ref, t0, value, dim: str):
        mask = self._mask(t0, dim)
        view = self._view(ref, t0, dim)
        value = value.astype(ref.dtype)
        if mask is None:
            view[...] = value
        else:
            plt.store(view, value, mask=mask)

    def load_starts(self, ref, t0):
        """[C] int32 segment start positions of the block at chunk offset t0 (packed documents);
        rows past `time` read as -1."""
        view = ref.at[pl.ds(t0, self.plan.block)]
        if not self.ragged:
            return view[...]
        rows = self.chunk_start + t0 + jnp.arange(self.plan.block)
        return plt.load(view, mask=rows < self.plan.time, other=-1)

    def _state_view(self, ref):
        rows, cols = pl.ds(self.col0["k"], self.width["k"]), pl.ds(self.col0["v"], self.width["v"])
        return ref.at[rows, cols]

    def load_state(self, ref):
        """This program's part of a [dk_pad, dv_pad] state: rows (split "k") or columns ("v")."""
        return self._state_view(ref)[...].astype(F32)

    def store_state(self, ref, value):
        self._state_view(ref)[...] = value

    def zero_state(self):
        return jnp.zeros((self.width["k"], self.width["v"]), F32)


def end_exponent(plan: Plan, start, length: int):
    """clip(time - 1 - start, 0, length) as fp32: the decay exponent of a span starting at `start`."""
    return jnp.clip(plan.time - 1 - start, 0, length).astype(F32)


class Decays:
    """The decays of one program's blocks, all exp(-rate * delta) with delta >= 0 (never overflow).

    `scale` (the q scale) is folded into the factors that multiply q in every product (`intra`,
    `intra_t`, `from_start`), so q is never rescaled in registers; `block` stays unscaled.
    """

    def __init__(self, rate, plan: Plan, chunk_index, scale: float = 1.0):
        self.rate, self.plan = rate, plan
        self.chunk_start = chunk_index * plan.chunk
        self.a = jnp.arange(plan.block).astype(F32)
        lag = self.a[:, None] - self.a[None, :]
        # D[a, b] = lambda^(a - b) for a >= b, else 0. Mask the exponent, not the result:
        # exp(+large) above the diagonal would overflow.
        self.intra = scale * jnp.exp(jnp.where(lag >= 0, -rate * lag, -jnp.inf))
        # D^T, for products built transposed (K Q^T rather than (Q K^T)^T): no operand is transposed
        # in registers.
        self.intra_t = scale * jnp.exp(jnp.where(lag <= 0, rate * lag, -jnp.inf))
        self.from_start = scale * jnp.exp(-rate * self.a)  # lambda^a: the state reaching row a

    def block(self, t0):
        """(lambda^E, lambda^(E - a)) for the block at chunk offset t0: the whole state's decay
        over the block and each row's decay to the block's end (padded rows: finite, unused)."""
        end = end_exponent(self.plan, self.chunk_start + t0, self.plan.block)
        return jnp.exp(-self.rate * end), jnp.exp(-self.rate * jnp.maximum(end - self.a, 0.0))


class Gates:
    """Packed documents: the 0/1 gates of one program's blocks, from `starts`, each token's segment
    start position (an int32 [batch, time] input derived from the segment ids, tiled like time).

    Two tokens share a segment iff their starts are equal, and a token's segment began before
    position p iff its start < p, so every gate is a comparison inside the block (no carry, the
    same in forward and reverse sweeps). For the block starting at global position b0, with
    begin = max(b0, 1) (block 0: the initial state belongs to the row's first segment):

        same[a, b] = starts_a == starts_b        intra-block pairs of one segment (symmetric)
        gq[a]      = starts_a < begin            row a is reached by the incoming state
        gk[a]      = starts_a == last            row a reaches the block's end (last = max starts)
        gb         = last < begin                the incoming state passes through the block

    Rows past `time` read -1: they change no gate of a real row, and a block of padding only passes
    the state through (gb = 1), as its end exponent 0 does.
    """

    def __init__(self, tile: Tile, starts_ref):
        self.tile, self.ref = tile, starts_ref

    def block(self, t0):
        """(same [C, C] bool, gq [C], gk [C], gb scalar) for the block at chunk offset t0."""
        starts = self.tile.load_starts(self.ref, t0)
        begin = jnp.maximum(self.tile.chunk_start + t0, 1)
        last = jnp.max(starts)
        same = starts[:, None] == starts[None, :]
        return same, (starts < begin).astype(F32), (starts == last).astype(F32), (last < begin).astype(F32)


def head_rate(rates_ref, plan: Plan):
    return rates_ref[pl.program_id(2) % plan.heads]


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays stay in [batch, time, heads, dim]; a BlockSpec is only a pointer,
# so blocks wider than the real dim (padding) cost nothing: loads past it are masked.


def token_spec(plan: Plan, dim: str, first_chunk: int = 0):
    """[batch, time, heads, dim] tokens of chunk first_chunk + j, the whole (padded) width."""
    heads = plan.heads
    width = plan.dk_pad if dim == "k" else plan.dv_pad
    return pl.BlockSpec(
        (None, plan.chunk, None, width), lambda t, j, bh: (bh // heads, first_chunk + j, bh % heads, 0)
    )


def starts_spec(plan: Plan, first_chunk: int = 0):
    """[batch, time] int32 segment starts of chunk first_chunk + j (packed documents)."""
    heads = plan.heads
    return pl.BlockSpec((None, plan.chunk), lambda t, j, bh: (bh // heads, first_chunk + j))


def state_spec(plan: Plan):
    """Per-chunk states [batch * heads, N, dk_pad, dv_pad]: chunk j's whole state."""
    return pl.BlockSpec((None, None, plan.dk_pad, plan.dv_pad), lambda t, j, bh: (bh, j, 0, 0))


def single_state_spec(plan: Plan):
    """One state per (batch, head): [batch * heads, dk_pad, dv_pad]."""
    return pl.BlockSpec((None, plan.dk_pad, plan.dv_pad), lambda t, j, bh: (bh, 0, 0))


WHOLE = pl.BlockSpec()  # the whole array (the per-head rates)


def call(kernel, plan: Plan, tiles: int, in_specs, out_specs, out_shape, name: str, chunks=None):
    # Tiles fastest: the programs of one chunk run together and share its operands in L2.
    return pl.pallas_call(
        kernel,
        grid=(tiles, plan.num_chunks if chunks is None else chunks, plan.batch * plan.heads),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name=name,
    )


def states_shape(plan: Plan, n: int | None):
    lead = (plan.batch * plan.heads,) + (() if n is None else (n,))
    return jax.ShapeDtypeStruct((*lead, plan.dk_pad, plan.dv_pad), F32)
