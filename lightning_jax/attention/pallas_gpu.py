"""Lightning attention as Pallas kernels for the Triton backend (NVIDIA GPUs), forward and backward.

The math is convention A of docs (lightning-math.md) with the "end exponent" of `xla.py`, organised
for parallelism at every shape. Time is cut into chunks of L tokens (many blocks of C tokens each),
and every kernel runs one program per (value tile, chunk, batch x head), so even batch 1, heads 16,
time 65,536 gives hundreds of programs:

  forward   1. `_chunk_state_kernel`  U_j = sum_a lambda^(E_j - a) k_a^T v_a, chunk j alone   (if N > 1)
            2. `_scan_kernel`         R^(j+1) = lambda^(E_j) R^(j) + U_j, a short scan over chunks
            3. `_forward_kernel`      per chunk, from R^(j): blocks of C tokens in order,
                                      O_i = ((Q_i K_i^T) * D) V_i + diag(lambda^a) Q_i R_i
  backward  1. `_dq_kernel`           per chunk, forward sweep from the saved R^(j): dQ, and
                                      Y_j = sum_a lambda^a q_a^T dO_a (chunk j alone)       (if N > 1)
            2. `_scan_kernel`         reversed: G^(j-1) = lambda^(E_j) G^(j) + Y_j, G^(N-1) = dL/dS_final
            3. `_dkdv_kernel`         per chunk, reverse sweep from G^(j): dK, dV, and dL/dR^(0)

E is the clipped end exponent: block g (global start gC) decays the state by lambda^E_g with
E_g = clip(time - 1 - gC, 0, C), i.e. C for full blocks, m - 1 for the ragged last block (m its real
length) and 0 for the padding blocks after it. With it the state after the last block is exactly the
final state (no division by lambda), padding blocks pass states through unchanged, and a chunk's E is
the sum of its blocks' E: clip(time - 1 - jL, 0, L). Every decay is exp(-rate * delta) with
delta >= 0, built in fp32 from the rate inside the kernels; nothing per token is stored besides
q, k, v and the outputs; the only residual beyond the inputs is R^(j), one fp32 state per chunk.

dim_k and dim_v are padded to powers of two inside the kernels (masked loads and stores, no padded
copies in HBM). The value dim may be split into tiles (`Config.block_v`), which bounds the fp32
state each program carries in registers (dim_k x block_v): o and dV tiles are exact, while dQ and dK
sum over value tiles and come out as fp32 partials that XLA adds up.

Without a GPU the same kernels run in Pallas interpret mode (slow, for tests).
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


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning knobs (static). Defaults from benchmarks/sweep_pallas.py on an H200, bf16."""

    block: int = 64  # C: tokens per intra-block quadratic (the tensor-core tile along time)
    chunk: int = 1024  # L: most tokens per program; shrunk until there are `min_programs`
    min_programs: int = 528  # 4 programs per SM on a 132-SM H100/H200
    scan_tile: int = 1024  # state elements per program of the scan over chunks
    # Forward kernels: a 64-wide value tile with 4 warps beat 128 wide and/or 8 warps at dim 128
    # (0.52 vs 0.65-1.05 ms at 64 x 1024 x 16 x 128).
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Backward kernels carry more (G, two accumulators, two C x C matrices): 8 warps, whole
    # 128-wide value dim (3.0 vs 3.4 ms forward+backward with 4 warps / 64 wide).
    bwd_block_v: int = 128
    bwd_num_warps: int = 8
    bwd_num_stages: int = 2
    # Wide rows (dim_k x itemsize >= 512 bytes: bf16 dim 256, fp32 dim 128) exceed the 227 KiB
    # of shared memory with the tiles above: 64-wide value tiles and 8 warps, and half the
    # block for rows of 1 KiB (fp32 dim 256).
    wide_block_v: int = 64
    wide_num_warps: int = 8


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
    """Everything static about one call: shapes, tiling, and how to compile."""

    batch: int
    time: int
    heads: int
    dim_k: int
    dim_v: int
    block: int  # C
    chunk: int  # L (a power-of-two multiple of C)
    block_v: int
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
    def num_v_tiles(self) -> int:
        return self.dv_pad // self.block_v

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk // self.block

    @property
    def grid(self) -> tuple[int, int, int]:
        # Value tiles fastest: programs sharing a chunk's q and k run together and share L2.
        return (self.num_v_tiles, self.num_chunks, self.batch * self.heads)

    def compiler_params(self):
        return plt.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    def for_backward(self) -> "_Plan":
        """The same chunks (R^(j) are shared with the forward) with the backward's tiling."""
        cfg = self.config
        if self.wide:
            return self
        block_v = min(cfg.bwd_block_v, self.dv_pad)
        return dataclasses.replace(
            self, block_v=block_v, num_warps=cfg.bwd_num_warps, num_stages=cfg.bwd_num_stages
        )

    @property
    def wide(self) -> bool:
        return self.dk_pad * self.itemsize >= 512


