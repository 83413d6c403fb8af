"""Lightning attention as Pallas kernels for the Triton backend (NVIDIA GPUs), forward and backward.

The math is convention A of docs (lightning-math.md) with the "end exponent" of `xla.py`, organised
for parallelism at every shape. Time is cut into chunks of L tokens (many blocks of C tokens each),
and every kernel runs one program per (column tile, chunk, batch x head), so even batch 1, heads 16,
time 65,536 gives hundreds of programs:

  forward   1. `_chunk_state_kernel`  U_j = sum_a k_a^T lambda^(E_j - a) v_a, chunk j < N - 1 alone
            2. `_scan_kernel`         R^(j+1) = lambda^(E_j) R^(j) + U_j, a short scan over chunks
            3. `_forward_kernel`      per chunk, from R^(j): blocks of C tokens in order,
                                      O_i = ((Q_i K_i^T) * D) V_i + (diag(lambda^a) Q_i) R_i
  backward  1. `_chunk_state_kernel`  Y_j = sum_a lambda^a q_a^T dO_a, chunk j > 0 alone
            2. `_scan_kernel`         reversed: G^(j-1) = lambda^(E_j) G^(j) + Y_j, G^(N-1) = dL/dS_final
            3. `_backward_kernel`     per chunk, one launch of three program kinds side by side:
                                      dQ by a forward sweep from R^(j) (saved by the forward);
                                      dK, and dV with dL/dR^(0), by reverse sweeps from G^(j)

E is the clipped end exponent: block g (global start gC) decays the state by lambda^E_g with
E_g = clip(time - 1 - gC, 0, C), i.e. C for full blocks, m - 1 for the ragged last block (m its real
length) and 0 for the padding blocks after it. With it the state after the last block is exactly the
final state (no division by lambda), padding blocks pass states through unchanged, and a chunk's E is
the sum of its blocks' E: clip(time - 1 - jL, 0, L). Every decay is exp(-rate * delta) with
delta >= 0, built in fp32 from the rate inside the kernels; nothing per token is stored besides
q, k, v and the outputs; the only residual beyond the inputs is R^(j), one fp32 state per chunk.

Registers are the scarce resource: each program carries a dim_k x dim_v fp32 state through its
chunk. Every kernel therefore carries only a tile of it, split along the dim its output is tiled in,
so no output needs a sum over programs: o, dV and dL/dR^(0) are tiled along the value dim (state
columns), dQ and dK along the key dim (state rows). Decays are folded into an operand (q, k or v)
before each product, so every output tile has a single accumulator.

dim_k and dim_v are padded to powers of two inside the kernels (masked loads and stores, no padded
copies in HBM). Without a GPU the same kernels run in Pallas interpret mode (slow, for tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_F32 = jnp.float32
_SMEM_BUDGET = 192 * 1024  # of the 227 KiB per block on Hopper, leaving room for Triton's scratch


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs (static). Defaults from benchmarks/sweep_pallas.py on an H200, bf16."""

    block: int = 64  # C: tokens per intra-block quadratic (the tensor-core tile along time)
    chunk: int = 8192  # L: most tokens per program when a sequence needs several (see _make_plan)
    min_programs: int = 264  # 2 programs per SM on a 132-SM H100/H200 (registers allow 2)
    # Several chunks: the longest that still gives the forward this many programs (two waves of
    # min_programs). Longer chunks re-read less of k, v (q, dO) for chunk states, an (N - 1) / N
    # share, and scan fewer rows; below two waves the backward's three program kinds balance worse.
    chunk_programs: int = 512
    scan_tile: int = 512  # state elements per program of the scan over chunks
    scan_group: int = 16  # G: chunks per step of the scan (their rows loaded together)
    # Chunk-state kernel (narrow rows; wide rows use the forward's settings): it carries no decay
    # from block to block (each row's factor runs to the chunk's end), so its block is free. It is
    # a stream with little math: the whole value dim in one tile (k read once), a deeper pipeline.
    state_block: int = 64
    state_tile: int = 128
    state_num_warps: int = 4
    state_num_stages: int = 3
    # Forward kernels (chunk states, outputs): value tile width, warps, pipeline depth.
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Backward kernels: their block, and the tile width of the split dim (key dim for dQ and dK,
    # value dim for dV).
    bwd_block: int = 64
    bwd_tile: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2
    # dQ, dK and dV programs in one launch (they share a chunk's inputs in L2), else three launches.
    fuse_backward: bool = True
    # Wide rows (a padded dim x itemsize >= 512 bytes: bf16 dim 256, fp32 dim 128) overflow the
    # 227 KiB of shared memory with the tiles above: their own tile width and warps. Blocks halve
    # for rows of 1 KiB (fp32 dim 256), and the backward's for every fp32 wide row (its operands
    # are staged as fp32). A 32-token backward block cost 1.8x at bf16 dim 256 (10.9 vs 6.2 ms:
    # M = 32 dots cannot use wgmma). At bf16 dim 256 the forward is faster with 4 warps (1.08 vs
    # 1.21 ms) and the backward with 8 (3.5 vs 4.0 ms).
    wide_tile: int = 64
    wide_num_warps: int = 4
    wide_bwd_num_warps: int = 8


DEFAULT_CONFIG = Config()

# None: interpret when the default backend is not a GPU. Tests set False to lower for CUDA on CPU.
_FORCE_INTERPRET: bool | None = None


@contextlib.contextmanager
def force_interpret(value: bool | None):
    """Overrides the interpret-mode choice inside the block (False: always lower for Triton)."""
    global _FORCE_INTERPRET
    previous, _FORCE_INTERPRET = _FORCE_INTERPRET, value
    try:
        yield
    finally:
        _FORCE_INTERPRET = previous


def _use_interpret() -> bool:
    if _FORCE_INTERPRET is not None:
        return _FORCE_INTERPRET
    return jax.default_backend() != "gpu"


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: shapes, tiling, and how to compile one phase's kernels."""

    batch: int
    time: int
    heads: int
    dim_k: int
    dim_v: int
    block: int  # C of this phase
    chunk: int  # L (a power-of-two multiple of every phase's C)
    tile: int  # width of the split dim's tiles in this phase
    num_warps: int
    num_stages: int
    scale: float
    itemsize: int
    precise: bool  # fp32 inputs: true fp32 dots (Triton's default for fp32 is TF32)
    interpret: bool
    config: Config

    @property
    def dk_pad(self) -> int:
        return pl.next_power_of_2(self.dim_k)

    @property
    def dv_pad(self) -> int:
        return pl.next_power_of_2(self.dim_v)

    @property
    def num_chunks(self) -> int:
        return -(-self.time // self.chunk)

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk // self.block

    def num_tiles(self, dim: str) -> int:
        return (self.dk_pad if dim == "k" else self.dv_pad) // self.tile_of(dim)

    def tile_of(self, dim: str) -> int:
        return min(self.tile, self.dk_pad if dim == "k" else self.dv_pad)

    def compiler_params(self):
        return plt.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def row_bytes(self) -> int:
        return max(self.dk_pad, self.dv_pad) * self.itemsize

    def for_chunk_states(self) -> "_Plan":
        """The chunk-state kernel's own tiling (narrow rows only), its block halved until the
        pipelined operands fit in shared memory."""
        cfg = self.config
        if self.row_bytes >= 512:
            return self
        tile = min(cfg.state_tile, self.dv_pad)
        block = min(cfg.state_block, self.chunk)

        def smem(block):  # pipelined a and b blocks, and the scaled copy of b
            return (cfg.state_num_stages * (self.dk_pad + tile) + tile) * block * self.itemsize

        while block > 16 and smem(block) > _SMEM_BUDGET:
            block //= 2
        return dataclasses.replace(
            self, block=block, tile=tile, num_warps=cfg.state_num_warps, num_stages=cfg.state_num_stages
        )

    def for_backward(self) -> "_Plan":
        """The same chunks (R^(j) are shared with the forward) with the backward's tiling."""
        cfg = self.config
        wide = self.row_bytes >= 512
        block = cfg.bwd_block // (2 if wide and self.precise else 1)
        return dataclasses.replace(
            self,
            block=_block_size(block, self.row_bytes, self.time),
            tile=cfg.wide_tile if wide else cfg.bwd_tile,
            num_warps=cfg.wide_bwd_num_warps if wide else cfg.bwd_num_warps,
            num_stages=cfg.bwd_num_stages,
        )


def _block_size(block: int, row_bytes: int, time: int) -> int:
    """C: halved for rows of 1 KiB (shared memory); at least 16 (Triton dots), at most time's pow2."""
    block = block if row_bytes < 1024 else block // 2
    return max(16, min(block, pl.next_power_of_2(time)))


def _make_plan(q, v, *, scale, block_size, interpret, config) -> _Plan:
    batch, time, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    dk_pad, dv_pad = pl.next_power_of_2(dim_k), pl.next_power_of_2(dim_v)
    row_bytes = max(dk_pad, dv_pad) * q.dtype.itemsize
    wide = row_bytes >= 512
    block = max(16, min(block_size, pl.next_power_of_2(time))) if block_size else None
    block = block or _block_size(config.block, row_bytes, time)
    tile = min(config.wide_tile if wide else config.block_v, dv_pad)
    n_v = dv_pad // tile
    # One chunk per sequence when (value tiles, batch, heads) alone fill the GPU: no chunk-state
    # pass, no scans. Else the longest chunk up to `config.chunk` that gives `chunk_programs`.
    # Chunks are multiples of both phases' blocks (all powers of two).
    step = max(block, _block_size(config.bwd_block, row_bytes, time))
    whole = step * pl.next_power_of_2(-(-time // step))
    chunk = max(step, config.chunk)
    while chunk > 2 * step and n_v * batch * heads * -(-time // chunk) < config.chunk_programs:
        chunk //= 2
    chunk = whole if n_v * batch * heads >= config.min_programs else min(chunk, whole)
    return _Plan(
        batch=batch,
        time=time,
        heads=heads,
        dim_k=dim_k,
        dim_v=dim_v,
        block=block,
        chunk=chunk,
        tile=tile,
        num_warps=config.wide_num_warps if wide else config.num_warps,
        num_stages=config.num_stages,
        scale=float(scale),
        itemsize=q.dtype.itemsize,
        precise=q.dtype == jnp.float32,
        interpret=interpret,
        config=config,
    )


# ----------------------------------------------------------------------------------------------
# Pieces shared by the kernel bodies.


def _dot(a, b, plan: _Plan, *, trans_a=False, trans_b=False):
    """2-D matmul with an fp32 accumulator; operands as given (bf16/fp16 hit the tensor cores)."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if plan.precise else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=_F32)


def _scaled(x, factors, dtype):
    """diag(factors) x in `dtype`: a per-row decay folded into a matmul operand."""
    return (x.astype(_F32) * factors[:, None]).astype(dtype)


class _Tile:
    """Masked loads and stores of one program's tiles: [C, width] slices of [chunk, dim] token blocks
    and its part of [dk_pad, dv_pad] state blocks.

    `split` names the dim ("k" or "v") whose columns are tiled; the program owns tile `index` of it
    and sees the other dim whole. Every BlockSpec covers the whole (padded) width, so one kernel can
    host programs split along different dims (the fused backward). Rows past `time` (the ragged tail)
    and columns past the real dim read as zero and are never written. Masks are only built where the
    shape needs them, so full tiles load unmasked.
    """

    def __init__(self, plan: _Plan, chunk_index, split: str, index):
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

    def _state_view(self, ref):
        rows, cols = pl.ds(self.col0["k"], self.width["k"]), pl.ds(self.col0["v"], self.width["v"])
        return ref.at[rows, cols]

    def load_state(self, ref):
        """This program's part of a [dk_pad, dv_pad] state: rows (split "k") or columns ("v")."""
        return self._state_view(ref)[...].astype(_F32)

    def store_state(self, ref, value):
        self._state_view(ref)[...] = value

    def zero_state(self):
        return jnp.zeros((self.width["k"], self.width["v"]), _F32)


def _end_exponent(plan: _Plan, start, length: int):
    """clip(time - 1 - start, 0, length) as fp32: the decay exponent of a span starting at `start`."""
    return jnp.clip(plan.time - 1 - start, 0, length).astype(_F32)


class _Decays:
    """The decays of one program's blocks, all exp(-rate * delta) with delta >= 0 (never overflow).

    `scale` (the q scale) is folded into the factors that multiply q in every product (`intra`,
    `intra_t`, `from_start`), so q is never rescaled in registers; `block` stays unscaled.
    """

    def __init__(self, rate, plan: _Plan, chunk_index, scale: float = 1.0):
        self.rate, self.plan = rate, plan
        self.chunk_start = chunk_index * plan.chunk
        self.a = jnp.arange(plan.block).astype(_F32)
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
        end = _end_exponent(self.plan, self.chunk_start + t0, self.plan.block)
        return jnp.exp(-self.rate * end), jnp.exp(-self.rate * jnp.maximum(end - self.a, 0.0))


def _rate(rates_ref, plan: _Plan):
    return rates_ref[pl.program_id(2) % plan.heads]


# ----------------------------------------------------------------------------------------------
# Kernel bodies. Each runs one program: chunk j (program_id 1) of one batch x head (program_id 2),
# tile `index` of its split dim. Kernels read program ids at their top level only: interpret mode
# cannot see them inside loop bodies or conditionals.


def _chunk_state_kernel(rates_ref, a_ref, b_ref, out_ref, *, plan: _Plan, from_start: bool):
    """Value dim split. One chunk's own contribution to a state, from zero:

    forward  (a, b) = (k, v):  U_j = sum_t k_t^T lambda^(E_j - t) v_t, decays to the chunk's end;
    backward (a, b) = (q, dO): Y_j = sum_t (scale q_t)^T lambda^t dO_t, decays from its start (the
                               chunk's own term of dL/dR^(j), for the reverse scan).

    Program j computes chunk j forward (j < N - 1) and chunk j + 1 backward (j + 1 > 0).
    """
    rate = _rate(rates_ref, plan)
    j = pl.program_id(1) + (1 if from_start else 0)
    tile = _Tile(plan, j, "v", pl.program_id(0))
    end = _end_exponent(plan, j * plan.chunk, plan.chunk)
    rows = jnp.arange(plan.block).astype(_F32)
    scale = plan.scale if from_start else 1.0  # q's scale rides on dO's factors
    dt = a_ref.dtype

    def body(i, u):
        t0 = i * plan.block
        a = tile.load(a_ref, t0, "k")
        b = tile.load(b_ref, t0, "v")
        # Padded rows have b = 0; the max keeps their (unused) factor finite.
        delta = t0 + rows if from_start else jnp.maximum(end - (t0 + rows), 0.0)
        return u + _dot(a, _scaled(b, scale * jnp.exp(-rate * delta), dt), plan, trans_a=True)

    tile.store_state(out_ref, lax.fori_loop(0, plan.blocks_per_chunk, body, tile.zero_state()))


def _scan_kernel(rates_ref, x_ref, init_ref, out_ref, *, plan: _Plan, reverse: bool, group: int):
    """The recurrence over chunks, on a flat tile of the state. x has N - 1 rows: the one chunk
    term no state needs (U of the last chunk, Y of the first) is never computed.

    forward:  x[c] = U_c (c < N - 1);  out[0] = init, out[c + 1] = lambda^(E_c) out[c] + x[c]
              (out[j] = R^(j))
    reverse:  x[c] = Y_(c + 1);        out[N - 1] = init, out[c] = lambda^(E_(c+1)) out[c + 1] + x[c]
              (out[j] = dL/dR^(j+1))

    Both are "carry = lambda^E carry + x[c]; store carry" over c ascending (forward) or descending
    (reverse). The chain is short work on long latency, so G rows go per step, all loaded first:
    one memory round trip per G chunks, not per chunk (end to end within noise of the per-chunk loop
    so far; docs/kernel-notes.md). N is static: the rows left over after the whole steps are a step
    of their own, unrolled in Python.
    """
    rate = rates_ref[pl.program_id(1) % plan.heads]
    rows = plan.num_chunks - 1
    steps, rest = divmod(rows, group)
    shift = 1 if reverse else 0  # row c holds chunk c + shift's term, and its decay

    def run(c0, size: int, carry):  # rows c0 .. c0 + size - 1, in the sweep's order
        order = range(size - 1, -1, -1) if reverse else range(size)
        xs = [x_ref[c0 + i, :] for i in order]
        for i, x in zip(order, xs):
            c = c0 + i
            decay = jnp.exp(-rate * _end_exponent(plan, (c + shift) * plan.chunk, plan.chunk))
            carry = decay * carry + x
            out_ref[c + 1 - shift, :] = carry
        return carry

    def step(s, carry):
        return run((steps - 1 - s if reverse else s) * group, group, carry)

    carry = init_ref[...].astype(_F32)
    out_ref[rows if reverse else 0, :] = carry
    if reverse and rest:  # the top rows first
        carry = run(steps * group, rest, carry)
    carry = lax.fori_loop(0, steps, step, carry)
    if not reverse and rest:
        run(steps * group, rest, carry)


def _forward_kernel(rates_ref, q_ref, k_ref, v_ref, *rest, plan: _Plan, has_r0: bool):
    """Value dim split. Outputs of chunk j from its incoming state R^(j); the last chunk also writes
    the final state."""
    if has_r0:
        r0_ref, o_ref, final_ref = rest
    else:
        o_ref, final_ref = rest
    j = pl.program_id(1)
    tile = _Tile(plan, j, "v", pl.program_id(0))
    decays = _Decays(_rate(rates_ref, plan), plan, j, plan.scale)
    dt = q_ref.dtype

    def body(i, r):
        t0 = i * plan.block
        q = tile.load(q_ref, t0, "k")
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        scores = _dot(q, k, plan, trans_b=True) * decays.intra
        # diag(lambda^a) (Q R): the decay scales the product's rows, so q is only ever read raw.
        o = _dot(q, r.astype(dt), plan) * decays.from_start[:, None]
        o = o + _dot(scores.astype(dt), v, plan)
        tile.store(o_ref, t0, o, "v")
        # R_{i+1} = lambda^E R_i + K^T diag(lambda^(E - a)) V, E the block's end exponent.
        state_decay, row_decay = decays.block(t0)
        return state_decay * r + _dot(k, _scaled(v, row_decay, dt), plan, trans_a=True)

    r = tile.load_state(r0_ref) if has_r0 else tile.zero_state()
    r = lax.fori_loop(0, plan.blocks_per_chunk, body, r)

    @pl.when(j == plan.num_chunks - 1)
    def _():
        tile.store_state(final_ref, r)


# The backward's three program kinds and the dim each splits. dQ and dK are tiled along the key dim
# (rows of R and of G), dV along the value dim (columns of G).
_SPLIT = {"dq": "k", "dk": "k", "dv": "v"}


def _dq_program(plan: _Plan, tile: _Tile, decays: "_Decays", k_ref, v_ref, do_ref, r_ref, dq_ref):
    """dQ_i = P_i K_i + diag(lambda^a) dO_i R_i^T with P_i = (dO_i V_i^T) * D: a forward sweep over
    chunk j's blocks from rows of R^(j)."""
    dt = k_ref.dtype

    def body(i, r):
        t0 = i * plan.block
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        do = tile.load(do_ref, t0, "v")
        p = _dot(do, v, plan, trans_b=True) * decays.intra
        dq = _dot(do, r.astype(dt), plan, trans_b=True) * decays.from_start[:, None]
        dq = dq + _dot(p.astype(dt), k, plan)
        tile.store(dq_ref, t0, dq * plan.scale, "k")
        state_decay, row_decay = decays.block(t0)
        return state_decay * r + _dot(k, _scaled(v, row_decay, dt), plan, trans_a=True)

    r = tile.zero_state() if r_ref is None else tile.load_state(r_ref)
    lax.fori_loop(0, plan.blocks_per_chunk, body, r)


def _dk_program(plan: _Plan, tile: _Tile, decays: "_Decays", q_ref, v_ref, do_ref, g_ref, dk_ref):
    """Reverse sweep over chunk j's blocks from rows of G = dL/dR^(j+1):
    dK_i = P_i^T Q_i + diag(lambda^(E - a)) V_i G^T,  G <- lambda^E G + (diag(lambda^a) Q_i)^T dO_i."""
    dt = q_ref.dtype

    def body(i, g):
        t0 = (plan.blocks_per_chunk - 1 - i) * plan.block
        q = tile.load(q_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        do = tile.load(do_ref, t0, "v")
        p_t = _dot(v, do, plan, trans_b=True) * decays.intra_t  # P^T = (V dO^T) * D^T
        state_decay, row_decay = decays.block(t0)
        dk = _dot(v, g.astype(dt), plan, trans_b=True) * row_decay[:, None]
        dk = dk + _dot(p_t.astype(dt), q, plan)
        tile.store(dk_ref, t0, dk, "k")
        return state_decay * g + _dot(q, _scaled(do, decays.from_start, dt), plan, trans_a=True)

    lax.fori_loop(0, plan.blocks_per_chunk, body, tile.load_state(g_ref))


def _dv_program(plan: _Plan, tile: _Tile, decays: "_Decays", q_ref, k_ref, do_ref, g_ref, dv_ref):
    """Reverse sweep over chunk j's blocks from columns of G = dL/dR^(j+1):
    dV_i = A_i^T dO_i + diag(lambda^(E - a)) K_i G,  A_i = (Q_i K_i^T) * D.  Returns G at the chunk's
    start: dL/dR^(0) for chunk 0."""
    dt = q_ref.dtype

    def body(i, g):
        t0 = (plan.blocks_per_chunk - 1 - i) * plan.block
        q = tile.load(q_ref, t0, "k")
        k = tile.load(k_ref, t0, "k")
        do = tile.load(do_ref, t0, "v")
        scores_t = _dot(k, q, plan, trans_b=True) * decays.intra_t  # A^T = (K Q^T) * D^T
        state_decay, row_decay = decays.block(t0)
        dv = _dot(k, g.astype(dt), plan) * row_decay[:, None]
        dv = dv + _dot(scores_t.astype(dt), do, plan)
        tile.store(dv_ref, t0, dv, "v")
        return state_decay * g + _dot(q, _scaled(do, decays.from_start, dt), plan, trans_a=True)

    return lax.fori_loop(0, plan.blocks_per_chunk, body, tile.load_state(g_ref))


def _backward_kernel(rates_ref, q_ref, k_ref, v_ref, do_ref, *rest, plan: _Plan, kinds, has_r0: bool):
    """Programs of the given kinds side by side: program_id 0 runs over the tiles of each kind in
    turn (e.g. dQ key tiles, then dK key tiles, then dV value tiles), so the programs of one chunk
    run together and share its q, k, v, dO in L2. Registers are those of the hungriest kind, not
    their sum: the kinds are branches of one kernel, never live at once.

    Refs after do: R^(j) (if has_r0 and dq runs), G^(j) (if dk or dv runs), one output per kind,
    then dL/dR^(0) (if dv runs)."""
    rest = list(rest)
    r_ref = rest.pop(0) if has_r0 and "dq" in kinds else None
    g_ref = rest.pop(0) if {"dk", "dv"} & set(kinds) else None
    out = {kind: rest.pop(0) for kind in kinds}
    dr0_ref = rest.pop(0) if "dv" in kinds else None
    t, j = pl.program_id(0), pl.program_id(1)
    rate = _rate(rates_ref, plan)

    def run(kind, index):
        tile = _Tile(plan, j, _SPLIT[kind], index)
        # dQ is scaled once at its store; dK and dV take q's scale in their q-side factors.
        decays = _Decays(rate, plan, j, 1.0 if kind == "dq" else plan.scale)
        if kind == "dq":
            _dq_program(plan, tile, decays, k_ref, v_ref, do_ref, r_ref, out["dq"])
        elif kind == "dk":
            _dk_program(plan, tile, decays, q_ref, v_ref, do_ref, g_ref, out["dk"])
        else:
            g = _dv_program(plan, tile, decays, q_ref, k_ref, do_ref, g_ref, out["dv"])

            @pl.when(j == 0)
            def _():
                tile.store_state(dr0_ref, g)

    offset = 0
    for kind in kinds:
        n = plan.num_tiles(_SPLIT[kind])
        if len(kinds) == 1:
            run(kind, t)
        else:
            pl.when((t >= offset) & (t < offset + n))(functools.partial(run, kind, t - offset))
        offset += n


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays stay in [batch, time, heads, dim]; a BlockSpec is only a pointer,
# so blocks wider than the real dim (padding) cost nothing: loads past it are masked.


def _token_spec(plan: _Plan, dim: str, first_chunk: int = 0):
    """[batch, time, heads, dim] tokens of chunk first_chunk + j, the whole (padded) width."""
    heads = plan.heads
    width = plan.dk_pad if dim == "k" else plan.dv_pad
    return pl.BlockSpec(
        (None, plan.chunk, None, width), lambda t, j, bh: (bh // heads, first_chunk + j, bh % heads, 0)
    )


def _state_spec(plan: _Plan):
    """Per-chunk states [batch * heads, N, dk_pad, dv_pad]: chunk j's whole state."""
    return pl.BlockSpec((None, None, plan.dk_pad, plan.dv_pad), lambda t, j, bh: (bh, j, 0, 0))


def _single_state_spec(plan: _Plan):
    """One state per (batch, head): [batch * heads, dk_pad, dv_pad]."""
    return pl.BlockSpec((None, plan.dk_pad, plan.dv_pad), lambda t, j, bh: (bh, 0, 0))


_WHOLE = pl.BlockSpec()  # the whole array (the per-head rates)


def _call(kernel, plan: _Plan, tiles: int, in_specs, out_specs, out_shape, name: str, chunks=None):
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


def _states_shape(plan: _Plan, n: int | None):
    lead = (plan.batch * plan.heads,) + (() if n is None else (n,))
    return jax.ShapeDtypeStruct((*lead, plan.dk_pad, plan.dv_pad), _F32)


def _chunk_states(plan: _Plan, a, b, rates, *, from_start: bool = False):
    """U_j (j < N - 1) from (k, v), or Y_j (j > 0) from (q, dO) with from_start:
    [batch * heads, N - 1, dk_pad, dv_pad]. No state needs U of the last chunk or Y of the first, so
    they are never computed (a 1 / N share of the pass)."""
    plan = plan.for_chunk_states()
    first = 1 if from_start else 0
    kernel = functools.partial(_chunk_state_kernel, plan=plan, from_start=from_start)
    return _call(
        kernel,
        plan,
        plan.num_tiles("v"),
        [_WHOLE, _token_spec(plan, "k", first), _token_spec(plan, "v", first)],
        _state_spec(plan),
        _states_shape(plan, plan.num_chunks - 1),
        "lightning_backward_y" if from_start else "lightning_chunk_states",
        chunks=plan.num_chunks - 1,
    )(rates, a, b)


def _scan(plan: _Plan, x, init, rates, *, reverse: bool):
    """x: [batch * heads, N - 1, dk_pad, dv_pad] (see _scan_kernel); init: [batch * heads, dk_pad,
    dv_pad]. Returns [batch * heads, N, dk_pad, dv_pad]."""
    bh, n = x.shape[0], plan.num_chunks
    flat = plan.dk_pad * plan.dv_pad
    tile = min(plan.config.scan_tile, flat)
    kernel = functools.partial(_scan_kernel, plan=plan, reverse=reverse, group=plan.config.scan_group)
    out = pl.pallas_call(
        kernel,
        grid=(flat // tile, bh),
        in_specs=[
            _WHOLE,
            pl.BlockSpec((None, n - 1, tile), lambda f, b: (b, 0, f)),
            pl.BlockSpec((None, tile), lambda f, b: (b, f)),
        ],
        out_specs=pl.BlockSpec((None, n, tile), lambda f, b: (b, 0, f)),
        out_shape=jax.ShapeDtypeStruct((bh, n, flat), _F32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
        interpret=plan.interpret,
        name="lightning_chunk_scan_reverse" if reverse else "lightning_chunk_scan",
    )(rates, x.reshape(bh, n - 1, flat), init.reshape(bh, flat))
    return out.reshape(bh, n, plan.dk_pad, plan.dv_pad)


def _pad_state(plan: _Plan, state):
    """[batch, heads, dim_k, dim_v] -> [batch * heads, dk_pad, dv_pad] fp32, zero padded."""
    state = state.astype(_F32).reshape(plan.batch * plan.heads, plan.dim_k, plan.dim_v)
    return jnp.pad(state, ((0, 0), (0, plan.dk_pad - plan.dim_k), (0, plan.dv_pad - plan.dim_v)))


def _unpad_state(plan: _Plan, state):
    state = state[:, : plan.dim_k, : plan.dim_v]
    return state.reshape(plan.batch, plan.heads, plan.dim_k, plan.dim_v)


def _start_states(plan: _Plan, k, v, rates, s_in):
    """R^(j) for every chunk, [batch * heads, N, dk_pad, dv_pad]; None when all are zero."""
    if s_in is None and plan.num_chunks == 1:
        return None
    if s_in is None:
        r0 = jnp.zeros((plan.batch * plan.heads, plan.dk_pad, plan.dv_pad), _F32)
    else:  # R^(0) = lambda S_in: the state aged to the first token.
        first = jnp.tile(jnp.exp(-rates), plan.batch)[:, None, None]
        r0 = first * _pad_state(plan, s_in)
    if plan.num_chunks == 1:
        return r0[:, None]
    return _scan(plan, _chunk_states(plan, k, v, rates), r0, rates, reverse=False)


def _forward(plan: _Plan, q, k, v, rates, s_in):
    r = _start_states(plan, k, v, rates, s_in)
    has_r0 = r is not None
    kernel = functools.partial(_forward_kernel, plan=plan, has_r0=has_r0)
    o, final = _call(
        kernel,
        plan,
        plan.num_tiles("v"),
        [_WHOLE, *(_token_spec(plan, dim) for dim in "kkv")] + ([_state_spec(plan)] if has_r0 else []),
        [_token_spec(plan, "v"), _single_state_spec(plan)],
        [jax.ShapeDtypeStruct(v.shape, q.dtype), _states_shape(plan, None)],
        "lightning_forward",
    )(rates, q, k, v, *([r] if has_r0 else []))
    return o, _unpad_state(plan, final), r


def _backward_call(plan: _Plan, kinds, q, k, v, rates, r, d_o, g):
    """One launch running `kinds` (a tuple of "dq", "dk", "dv"); returns their outputs by kind, and
    dL/dR^(0) as "dr0" when dv runs."""
    has_r0 = r is not None
    with_g = bool({"dk", "dv"} & set(kinds))
    operands = [rates, q, k, v, d_o] + ([r] if has_r0 and "dq" in kinds else []) + ([g] if with_g else [])
    in_specs = [_WHOLE, *(_token_spec(plan, dim) for dim in "kkvv")]
    in_specs += [_state_spec(plan)] * (len(operands) - len(in_specs))
    like = {"dq": q, "dk": k, "dv": v}
    out_specs = [_token_spec(plan, _SPLIT[kind]) for kind in kinds]
    out_shape = [jax.ShapeDtypeStruct(like[kind].shape, like[kind].dtype) for kind in kinds]
    if "dv" in kinds:
        out_specs.append(_single_state_spec(plan))
        out_shape.append(_states_shape(plan, None))
    kernel = functools.partial(_backward_kernel, plan=plan, kinds=kinds, has_r0=has_r0)
    name = "lightning_backward" if len(kinds) > 1 else f"lightning_backward_{kinds[0]}"
    tiles = sum(plan.num_tiles(_SPLIT[kind]) for kind in kinds)
    outs = _call(kernel, plan, tiles, in_specs, out_specs, out_shape, name)(*operands)
    return dict(zip([*kinds, "dr0"], outs))


def _backward(plan: _Plan, q, k, v, rates, r, d_o, d_final):
    g = _pad_state(plan, d_final)[:, None]  # G^(N-1) = dL/dS_final
    if plan.num_chunks > 1:
        y = _chunk_states(plan, q, d_o, rates, from_start=True)
        g = _scan(plan, y, g[:, 0], rates, reverse=True)
    groups = (("dq", "dk", "dv"),) if plan.config.fuse_backward else (("dq",), ("dk",), ("dv",))
    grads = {}
    for kinds in groups:
        grads.update(_backward_call(plan, kinds, q, k, v, rates, r, d_o, g))
    first = jnp.tile(jnp.exp(-rates), plan.batch)[:, None, None]
    d_s_in = _unpad_state(plan, first * grads["dr0"])
    return grads["dq"], grads["dk"], grads["dv"], d_s_in


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, q, k, v, rates, s_in):
    o, final, _ = _forward(plan, q, k, v, rates, s_in)
    return o, final


def _attention_fwd(plan: _Plan, q, k, v, rates, s_in):
    o, final, r = _forward(plan, q, k, v, rates, s_in)
    # Residuals: the inputs and one fp32 state per chunk (R^(j)); nothing per token.
    return (o, final), (q, k, v, rates, r, s_in)


def _attention_bwd(plan: _Plan, residuals, cotangents):
    q, k, v, rates, r, s_in = residuals
    d_o, d_final = cotangents
    dq, dk, dv, d_s_in = _backward(plan.for_backward(), q, k, v, rates, r, d_o.astype(q.dtype), d_final)
    # The API refuses to differentiate rates (api._no_rate_gradient), so zero is never used wrongly.
    return dq, dk, dv, jnp.zeros_like(rates), None if s_in is None else d_s_in


_attention.defvjp(_attention_fwd, _attention_bwd)


def lightning_attention_pallas(
    q,
    k,
    v,
    rates,
    initial_state,
    *,
    scale: float = 1.0,
    block_size: int | None = None,
    config: Config | None = None,
):
    """Pallas (Triton) implementation. Shapes as in `lightning_jax.attention.api`.

    Returns (o [batch, time, heads, dim_v] in q's dtype, final_state fp32 [batch, heads, dk, dv]).
    `block_size` overrides `config.block` (the intra-block size C of the forward kernels).
    """
    plan = _make_plan(
        q,
        v,
        scale=scale,
        block_size=block_size,
        interpret=_use_interpret(),
        config=config or DEFAULT_CONFIG,
    )
    rates = rates.astype(_F32)
    if initial_state is not None:
        initial_state = initial_state.astype(_F32)
    return _attention(plan, q, k, v, rates, initial_state)
