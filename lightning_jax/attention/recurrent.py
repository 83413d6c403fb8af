"""The token recurrence: `decode_step` (one token, the decode path of generation) and `recurrent`
(a whole sequence with `lax.scan`, the second oracle)::

    S_t = lambda S_{t-1} + k_t^T v_t,    o_t = (scale q_t) S_t,    lambda = exp(-rate) per head

Shapes follow `lightning_jax.attention.registry`: q, k [batch, time, heads, dim_k], v [batch, time,
heads, dim_v], rates [heads], state [batch, heads, dim_k, dim_v]. Computed in fp32 (fp64 for fp64
inputs) whatever the input dtype.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from lightning_jax import checks
from lightning_jax.attention.api import check_rates, check_state
from lightning_jax.attention.reference import compute_dtype

_HIGHEST = lax.Precision.HIGHEST


def decode_step(q, k, v, rates, state, *, scale: float = 1.0):
    """One token of the recurrence: ``S = lambda S + k^T v; o = (scale q) S``.

    Args:
      q, k: [batch, heads, dim_k]; v: [batch, heads, dim_v]; rates: [heads];
      state: [batch, heads, dim_k, dim_v] float32 (the state through the previous token).
    Returns:
      (o [batch, heads, dim_v] in q's dtype, new state float32).
    """
    _check_step(q, k, v, rates, state)
    return _step(q, k, v, rates, state, scale=scale)


def _step(q, k, v, rates, state, *, scale: float, keep=None):
    dt = compute_dtype(jnp.promote_types(q.dtype, state.dtype))
    decay = jnp.exp(-rates.astype(dt))[None, :, None, None]
    if keep is not None:  # [batch] bool: False at a segment's first token resets the state
        decay = jnp.where(keep[:, None, None, None], decay, 0.0)
    new_state = decay * state.astype(dt) + jnp.einsum(
        "bhd,bhe->bhde", k.astype(dt), v.astype(dt), precision=_HIGHEST
    )
    o = jnp.einsum("bhd,bhde->bhe", q.astype(dt) * scale, new_state, precision=_HIGHEST)
    return o.astype(q.dtype), new_state.astype(state.dtype)


def recurrent(q, k, v, rates, initial_state, *, scale: float = 1.0, block_size=None, config=None, interpret=None,
              segment_ids=None):
    """The token recurrence with lax.scan. Returns (o, final_state fp32).

    With `segment_ids` ([batch, time]) the state is reset (not decayed) at each token whose id
    differs from the previous token's; the initial state thus reaches the first segment only."""
    del block_size, config, interpret  # the registry's common signature; nothing to tune
    batch, _, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    state_dtype = jnp.promote_types(jnp.float32, compute_dtype(q.dtype))
    state = (
        jnp.zeros((batch, heads, dim_k, dim_v), state_dtype)
        if initial_state is None
        else initial_state.astype(state_dtype)
    )

    def step(state, qkv):
        o, state = _step(*qkv, rates, state, scale=scale)
        return state, o

    time_major = [jnp.swapaxes(x, 0, 1) for x in (q, k, v)]
    if segment_ids is not None:
        seg = segment_ids
        keep = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], axis=1)

        def segment_step(state, qkv_keep):
            *qkv, keep = qkv_keep
            o, state = _step(*qkv, rates, state, scale=scale, keep=keep)
            return state, o

        final_state, o = lax.scan(segment_step, state, [*time_major, jnp.swapaxes(keep, 0, 1)])
        return jnp.swapaxes(o, 0, 1), final_state
    final_state, o = lax.scan(step, state, time_major)
    return jnp.swapaxes(o, 0, 1), final_state


def _check_step(q, k, v, rates, state) -> None:
    """decode_step's arguments, checked as the op checks its own (errors name the argument)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not hasattr(x, "shape") or x.ndim != 3:
            got = f"shape {tuple(x.shape)}" if hasattr(x, "shape") else type(x).__name__
            raise checks.ArgumentError(name, f"got {got}, expected rank 3 [batch, heads, dim] (one token)")
    if k.shape != q.shape:
        raise checks.ArgumentError("k", f"got shape {tuple(k.shape)}, expected q's shape {tuple(q.shape)}")
    if v.shape[:2] != q.shape[:2]:
        raise checks.ArgumentError("v", f"got shape {tuple(v.shape)}, expected [batch, heads] = {tuple(q.shape[:2])}, then dim_v")
    batch, heads, dim_k = q.shape
    check_rates(rates, heads)
    check_state("state", state, (batch, heads, dim_k, v.shape[-1]))