def _make_plan(q, v, *, scale, block_size, interpret, config) -> _Plan:
    batch, time, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    dk_pad, dv_pad = pl.next_power_of_2(dim_k), pl.next_power_of_2(dim_v)
    row_bytes = dk_pad * q.dtype.itemsize
    wide = row_bytes >= 512
    # Triton dots need every dimension >= 16; a short sequence gets a short block.
    block = block_size or (config.block if row_bytes < 1024 else config.block // 2)
    block = max(16, min(block, pl.next_power_of_2(time)))
    block_v = min(config.wide_block_v if wide else config.block_v, dv_pad)
    n_v = dv_pad // block_v
    # Longest chunk (fewest per-chunk states) that still gives enough programs to fill the GPU.
    chunk = max(block, config.chunk)
    while chunk > 2 * block and n_v * batch * heads * -(-time // chunk) < config.min_programs:
        chunk //= 2
    chunk = min(chunk, block * pl.next_power_of_2(-(-time // block)))
    return _Plan(
        batch=batch,
        time=time,
        heads=heads,
        dim_k=dim_k,
        dim_v=dim_v,
        block=block,
        chunk=chunk,
        block_v=block_v,
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


class _Tile:
    """Masked loads and stores of [C, dim] tiles of a [chunk, dim_pad] block ref.

    Rows past `time` (the ragged tail) and columns past the real dim read as zero and are never
    written. Masks are only built where the shape needs them, so full tiles load unmasked.
    """

    def __init__(self, plan: _Plan, chunk_index):
        self.plan = plan
        self.chunk_start = chunk_index * plan.chunk
        self.ragged = plan.time % plan.chunk != 0
        # Read outside the block loops: interpret mode cannot see program_id inside a loop body.
        self.col0 = _col0(plan)

    def _mask(self, t0, width: int, real_width, col0):
        rows = self.chunk_start + t0 + jnp.arange(self.plan.block)
        mask = None
        if self.ragged:
            mask = (rows < self.plan.time)[:, None]
        if real_width is not None:
            cols = (col0 + jnp.arange(width) < real_width)[None, :]
            mask = cols if mask is None else mask & cols
        if mask is not None:
            mask = jnp.broadcast_to(mask, (self.plan.block, width))
        return mask

    def _dim_mask(self, t0, dim: str):
        """dim "k": a [C, dk_pad] tile; "v": a [C, block_v] tile of value tile program_id(0)."""
        plan = self.plan
        if dim == "k":
            real = plan.dim_k if plan.dim_k != plan.dk_pad else None
            return self._mask(t0, plan.dk_pad, real, 0)
        real = plan.dim_v if plan.dim_v != plan.dv_pad else None
        return self._mask(t0, plan.block_v, real, self.col0)

    def load(self, ref, t0, dim: str):
        mask = self._dim_mask(t0, dim)
        view = ref.at[pl.ds(t0, self.plan.block), :]
        if mask is None:
            return view[...]
        return plt.load(view, mask=mask, other=0.0)

    def store(self, ref, t0, value, dim: str):
        mask = self._dim_mask(t0, dim)
        view = ref.at[pl.ds(t0, self.plan.block), :]
        value = value.astype(ref.dtype)
        if mask is None:
            view[...] = value
        else:
            plt.store(view, value, mask=mask)


def _end_exponent(plan: _Plan, start, length: int):
    """clip(time - 1 - start, 0, length) as fp32: the decay exponent of a span starting at `start`."""
    return jnp.clip(plan.time - 1 - start, 0, length).astype(_F32)


def _decays(rate, plan: _Plan):
    """Per-block decays: intra mask D[a, b] = lambda^(a - b) (a >= b, else 0) and lambda^a."""
    a = jnp.arange(plan.block).astype(_F32)
    lag = a[:, None] - a[None, :]
    # Mask the exponent, not the result: exp(+large) above the diagonal would overflow.
    intra = jnp.exp(jnp.where(lag >= 0, -rate * lag, -jnp.inf))
    return a, intra, jnp.exp(-rate * a)


def _col0(plan: _Plan):
    return pl.program_id(0) * plan.block_v


def _rate(rates_ref, plan: _Plan):
    return rates_ref[pl.program_id(2) % plan.heads]


# ----------------------------------------------------------------------------------------------
# Forward kernels.


def _chunk_state_kernel(rates_ref, k_ref, v_ref, u_ref, *, plan: _Plan):
    """U_j = sum_a lambda^(E_j - a) k_a^T v_a over chunk j: the chunk's own contribution to the state
    after it. Decays are taken from the chunk's end directly, so no per-block rescaling is needed."""
    rate = _rate(rates_ref, plan)
    j = pl.program_id(1)
    tile = _Tile(plan, j)
    end = _end_exponent(plan, j * plan.chunk, plan.chunk)
    a = jnp.arange(plan.block).astype(_F32)
    dt = k_ref.dtype

    def body(i, u):
        t0 = i * plan.block
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        # Padded rows have k = 0; the max keeps their (unused) factor finite.
        k_decay = jnp.exp(-rate * jnp.maximum(end - (t0 + a), 0.0))
        return u + _dot((k * k_decay[:, None]).astype(dt), v, plan, trans_a=True)

    u = jnp.zeros((plan.dk_pad, plan.block_v), _F32)
    u_ref[...] = lax.fori_loop(0, plan.blocks_per_chunk, body, u)


def _scan_kernel(rates_ref, x_ref, init_ref, out_ref, *, plan: _Plan, reverse: bool):
    """The recurrence over chunks, on a flat tile of the state.

    forward:  out[0] = init,   out[j] = lambda^(E_(j-1)) out[j-1] + x[j-1]   (out[j] = R^(j))
    reverse:  out[N-1] = init, out[j] = lambda^(E_(j+1)) out[j+1] + x[j+1]   (out[j] = dL/dR^(j+1))
    """
    rate = rates_ref[pl.program_id(1) % plan.heads]
    n = plan.num_chunks
    carry = init_ref[...].astype(_F32)
    first = n - 1 if reverse else 0
    out_ref[first, :] = carry

    def body(step, carry):
        src = n - 1 - step if reverse else step  # the chunk folded in now
        dst = src - 1 if reverse else src + 1
        decay = jnp.exp(-rate * _end_exponent(plan, src * plan.chunk, plan.chunk))
        carry = decay * carry + x_ref[src, :]
        out_ref[dst, :] = carry
        return carry

    lax.fori_loop(0, n - 1, body, carry)


def _forward_kernel(rates_ref, q_ref, k_ref, v_ref, *rest, plan: _Plan, has_r0: bool):
    """Outputs of chunk j from its incoming state R^(j); the last chunk also writes the final state."""
    if has_r0:
        r0_ref, o_ref, final_ref = rest
    else:
        o_ref, final_ref = rest
    rate = _rate(rates_ref, plan)
    j = pl.program_id(1)
    tile = _Tile(plan, j)
    a, intra, q_decay = _decays(rate, plan)
    dt = q_ref.dtype

    def body(i, r):
        t0 = i * plan.block
        q = tile.load(q_ref, t0, "k")
        if plan.scale != 1.0:
            q = (q * plan.scale).astype(dt)
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        scores = _dot(q, k, plan, trans_b=True) * intra
        o = _dot(scores.astype(dt), v, plan) + q_decay[:, None] * _dot(q, r.astype(dt), plan)
        tile.store(o_ref, t0, o, "v")
        # R_{i+1} = lambda^E R_i + (diag(lambda^(E - a)) K)^T V, E the block's end exponent.
        end = _end_exponent(plan, j * plan.chunk + t0, plan.block)
        k_decay = jnp.exp(-rate * jnp.maximum(end - a, 0.0))
        kv = _dot((k * k_decay[:, None]).astype(dt), v, plan, trans_a=True)
        return jnp.exp(-rate * end) * r + kv

    r = r0_ref[...] if has_r0 else jnp.zeros((plan.dk_pad, plan.block_v), _F32)
    r = lax.fori_loop(0, plan.blocks_per_chunk, body, r)

    @pl.when(j == plan.num_chunks - 1)
    def _():
        final_ref[...] = r


# ----------------------------------------------------------------------------------------------
# Backward kernels.


def _dq_kernel(rates_ref, q_ref, k_ref, v_ref, do_ref, *rest, plan: _Plan, has_r0: bool, with_y: bool):
    """dQ_i = P_i K_i + diag(lambda^a) dO_i R_i^T with P_i = (dO_i V_i^T) * D, sweeping forward from
    R^(j); also Y_j = sum_a lambda^a q_a^T dO_a, chunk j's own term of dL/dR^(j) (for the scan)."""
    rest = list(rest)
    r0_ref = rest.pop(0) if has_r0 else None
    dq_ref = rest.pop(0)
    y_ref = rest.pop(0) if with_y else None
    rate = _rate(rates_ref, plan)
    j = pl.program_id(1)
    tile = _Tile(plan, j)
    a, intra, q_decay = _decays(rate, plan)
    dt = q_ref.dtype

    def body(i, carry):
        r, y = carry
        t0 = i * plan.block
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        do = tile.load(do_ref, t0, "v")
        p = _dot(do, v, plan, trans_b=True) * intra
        dq = _dot(p.astype(dt), k, plan) + q_decay[:, None] * _dot(do, r.astype(dt), plan, trans_b=True)
        tile.store(dq_ref, t0, dq * plan.scale, "k")
        end = _end_exponent(plan, j * plan.chunk + t0, plan.block)
        k_decay = jnp.exp(-rate * jnp.maximum(end - a, 0.0))
        r = jnp.exp(-rate * end) * r + _dot((k * k_decay[:, None]).astype(dt), v, plan, trans_a=True)
        if with_y:
            q = tile.load(q_ref, t0, "k")
            qd = q.astype(_F32) * (plan.scale * jnp.exp(-rate * (t0 + a)))[:, None]
            y = y + _dot(qd.astype(dt), do, plan, trans_a=True)
        return r, y

    r = r0_ref[...] if has_r0 else jnp.zeros((plan.dk_pad, plan.block_v), _F32)
    y = jnp.zeros((plan.dk_pad, plan.block_v), _F32)
    _, y = lax.fori_loop(0, plan.blocks_per_chunk, body, (r, y))
    if with_y:
        y_ref[...] = y


def _dkdv_kernel(rates_ref, q_ref, k_ref, v_ref, do_ref, g_ref, dk_ref, dv_ref, dr0_ref, *, plan: _Plan):
    """Reverse sweep over chunk j's blocks from G = dL/dR^(j+1):
    dK_i = P_i^T Q_i + diag(lambda^(E - a)) V_i G^T,  dV_i = A_i^T dO_i + diag(lambda^(E - a)) K_i G,
    G <- lambda^E G + (diag(lambda^a) Q_i)^T dO_i;  chunk 0 ends with dL/dR^(0)."""
    rate = _rate(rates_ref, plan)
    j = pl.program_id(1)
    tile = _Tile(plan, j)
    a, intra, q_decay = _decays(rate, plan)
    dt = q_ref.dtype

    def body(i, g):
        t0 = (plan.blocks_per_chunk - 1 - i) * plan.block
        q = tile.load(q_ref, t0, "k")
        if plan.scale != 1.0:
            q = (q * plan.scale).astype(dt)
        k = tile.load(k_ref, t0, "k")
        v = tile.load(v_ref, t0, "v")
        do = tile.load(do_ref, t0, "v")
        scores = _dot(q, k, plan, trans_b=True) * intra  # A
        p = _dot(do, v, plan, trans_b=True) * intra  # P
        end = _end_exponent(plan, j * plan.chunk + t0, plan.block)
        k_decay = jnp.exp(-rate * jnp.maximum(end - a, 0.0))[:, None]
        gd = g.astype(dt)
        dv = _dot(scores.astype(dt), do, plan, trans_a=True) + k_decay * _dot(k, gd, plan)
        dk = _dot(p.astype(dt), q, plan, trans_a=True) + k_decay * _dot(v, gd, plan, trans_b=True)
        tile.store(dv_ref, t0, dv, "v")
        tile.store(dk_ref, t0, dk, "k")
        qd = (q.astype(_F32) * q_decay[:, None]).astype(dt)
        return jnp.exp(-rate * end) * g + _dot(qd, do, plan, trans_a=True)

    g = lax.fori_loop(0, plan.blocks_per_chunk, body, g_ref[...])

    @pl.when(j == 0)
    def _():
        dr0_ref[...] = g


# ----------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays stay in [batch, time, heads, dim]; a BlockSpec is only a pointer,
# so blocks wider than the real dim (padding) cost nothing: loads past it are masked.


def _token_spec(plan: _Plan, width: int, value_tiled: bool):
    heads = plan.heads
    if value_tiled:
        return pl.BlockSpec(
            (None, plan.chunk, None, plan.block_v),
            lambda vt, j, bh: (bh // heads, j, bh % heads, vt),
        )
    return pl.BlockSpec(
        (None, plan.chunk, None, width), lambda vt, j, bh: (bh // heads, j, bh % heads, 0)
    )


def _partial_spec(plan: _Plan, width: int):
    """dQ / dK partials: [value tiles, batch, time, heads, dim_k], one slab per value tile."""
    heads = plan.heads
    return pl.BlockSpec(
        (None, None, plan.chunk, None, width),
        lambda vt, j, bh: (vt, bh // heads, j, bh % heads, 0),
    )


def _state_spec(plan: _Plan, chunk_offset: int = 0):
    """Per-chunk states [batch * heads, N, dk_pad, dv_pad]: chunk j (+ offset), value tile vt."""
    return pl.BlockSpec(
        (None, None, plan.dk_pad, plan.block_v),
        lambda vt, j, bh: (bh, j + chunk_offset, 0, vt),
    )


def _single_state_spec(plan: _Plan):
    """One state per (batch, head): [batch * heads, dk_pad, dv_pad]."""
    return pl.BlockSpec((None, plan.dk_pad, plan.block_v), lambda vt, j, bh: (bh, 0, vt))


_WHOLE = pl.BlockSpec()  # the whole array (the per-head rates)


def _call(kernel, plan: _Plan, in_specs, out_specs, out_shape, name: str):
    return pl.pallas_call(
        kernel,
        grid=plan.grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plan.compiler_params(),
        interpret=plan.interpret,
        name=name,
    )


def _states_shape(plan: _Plan, n: int):
    return jax.ShapeDtypeStruct((plan.batch * plan.heads, n, plan.dk_pad, plan.dv_pad), _F32)


def _chunk_states(plan: _Plan, k, v, rates):
    kernel = functools.partial(_chunk_state_kernel, plan=plan)
    return _call(
        kernel,
        plan,
        [_WHOLE, _token_spec(plan, plan.dk_pad, False), _token_spec(plan, plan.dv_pad, True)],
        _state_spec(plan),
        _states_shape(plan, plan.num_chunks),
        "lightning_chunk_states",
    )(rates, k, v)


def _scan(plan: _Plan, x, init, rates, *, reverse: bool):
    """x: [batch * heads, N, dk_pad, dv_pad]; init: [batch * heads, dk_pad, dv_pad]."""
    bh, n = x.shape[:2]
    flat = plan.dk_pad * plan.dv_pad
    tile = min(plan.config.scan_tile, flat)
    kernel = functools.partial(_scan_kernel, plan=plan, reverse=reverse)
    out = pl.pallas_call(
        kernel,
        grid=(flat // tile, bh),
        in_specs=[
            _WHOLE,
            pl.BlockSpec((None, n, tile), lambda f, b: (b, 0, f)),
            pl.BlockSpec((None, tile), lambda f, b: (b, f)),
        ],
        out_specs=pl.BlockSpec((None, n, tile), lambda f, b: (b, 0, f)),
        out_shape=jax.ShapeDtypeStruct((bh, n, flat), _F32),
        compiler_params=plt.CompilerParams(num_warps=4, num_stages=3),
        interpret=plan.interpret,
        name="lightning_chunk_scan_reverse" if reverse else "lightning_chunk_scan",
    )(rates, x.reshape(bh, n, flat), init.reshape(bh, flat))
    return out.reshape(x.shape)


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
    in_specs = [
        _WHOLE,
        _token_spec(plan, plan.dk_pad, False),
        _token_spec(plan, plan.dk_pad, False),
        _token_spec(plan, plan.dv_pad, True),
    ] + ([_state_spec(plan)] if has_r0 else [])
    o, final = _call(
        kernel,
        plan,
        in_specs,
        [_token_spec(plan, plan.dv_pad, True), _single_state_spec(plan)],
        [
            jax.ShapeDtypeStruct(v.shape, q.dtype),
            jax.ShapeDtypeStruct((plan.batch * plan.heads, plan.dk_pad, plan.dv_pad), _F32),
        ],
        "lightning_forward",
    )(rates, q, k, v, *([r] if has_r0 else []))
    return o, _unpad_state(plan, final), r


def _backward(plan: _Plan, q, k, v, rates, r, d_o, d_final):
    has_r0 = r is not None
    with_y = plan.num_chunks > 1
    n_v = plan.num_v_tiles
    # With one value tile dQ and dK are complete and go out in the input dtype; else fp32 partials.
    partial_dtype = q.dtype if n_v == 1 else _F32
    partial_shape = jax.ShapeDtypeStruct((n_v, *q.shape), partial_dtype)
    tokens = [
        _token_spec(plan, plan.dk_pad, False),
        _token_spec(plan, plan.dk_pad, False),
        _token_spec(plan, plan.dv_pad, True),
        _token_spec(plan, plan.dv_pad, True),
    ]

    kernel = functools.partial(_dq_kernel, plan=plan, has_r0=has_r0, with_y=with_y)
    outs = _call(
        kernel,
        plan,
        [_WHOLE, *tokens] + ([_state_spec(plan)] if has_r0 else []),
        [_partial_spec(plan, plan.dk_pad)] + ([_state_spec(plan)] if with_y else []),
        [partial_shape] + ([_states_shape(plan, plan.num_chunks)] if with_y else []),
        "lightning_backward_dq",
    )(rates, q, k, v, d_o, *([r] if has_r0 else []))
    dq_parts = outs[0]

    g_last = _pad_state(plan, d_final)
    if with_y:
        g = _scan(plan, outs[1], g_last, rates, reverse=True)
    else:
        g = g_last[:, None]

    kernel = functools.partial(_dkdv_kernel, plan=plan)
    dk_parts, dv, dr0 = _call(
        kernel,
        plan,
        [_WHOLE, *tokens, _state_spec(plan)],
        [_partial_spec(plan, plan.dk_pad), _token_spec(plan, plan.dv_pad, True), _single_state_spec(plan)],
        [
            partial_shape,
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((plan.batch * plan.heads, plan.dk_pad, plan.dv_pad), _F32),
        ],
        "lightning_backward_dkdv",
    )(rates, q, k, v, d_o, g)
    dq = dq_parts[0] if n_v == 1 else dq_parts.sum(0).astype(q.dtype)
    dk = dk_parts[0] if n_v == 1 else dk_parts.sum(0).astype(k.dtype)
    first = jnp.tile(jnp.exp(-rates), plan.batch)[:, None, None]
    d_s_in = _unpad_state(plan, first * dr0)
    return dq, dk, dv, d_s_in


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
    `block_size` overrides `config.block` (the intra-block size C).
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
