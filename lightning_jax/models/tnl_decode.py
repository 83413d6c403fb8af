"""One TNL layer's decoding step in four fused Pallas-Triton kernels and one XLA product (small
batches, on a GPU).

At batch 1 a decoding step reads every weight once and does almost no arithmetic: TNL-385M's 0.8
GB of bf16 weights take 0.17 ms at an H200's 4.8 TB/s, yet XLA's step took 0.56 ms, because it
runs about 12 kernels per layer (two per norm, two for the state update, two for the output norm
and gate, four projections) and each costs a launch and a ramp. Here a layer runs in five, the
norms, the gate and the recurrence fused into the projections around them:

    1. mixer_in    p = W_qkvu SRMSNorm(x)                         [b, P * heads * head_dim]
    2. recurrence  q, k = act(q), act(k) (+ LRPE); S = lambda S + k^T v; o = q S   (S in place)
    3. mixer_out   x = x + W_out (u * SRMSNorm(o))
    4. glu_in      h = (W_1 SRMSNorm(x)) * (W_2 SRMSNorm(x))
    5.             x = x + W_3 h                    (XLA: nothing left to fuse, and its product is faster)

A projection kernel splits the weight's output rows over programs (`block_n` rows each) and
reads its input axis in `block_k` slices; every program recomputes the norm of its input vector
(one row of the residual stream: a few KB) instead of waiting for another kernel. The weights
must hold their input axes last (`layers.inputs_last`, the decoding layout), so each program reads
contiguous rows. Every value is rounded to the compute dtype where the XLA path
(`TNLBlock.decode`) rounds it, so both compute the same function up to the order of summation.

`covers` says whether a call can run here; `TNLConfig.decode_implementation` chooses (None: these
kernels on a GPU where they cover the call, XLA otherwise).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from lightning_jax.models import layers
from lightning_jax.models.sharding import _current_mesh

F32 = jnp.float32
MAX_BATCH = 2  # at batch 4 XLA's step was faster on an H200 (docs/benchmarks.md)


@dataclasses.dataclass(frozen=True)
class DecodeTiles:
    """Tile sizes of the fused decoding kernels (powers of two).

    block_n: weight rows (outputs) per program of a projection; block_k: the width of its input
    slices (unrolled, not looped); value_tile: the state's value columns per program of the
    recurrence. The defaults were chosen by a sweep of the decoding step on an H200 at batch 1."""

    block_n: int = 4
    block_k: int = 512
    num_warps: int = 8
    value_tile: int = 32
    recurrence_warps: int = 4


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _largest_tile(size: int, limit: int) -> int:
    """The largest power of two <= limit that divides size."""
    tile = 1
    while tile * 2 <= limit and size % (tile * 2) == 0:
        tile *= 2
    return tile


def interpreted() -> bool:
    """Whether the kernels run in Pallas interpret mode: when the default backend is not a GPU."""
    return jax.default_backend() != "gpu"


def covers(block, batch: int) -> str | None:
    """None if the fused kernels can run `block`'s decoding step at `batch`, else why not."""
    c = block.config
    if batch > MAX_BATCH:
        return f"batch {batch} > {MAX_BATCH} (XLA's matrix products serve larger batches)"
    weights = (block.mixer.qkvu, block.mixer.out, block.glu.w12, block.glu.w3)
    if not all(w.get_metadata().get("inputs_last") for w in weights):
        return "the projection weights are in the training layout (decode from generation.decoding_model(model))"
    if not _is_power_of_two(c.head_dim):
        return f"head_dim {c.head_dim} is not a power of two"
    mesh = _current_mesh()
    if mesh is not None and mesh.size > 1:
        return f"a mesh of {mesh.size} devices is set (the kernels run on one device's whole weights)"
    return None


