"""Slow, obviously-correct forms of lightning attention: the oracles every fast path is tested against.

- `quadratic`: the masked parallel form ``O = ((Q K^T) * M) V`` in float32 (float64 under x64),
  O(time^2) memory. Differentiating it with JAX autodiff gives the reference gradients.
- `recurrent`: the token recurrence with `lax.scan`, built from `decode_step`, the one-token update
  that generation uses.

Shapes follow `lightning_jax.attention.api`: q, k [batch, time, heads, dim_k], v [batch, time, heads,
dim_v], rates [heads], state [batch, heads, dim_k, dim_v].
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def _compute_dtype(dtype):
    return jnp.promote_types(dtype, jnp.float32)


def quadratic(q, k, v, rates, initial_state, *, scale: float = 1.0, block_size=None):
    """The masked quadratic form. Returns (o [batch, time, heads, dim_v], final_state fp32)."""
    del block_size
    dt = _compute_dtype(q.dtype)
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


def decode_step(q, k, v, rates, state, *, scale: float = 1.0):
    """One token of the recurrence: ``S = lambda S + k^T v; o = (scale q) S``.

    Args:
      q, k: [batch, heads, dim_k]; v: [batch, heads, dim_v]; rates: [heads];
      state: [batch, heads, dim_k, dim_v] float32 (the state through the previous token).
    Returns:
      (o [batch, heads, dim_v] in q's dtype, new state float32).
    """
    dt = _compute_dtype(jnp.promote_types(q.dtype, state.dtype))
    decay = jnp.exp(-rates.astype(dt))[None, :, None, None]
    new_state = decay * state.astype(dt) + jnp.einsum(
        "bhd,bhe->bhde", k.astype(dt), v.astype(dt), precision=_HIGHEST
    )
    o = jnp.einsum("bhd,bhde->bhe", q.astype(dt) * scale, new_state, precision=_HIGHEST)
    return o.astype(q.dtype), new_state.astype(state.dtype)


def recurrent(q, k, v, rates, initial_state, *, scale: float = 1.0, block_size=None):
    """The token recurrence with lax.scan. Returns (o, final_state fp32)."""
    del block_size
    batch, _, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    state_dtype = jnp.promote_types(jnp.float32, _compute_dtype(q.dtype))
    state = (
        jnp.zeros((batch, heads, dim_k, dim_v), state_dtype)
        if initial_state is None
        else initial_state.astype(state_dtype)
    )

    def step(state, qkv):
        o, state = decode_step(*qkv, rates, state, scale=scale)
        return state, o

    time_major = [jnp.swapaxes(x, 0, 1) for x in (q, k, v)]
    final_state, o = lax.scan(step, state, time_major)
    return jnp.swapaxes(o, 0, 1), final_state
