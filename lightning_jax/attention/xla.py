"""The block algorithm in plain JAX: runs on every backend, with an explicit backward (custom_vjp).

Convention A of docs (lightning-math.md): split time into N blocks of C tokens; inside a block use the
masked quadratic form, across blocks carry R_i, the state aged to the first position of block i::

    O_i     = ((Q_i K_i^T) * D) V_i + diag(lambda^a) Q_i R_i
    R_{i+1} = c_i R_i + (diag(lambda^(E_i - a)) K_i)^T V_i,   c_i = lambda^(E_i),   R_0 = lambda S_in

E_i = C for every block but the last, whose E is m - 1 (m its real length): then R_N is exactly the
true final state S_{time-1}, with no division by lambda (which underflows) and no padding error. The
same "end exponent" drives the backward, so the final-state cotangent is simply G at the end.

All block states come from one `lax.associative_scan` (log N depth, no per-token state); the backward
recomputes them from (q, k, v, S_in), so its memory is O(batch x time x heads x dim) plus per-block
states (time / C of them), never a time x time matrix.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from lightning_jax import checks
from lightning_jax.attention.registry import DEFAULT_BLOCK_SIZE, next_power_of_2

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """Tuning knobs of the XLA path: `block_size`, tokens per block (a power of two). The op's
    `block_size=` argument, when given, overrides it."""

    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self):
        checks.check_power_of_two("config.block_size", self.block_size)


def lightning_attention_xla(
    q, k, v, rates, initial_state, *, scale: float = 1.0, block_size=None, config=None, interpret=None,
    segment_ids=None,
):
    """Plain-JAX block algorithm. Shapes as in `registry`; returns (o in q's dtype, final_state fp32).
    `interpret` is part of the registry's common signature and ignored (no kernels here).
    `segment_ids` ([batch, time] int32): packed documents, see `_Gates`."""
    del interpret
    batch, time, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    block = block_size or (config or XlaConfig()).block_size
    block = min(block, next_power_of_2(time))  # no point padding a short sequence to a long block
    s_in = (
        jnp.zeros((batch, heads, dim_k, dim_v), _F32) if initial_state is None else initial_state
    )
    if scale != 1.0:
        q = q * jnp.asarray(scale, q.dtype)
    if segment_ids is not None:
        return _block_attention_segments(block, q, k, v, rates, s_in, segment_ids.astype(jnp.int32))
    o, final_state = _block_attention(block, q, k, v, rates, s_in)
    return o, final_state


class _Decays:
    """Per-head decay factors for one sequence layout, all exp(-rate * delta) with delta >= 0."""

    def __init__(self, rates, time: int, block: int):
        num_blocks = -(-time // block)
        last_len = time - (num_blocks - 1) * block
        a = jnp.arange(block, dtype=_F32)
        # End exponent per block: C, except m - 1 for the last (so R_N is the true final state).
        end = jnp.full((num_blocks,), block, _F32).at[-1].set(last_len - 1)  # [N]
        # Everything below depends only on the static shape and on `rates`, which are usually a
        # compile-time constant (a schedule closed over by the caller), so a constant-folding pass
        # may evaluate the factors ([N, heads, C] is 1M elements at 64K tokens, [heads, C, C], the
        # scan's products of c_i) into literals in XLA's slow HLO evaluator. The barrier makes
        # these inputs opaque: the factors are a few elementwise ops at run time, fused into their
        # users. Math unchanged.
        rates, a, end = lax.optimization_barrier((rates.astype(_F32), a, end))
        s = rates[:, None]  # [heads, 1]
        lag = a[:, None] - a[None, :]
        self.num_blocks = num_blocks
        self.q = jnp.exp(-s * a)  # [heads, C]: lambda^a
        self.intra = jnp.exp(jnp.where(lag >= 0, -s[:, :, None] * lag, -jnp.inf))  # [heads, C, C]
        k_lag = end[:, None, None] - a[None, None, :]  # [N, 1, C]
        self.k = jnp.exp(jnp.where(k_lag >= 0, -s[None] * k_lag, -jnp.inf))  # [N, heads, C]
        self.block = jnp.exp(-s[None, :, 0] * end[:, None])  # [N, heads]: c_i
        self.first = jnp.exp(-rates)  # [heads]: R_0 = lambda S_in


class _Gates:
    """Packed documents: 0/1 gates of one segment layout (segment ids s, non-decreasing per row).

    Block n starts at b0 = nC; `prev` is the segment of token b0 - 1 (for n = 0, of token 0: the
    initial state's segment), `last` the segment of the block's last real token. Then

        O_i     = ((Q_i K_i^T) * D * same) V_i + diag(gq lambda^a) Q_i R_i
        R_{i+1} = gb c_i R_i + (diag(gk lambda^(E_i - a)) K_i)^T V_i

    with same[a, b] = (s_a == s_b), gq[a] = (s_a == prev), gk[a] = (s_a == last), gb = (last ==
    prev). The backward takes the same substitutions (the gated factors are just per-batch factors).
    """

    def __init__(self, seg, time: int, block: int, num_blocks: int):
        batch = seg.shape[0]
        pad = num_blocks * block - time
        seg_blocks = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge").reshape(batch, num_blocks, block)
        starts = jnp.arange(num_blocks) * block
        prev = seg[:, jnp.maximum(starts - 1, 0)]  # [batch, N]
        last = seg[:, jnp.minimum(starts + block - 1, time - 1)]  # [batch, N]
        self.q = (seg_blocks == prev[..., None]).astype(_F32)  # [batch, N, C]
        self.k = (seg_blocks == last[..., None]).astype(_F32)  # [batch, N, C]
        self.block = (last == prev).astype(_F32)  # [batch, N]
        self.same = seg_blocks[..., :, None] == seg_blocks[..., None, :]  # [batch, N, C, C]

    def mask(self, scores):
        """scores [batch, N, heads, C, C] with pairs from different segments zeroed."""
        return jnp.where(self.same[:, :, None], scores, 0.0)


def _rows(x, gate):
    """x [batch, N, C, ...] with rows scaled by gate [batch, N, C] (no gate: x)."""
    if gate is None:
        return x
    return x * gate.reshape(*gate.shape, *(1,) * (x.ndim - 3))


def _to_blocks(x, block: int, num_blocks: int):
    """[batch, time, heads, dim] -> [batch, N, C, heads, dim] fp32, zero-padded at the end."""
    pad = num_blocks * block - x.shape[1]
    x = jnp.pad(x.astype(_F32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    return x.reshape(x.shape[0], num_blocks, block, *x.shape[2:])


def _from_blocks(x, time: int, dtype):
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :time].astype(dtype)


def _combine(left, right):
    # (a, x) then (b, y) -> (a b, b x + y): the linear recurrence R' = c R + u, composed.
    a, x = left
    b, y = right
    return a * b, b * x + y


def _linear_scan(decays, inputs, *, reverse: bool):
    """All prefix (or suffix) results of R_{j+1} = decays_j R_j + inputs_j.

    decays: [steps, heads] (or [batch, steps, heads]); inputs: [batch, steps, heads, dk, dv].
    Returns the scanned inputs.
    """
    if decays.ndim == 3:
        a = decays[:, :, :, None, None]
    else:
        a = jnp.broadcast_to(decays[None, :, :, None, None], (1, *decays.shape, 1, 1))
    _, out = lax.associative_scan(_combine, (a, inputs), reverse=reverse, axis=1)
    return out


def _states(decays: _Decays, kb, vb, s_in, gates: _Gates | None = None):
    """R_0 .. R_N: [batch, N + 1, heads, dk, dv]; R_N is the final state."""
    kv = jnp.einsum("bnchd,nhc,bnche->bnhde", _rows(kb, None if gates is None else gates.k), decays.k, vb)
    r0 = decays.first[None, :, None, None] * s_in.astype(_F32)
    inputs = jnp.concatenate([r0[:, None], kv], axis=1)
    if gates is None:
        steps = jnp.concatenate([jnp.ones_like(decays.block[:1]), decays.block], axis=0)
    else:
        block = gates.block[:, :, None] * decays.block[None]  # [batch, N, heads]
        steps = jnp.concatenate([jnp.ones_like(block[:, :1]), block], axis=1)
    return _linear_scan(steps, inputs, reverse=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_attention(block, q, k, v, rates, s_in):
    return _forward(block, q, k, v, rates, s_in)[0]


def _forward(block, q, k, v, rates, s_in, seg=None):
    time = q.shape[1]
    d = _Decays(rates, time, block)
    gates = None if seg is None else _Gates(seg, time, block, d.num_blocks)
    qb, kb, vb = (_to_blocks(x, block, d.num_blocks) for x in (q, k, v))
    states = _states(d, kb, vb, s_in, gates)
    scores = jnp.einsum("bnchd,bnshd->bnhcs", qb, kb) * d.intra
    if gates is not None:
        scores = gates.mask(scores)
    o = jnp.einsum("bnhcs,bnshe->bnche", scores, vb)
    o = o + jnp.einsum("bnchd,hc,bnhde->bnche", _rows(qb, None if gates is None else gates.q), d.q, states[:, :-1])
    residuals = (q, k, v, rates, s_in) + (() if seg is None else (seg,))
    return (_from_blocks(o, time, q.dtype), states[:, -1]), residuals


def _backward(block, residuals, cotangents):
    q, k, v, rates, s_in, *seg = residuals
    d_o, d_final = cotangents
    time = q.shape[1]
    d = _Decays(rates, time, block)
    gates = _Gates(seg[0], time, block, d.num_blocks) if seg else None
    gate_q, gate_k = (None, None) if gates is None else (gates.q, gates.k)
    qb, kb, vb, dob = (_to_blocks(x, block, d.num_blocks) for x in (q, k, v, d_o))
    states = _states(d, kb, vb, s_in, gates)  # recomputed, not saved
    # G'_i = dL/dR_i: G'_N = dL/dS_final, G'_i = c_i G'_{i+1} + (diag(lambda^a) Q_i)^T dO_i.
    y = jnp.einsum("bnchd,hc,bnche->bnhde", _rows(qb, gate_q), d.q, dob)
    inputs = jnp.concatenate([y, d_final.astype(_F32)[:, None]], axis=1)
    if gates is None:
        steps = jnp.concatenate([d.block, jnp.ones_like(d.block[:1])], axis=0)
    else:
        gated = gates.block[:, :, None] * d.block[None]  # [batch, N, heads]
        steps = jnp.concatenate([gated, jnp.ones_like(gated[:, :1])], axis=1)
    g = _linear_scan(steps, inputs, reverse=True)  # [batch, N + 1, ...]
    g_next = g[:, 1:]  # cotangent of R_{i+1}, the state block i feeds
    p = jnp.einsum("bnche,bnshe->bnhcs", dob, vb) * d.intra
    a = jnp.einsum("bnchd,bnshd->bnhcs", qb, kb) * d.intra
    if gates is not None:
        p, a = gates.mask(p), gates.mask(a)
    dq = jnp.einsum("bnhcs,bnshd->bnchd", p, kb) + _rows(jnp.einsum(
        "bnche,hc,bnhde->bnchd", dob, d.q, states[:, :-1]
    ), gate_q)
    dk = jnp.einsum("bnhcs,bnchd->bnshd", p, qb) + _rows(jnp.einsum(
        "nhc,bnche,bnhde->bnchd", d.k, vb, g_next
    ), gate_k)
    dv = jnp.einsum("bnhcs,bnche->bnshe", a, dob) + _rows(jnp.einsum(
        "nhc,bnchd,bnhde->bnche", d.k, kb, g_next
    ), gate_k)
    d_s_in = d.first[None, :, None, None] * g[:, 0]
    return (
        _from_blocks(dq, time, q.dtype),
        _from_blocks(dk, time, k.dtype),
        _from_blocks(dv, time, v.dtype),
        jnp.zeros_like(rates),  # the API refuses to differentiate rates; see api._no_rate_gradient
        d_s_in.astype(s_in.dtype),
    )


_block_attention.defvjp(_forward, _backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_attention_segments(block, q, k, v, rates, s_in, seg):
    """`_block_attention` for packed documents: seg [batch, time] int32 (see `_Gates`)."""
    return _forward(block, q, k, v, rates, s_in, seg)[0]


def _forward_segments(block, q, k, v, rates, s_in, seg):
    return _forward(block, q, k, v, rates, s_in, seg)


def _backward_segments(block, residuals, cotangents):
    return (*_backward(block, residuals, cotangents), None)  # segment ids: integers, no cotangent


_block_attention_segments.defvjp(_forward_segments, _backward_segments)