def block_decode(block, x, rates, positions, state, *, tiles: DecodeTiles = DecodeTiles(),
                 interpret: bool = False):
    """`TNLBlock.decode` in five kernels: four of ours, then XLA's product with W_3.

    Args:
      block: a TNLBlock whose projection weights hold their input axes last (`covers`).
      x: [batch, 1, D] the residual stream; rates: [heads]; positions: [batch, 1] int;
      state: float32 [batch, heads, dim_k, head_dim] (dim_k = 2 head_dim with LRPE).
    Returns:
      (x [batch, 1, D], the new state).
    """
    c = block.config
    mixer, glu = block.mixer, block.glu
    dtype = jnp.dtype(c.dtype)
    batch, _, hidden = x.shape
    heads, head_dim, width = c.num_heads, c.head_dim, c.attention_dim
    w_qkvu = mixer.qkvu[...]  # [P, heads, head_dim, D]
    projections = w_qkvu.shape[0]
    run = functools.partial(_project, eps=c.norm_eps, dtype=dtype, tiles=tiles, interpret=interpret)
    xs = x[:, 0]

    p = run(xs, w_qkvu.reshape(projections * width, hidden), norm=True, name="tnl_decode_mixer_in")
    theta = None if mixer.lrpe is None else mixer.lrpe.theta[...].astype(F32)
    activation = layers.ACTIVATIONS[c.attention_activation]
    o, state = _recurrence(p.reshape(batch, projections, heads, head_dim), rates, positions[:, 0], state, theta,
                           activation=activation, dtype=dtype, tiles=tiles, interpret=interpret)
    gate = p.reshape(batch, projections, width) if projections == 4 else None
    xs = run(o.reshape(batch, width), mixer.out[...].reshape(hidden, width), norm=True, gate=gate, residual=xs,
             name="tnl_decode_mixer_out")
    w12 = glu.w12[...]  # [2, glu_dim, D]
    h = run(xs, w12.reshape(2 * w12.shape[1], hidden), norm=True, pair=True, activation=glu.activation,
            name="tnl_decode_glu_in")
    # W_3 h + x by XLA: its matrix-vector product read the [D, glu_dim] weight faster than ours
    # (3.3 against 5.4 us on an H200), and there is nothing left to fuse into it.
    y = layers.project("bm,md->bd", h, glu.w3, dtype)
    return (xs + y.astype(xs.dtype))[:, None], state


# ----------------------------------------------------------------------------------------------
# Projections: out[r, n] = sum_k in[r, k] W[n, k], with the norm, gate, pair and residual fused.


def _project(inputs, weight, *, eps, dtype, tiles, interpret, name, norm=False, gate=None, pair=False,
             activation=None, residual=None):
    """inputs [b, K]; weight [N, K] (pair: [2 N', K], rows n and N' + n multiplied); gate: None or
    the mixer's projections [b, 4, K] (u is the 4th); residual: None or [b, N] -> [b, N (or N')]
    in the compute dtype (the residual's dtype with a residual)."""
    batch, k_dim = inputs.shape
    n_dim = weight.shape[0] // (2 if pair else 1)
    block_n = _largest_tile(n_dim, tiles.block_n)
    block_k = _largest_tile(k_dim, tiles.block_k)
    out_dtype = residual.dtype if residual is not None else dtype
    whole = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))
    in_specs = [whole((batch, k_dim))]
    args = [inputs]
    if gate is not None:
        in_specs.append(pl.BlockSpec((batch, None, k_dim), lambda i: (0, 3, 0)))
        args.append(gate)
    in_specs.append(pl.BlockSpec((block_n, k_dim), lambda i: (i, 0)))
    args.append(weight)
    if pair:
        second = n_dim // block_n
        in_specs.append(pl.BlockSpec((block_n, k_dim), lambda i: (second + i, 0)))
        args.append(weight)
    if residual is not None:
        in_specs.append(pl.BlockSpec((batch, block_n), lambda i: (0, i)))
        args.append(residual)
    kernel = functools.partial(
        _project_kernel, batch=batch, k_dim=k_dim, block_k=block_k, eps=eps, dtype=dtype, norm=norm,
        gate=gate is not None, pair=pair, activation=activation, residual=residual is not None,
    )
    return pl.pallas_call(
        kernel,
        grid=(n_dim // block_n,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((batch, block_n), lambda i: (0, i)),
        out_shape=jax.ShapeDtypeStruct((batch, n_dim), out_dtype),
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=2),
        interpret=interpret,
        name=name,
    )(*args)


def _project_kernel(*refs, batch, k_dim, block_k, eps, dtype, norm, gate, pair, activation, residual):
    refs = list(refs)
    x_ref = refs.pop(0)
    u_ref = refs.pop(0) if gate else None
    w_ref = refs.pop(0)
    w2_ref = refs.pop(0) if pair else None
    res_ref = refs.pop(0) if residual else None
    (out_ref,) = refs
    # Straight-line code, no loop: every load of the program is independent of the arithmetic, so
    # the compiler issues them all at once. (A loop over the slices waits a memory latency per
    # slice, and these programs read too little for anything else to hide it.)
    slices = [pl.ds(start, block_k) for start in range(0, k_dim, block_k)]

    def piece(ref, r, cols):  # row r's input slice, float32
        return ref[r, cols].astype(F32)

    if norm:  # 1 / rms of each input row, over all k_dim (every program recomputes it)
        inv = []
        for r in range(batch):
            squares = sum(jnp.square(piece(x_ref, r, cols)) for cols in slices)  # one reduction at the end
            inv.append(lax.rsqrt(jnp.sum(squares) / k_dim + eps))

    def vector(r, cols):  # row r's input slice as the XLA path rounds it
        x = piece(x_ref, r, cols)
        if norm:
            x = (x * inv[r]).astype(dtype).astype(F32)
        if gate:
            x = (piece(u_ref, r, cols) * x).astype(dtype).astype(F32)
        return x.astype(dtype).astype(F32)

    # Products summed elementwise over the slices, reduced once at the end: a reduction crosses
    # warps through shared memory and a barrier, which would serialise the slices.
    acc = [0.0] * (batch * (2 if pair else 1))
    for cols in slices:
        w = w_ref[:, cols].astype(dtype).astype(F32)  # [block_n, block_k]
        w2 = w2_ref[:, cols].astype(dtype).astype(F32) if pair else None
        for r in range(batch):
            v = vector(r, cols)[None, :]
            if pair:
                acc[2 * r] += w * v
                acc[2 * r + 1] += w2 * v
            else:
                acc[r] += w * v
    acc = [jnp.sum(a, axis=1) for a in acc]
    for r in range(batch):
        if pair:
            h1 = acc[2 * r].astype(dtype).astype(F32)
            h2 = acc[2 * r + 1].astype(dtype).astype(F32)
            if activation is not None:
                h1 = activation(h1).astype(dtype).astype(F32)
            y = h1 * h2
        else:
            y = acc[r]
        y = y.astype(dtype)
        if residual:
            y = res_ref[r, :].astype(F32) + y.astype(F32)
        out_ref[r, :] = y.astype(out_ref.dtype)


