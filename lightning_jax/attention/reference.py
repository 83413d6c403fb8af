"""The slow, obviously-correct form of lightning attention: the oracle every fast path is tested against.

`quadratic` is the masked parallel form ``O = ((Q K^T) * M) V`` in float32 (float64 under x64),
O(time^2) memory; differentiating it with JAX autodiff gives the reference gradients. The token
recurrence, the second oracle and the decode path, is in `recurrent.py`.

Shapes follow `lightning_jax.attention.api`: q, k [batch, time, heads, dim_k], v [batch, time, heads,
dim_v], rates [heads], state [batch, heads, dim_k, dim_v].
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def compute_dtype(dtype):
    """fp32, or fp64 for fp64 inputs: the oracles never compute below fp32."""
    return jnp.promote_types(dtype, jnp.float32)


def quadratic(q, k, v, rates, initial_state, *, scale: float = 1.0, block_size=None, config=None, interpret=None,
              segment_ids=None):
    """The masked quadratic form. Returns (o [batch, time, heads, dim_v], final_state fp32).

    With `segment_ids` ([batch, time], non-decreasing per row) the mask also requires
    s_t == s_j, the initial state reaches the tokens of the first segment only, and the final state
    is built from the last segment's tokens (plus the initial state when the row is one segment)."""
    del block_size, config, interpret  # the registry's common signature; nothing to tune
    if segment_ids is not None:
        return _quadratic_segments(q, k, v, rates, initial_state, scale, segment_ids)
    dt = compute_dtype(q.dtype)
    qf, kf, vf = (x.astype(dt) * s for x, s in ((q, scale), (k, 1.0), (v, 1.0)))
    rates = rates.astype(dt)
    time = q.shape[1]
    t = jnp.arange(time, dtype=dt)
    lag = t[:, None] - t[None, :]
    # Mask the exponent, not the result: exp(+large) above the diagonal would be inf, and inf * 0 = NaN.
    decay = jnp.exp(jnp.where(lag >= 0, -rates[:, None, None] * lag, -jnp.inf))  # [heads, t, s]
    scores = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=_HIGHEST) * decay
    o = jnp.einsum("bhts,bshe->bthe", scores, vf, precision=_HIGHEST)
    # Final state: S = sum_s lambda^(time-1-s) k_s^T v_s (+ lambda^time S_in).
    k_decay = jnp.exp(-rates[None, :] * (time - 1 - t)[:, None])  # [time, heads]
    final_state = jnp.einsum("bshd,sh,bshe->bhde", kf, k_decay, vf, precision=_HIGHEST)
    if initial_state is not None:
        s_in = initial_state.astype(dt)
        q_decay = jnp.exp(-rates[None, :] * (t + 1)[:, None])  # [time, heads]
        o = o + jnp.einsum("bthd,th,bhde->bthe", qf, q_decay, s_in, precision=_HIGHEST)
        final_state = final_state + jnp.exp(-rates * time)[None, :, None, None] * s_in
    return o.astype(q.dtype), final_state.astype(jnp.promote_types(jnp.float32, dt))


def _quadratic_segments(q, k, v, rates, initial_state, scale, segment_ids):
    dt = compute_dtype(q.dtype)
    qf, kf, vf = (x.astype(dt) * s for x, s in ((q, scale), (k, 1.0), (v, 1.0)))
    rates = rates.astype(dt)
    time = q.shape[1]
    seg = segment_ids
    t = jnp.arange(time, dtype=dt)
    lag = t[:, None] - t[None, :]
    same = seg[:, :, None] == seg[:, None, :]  # [batch, t, s]
    keep = (lag >= 0)[None, None] & same[:, None]  # [batch, 1, t, s]
    decay = jnp.exp(jnp.where(keep, -rates[None, :, None, None] * lag, -jnp.inf))  # [batch, heads, t, s]
    scores = jnp.einsum("bthd,bshd->bhts", qf, kf, precision=_HIGHEST) * decay
    o = jnp.einsum("bhts,bshe->bthe", scores, vf, precision=_HIGHEST)
    in_last = seg == seg[:, -1:]  # [batch, time]: tokens of the row's last segment
    k_decay = jnp.exp(jnp.where(in_last[:, :, None], -rates[None, None, :] * (time - 1 - t)[None, :, None], -jnp.inf))
    final_state = jnp.einsum("bshd,bsh,bshe->bhde", kf, k_decay, vf, precision=_HIGHEST)
    if initial_state is not None:
        s_in = initial_state.astype(dt)
        in_first = seg == seg[:, :1]
        q_decay = jnp.exp(jnp.where(in_first[:, :, None], -rates[None, None, :] * (t + 1)[None, :, None], -jnp.inf))
        o = o + jnp.einsum("bthd,bth,bhde->bthe", qf, q_decay, s_in, precision=_HIGHEST)
        one_segment = (seg[:, -1] == seg[:, 0]).astype(dt)  # [batch]
        final_state = final_state + (one_segment[:, None] * jnp.exp(-rates * time)[None, :])[:, :, None, None] * s_in
    return o.astype(q.dtype), final_state.astype(jnp.promote_types(jnp.float32, dt))