# ----------------------------------------------------------------------------------------------
# The recurrence of one token, in place on the state.


def _recurrence(p, rates, positions, state, theta, *, activation, dtype, tiles, interpret):
    """p [b, P, heads, head_dim] (q, k, v, ...); rates [heads]; positions [b]; state float32
    [b, heads, dim_k, head_dim]; theta None or float32 [heads, head_dim] (LRPE: dim_k = 2 head_dim)
    -> (o [b, heads, head_dim] in the compute dtype, the new state)."""
    batch, _, heads, head_dim = p.shape
    dim_k = state.shape[2]
    tile = _largest_tile(head_dim, tiles.value_tile)
    decay = jnp.exp(-rates.astype(F32))
    vec = lambda index: pl.BlockSpec((None, None, None, head_dim), lambda r, h, j: (r, index, h, 0))
    in_specs = [
        pl.BlockSpec((heads,), lambda r, h, j: (0,)),
        pl.BlockSpec((batch,), lambda r, h, j: (0,)),
        vec(0),
        vec(1),
        pl.BlockSpec((None, None, None, tile), lambda r, h, j: (r, 2, h, j)),
        pl.BlockSpec((None, None, dim_k, tile), lambda r, h, j: (r, h, 0, j)),
    ]
    args = [decay, positions.astype(jnp.int32), p, p, p, state]
    if theta is not None:
        in_specs.append(pl.BlockSpec((None, head_dim), lambda r, h, j: (h, 0)))
        args.append(theta)
    kernel = functools.partial(_recurrence_kernel, activation=activation, dtype=dtype, lrpe=theta is not None)
    o, state = pl.pallas_call(
        kernel,
        grid=(batch, heads, head_dim // tile),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, tile), lambda r, h, j: (r, h, j)),
            pl.BlockSpec((None, None, dim_k, tile), lambda r, h, j: (r, h, 0, j)),
        ],
        out_shape=[jax.ShapeDtypeStruct((batch, heads, head_dim), dtype), jax.ShapeDtypeStruct(state.shape, F32)],
        input_output_aliases={5: 1},
        compiler_params=plt.CompilerParams(num_warps=tiles.recurrence_warps, num_stages=1),
        interpret=interpret,
        name="tnl_decode_recurrence",
    )(*args)
    return o, state


def _recurrence_kernel(decay_ref, pos_ref, q_ref, k_ref, v_ref, s_ref, *rest, activation, dtype, lrpe):
    if lrpe:
        theta_ref, o_ref, s_out_ref = rest
    else:
        o_ref, s_out_ref = rest
    r, h = pl.program_id(0), pl.program_id(1)
    lam = decay_ref[h]

    def act(x):  # [head_dim] as the XLA path rounds it
        x = x.astype(F32)
        return x if activation is None else activation(x).astype(dtype).astype(F32)

    q, k = act(q_ref[...]), act(k_ref[...])
    v = v_ref[...].astype(F32)  # [tile]
    if lrpe:
        angle = pos_ref[r].astype(F32) * theta_ref[...]
        cos, sin = jnp.cos(angle), jnp.sin(angle)
        rounded = lambda x: x.astype(dtype).astype(F32)
        halves = ((rounded(q * cos), rounded(k * cos)), (rounded(q * sin), rounded(k * sin)))
    else:
        halves = ((q, k),)
    head_dim = q.shape[0]
    o = jnp.zeros(v.shape, F32)
    for i, (qh, kh) in enumerate(halves):
        rows = pl.ds(i * head_dim, head_dim)
        s = lam * s_ref[rows, :] + kh[:, None] * v[None, :]
        s_out_ref[rows, :] = s
        o = o + jnp.sum(qh[:, None] * s, axis=0)
    o_ref[...] = o.astype(o_ref.dtype)
