"""The public op: `lightning_attention`, its argument checks, and the registry of implementations.

Every implementation has the same signature::

    impl(q, k, v, rates, initial_state, *, scale, block_size) -> (o, final_state)

    q, k:          [batch, time, heads, dim_k]
    v:             [batch, time, heads, dim_v]
    rates:         [heads] float32, already checked and cut off from autodiff
    initial_state: [batch, heads, dim_k, dim_v] float32, or None (zero state)
    scale:         Python float multiplying q
    block_size:    power of two, or None for the implementation's default
    o:             [batch, time, heads, dim_v] in q's dtype
    final_state:   [batch, heads, dim_k, dim_v] float32, the state after the last token

The registry is the one place that names them; `implementation=None` picks the best for the platform.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_derivatives

from lightning_jax.attention import reference, xla

Implementation = Callable[..., tuple[jax.Array, jax.Array]]


def _pallas(*args, **kwargs):
    # Imported on first use: Pallas pulls in Triton lowering code that CPU-only users never need.
    from lightning_jax.attention import pallas_gpu

    return pallas_gpu.lightning_attention_pallas(*args, **kwargs)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "reference": reference.quadratic,
    "recurrent": reference.recurrent,
    "xla": xla.lightning_attention_xla,
    "pallas": _pallas,
}

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def default_implementation() -> str:
    """The implementation `implementation=None` resolves to on this process's default backend."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rates: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
    implementation: str | None = None,
):
    """Causal linear attention with a constant per-head decay (Lightning Attention).

    For each batch element and head h, with decay lambda_h = exp(-rates[h])::

        S_t = lambda_h * S_{t-1} + k_t^T v_t        (S_{-1} = initial_state, or 0)
        o_t = (scale * q_t) S_t

    i.e. ``o = ((scale * Q K^T) * M) V + diag(lambda^(t+1)) (scale * Q) S_in`` with
    ``M[t, j] = lambda^(t - j)`` for ``t >= j``: the diagonal is included, there is no softmax and no
    1/sqrt(dim) scale unless you pass one.

    Args:
      q: [batch, time, heads, dim_k] float16, bfloat16 or float32.
      k: [batch, time, heads, dim_k], same dtype as q.
      v: [batch, time, heads, dim_v], same dtype as q; dim_v may differ from dim_k.
      rates: [heads] decay rates, >= 0 and finite (0 means no decay). **Not differentiable**:
        differentiating through them raises an error instead of returning a wrong (zero) gradient;
        wrap them in `jax.lax.stop_gradient` if they come from something you differentiate.
      initial_state: optional [batch, heads, dim_k, dim_v] state carried in from earlier tokens
        (the `final_state` of a previous call). Differentiable.
      return_final_state: also return the float32 state after the last token.
      scale: multiplies q; default 1.0 (as in the papers).
      block_size: tokens per block for the block algorithm (a positive power of two); None picks
        the implementation's default. Ignored by "reference" and "recurrent".
      implementation: one of `IMPLEMENTATIONS` ("reference", "recurrent", "xla", "pallas"), or None
        for the best on this platform (`default_implementation()`).

    Returns:
      o: [batch, time, heads, dim_v] in q's dtype; or (o, final_state) with final_state float32
      [batch, heads, dim_k, dim_v] when `return_final_state`. Gradients flow to q, k, v and
      initial_state, including from final_state.
    """
    name = implementation if implementation is not None else default_implementation()
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: got {name!r}, expected one of {sorted(IMPLEMENTATIONS)} or None"
        )
    _check_arrays(q, k, v, rates, initial_state)
    scale = _check_scale(scale)
    _check_block_size(block_size)
    rates = _no_rate_gradient(rates.astype(jnp.float32))
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    o, final_state = IMPLEMENTATIONS[name](
        q, k, v, rates, initial_state, scale=scale, block_size=block_size
    )
    return (o, final_state) if return_final_state else o


# ----------------------------------------------------------------------------------------------
# Rates: no gradient, said loudly.


@jax.custom_jvp
def _no_rate_gradient(rates):
    return rates


def _no_rate_gradient_jvp(primals, tangents):
    (rates,), (tangent,) = primals, tangents
    if isinstance(tangent, custom_derivatives.SymbolicZero):
        return rates, tangent
    raise TypeError(
        "rates: lightning_attention has no gradient with respect to the decay rates, but they are "
        "being differentiated. TNL keeps them fixed; if yours depend on something you differentiate, "
        "wrap them in jax.lax.stop_gradient(rates) to say the gradient through them is zero."
    )


# symbolic_zeros: the rule sees whether rates really carry a tangent, so constants pass untouched.
_no_rate_gradient.defjvp(_no_rate_gradient_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Argument checks: each error names the argument, what was received and what was expected.


def _describe(x) -> str:
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def _check_floating(name: str, x) -> None:
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
        raise TypeError(
            f"{name}: got dtype {x.dtype}, expected a floating dtype (float16, bfloat16, float32)"
        )


def _check_arrays(q, k, v, rates, initial_state) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("rates", rates)):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"{name}: got {type(x).__name__}, expected a jax or numpy array")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"{name}: got {_describe(x)}, expected rank 4 [batch, time, heads, dim]"
            )
        _check_floating(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"q, k, v: got dtypes {q.dtype}, {k.dtype}, {v.dtype}, expected one dtype for all three"
        )
    batch, time, heads, dim_k = q.shape
    if k.shape != q.shape:
        raise ValueError(
            f"k: got shape {tuple(k.shape)}, expected q's shape {tuple(q.shape)} [batch, time, heads, dim_k]"
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v: got shape {tuple(v.shape)}, expected [batch, time, heads] = {tuple(q.shape[:3])} "
            "to match q and k, then dim_v"
        )
    if time == 0:
        raise ValueError(f"q: got time = 0 (shape {tuple(q.shape)}), expected at least one token")
    if 0 in (batch, heads, dim_k, v.shape[3]):
        raise ValueError(
            f"q, v: got shapes {tuple(q.shape)}, {tuple(v.shape)}, expected no zero-sized dimension"
        )
    if rates.shape != (heads,):
        raise ValueError(f"rates: got shape {tuple(rates.shape)}, expected ({heads},) = [heads]")
    _check_floating("rates", rates)
    _check_rate_values(rates)
    if initial_state is not None:
        expected = (batch, heads, dim_k, v.shape[3])
        if not hasattr(initial_state, "shape") or tuple(initial_state.shape) != expected:
            got = _describe(initial_state) if hasattr(initial_state, "shape") else type(initial_state).__name__
            raise ValueError(
                f"initial_state: got {got}, expected shape {expected} = [batch, heads, dim_k, dim_v]"
            )
        _check_floating("initial_state", initial_state)


def _check_rate_values(rates) -> None:
    """Checks values when they are known (not traced under jit); traced rates are trusted."""
    try:
        values = np.asarray(rates, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        raise ValueError(
            f"rates: got {values.tolist()}, expected finite values >= 0 "
            f"(decay = exp(-rate)); bad at heads {np.flatnonzero(bad).tolist()}"
        )


def _check_scale(scale) -> float:
    if scale is None:
        return 1.0
    if isinstance(scale, jax.core.Tracer):
        raise TypeError("scale: got a traced value, expected a Python float (it is static)")
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale: got {scale!r}, expected a Python float") from None
    if not math.isfinite(value):
        raise ValueError(f"scale: got {value}, expected a finite float")
    return value


def _check_block_size(block_size) -> None:
    if block_size is None:
        return
    if (
        isinstance(block_size, bool)
        or not isinstance(block_size, (int, np.integer))
        or block_size < 1
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size: got {block_size!r}, expected a positive power of two (16, 32, 64, ...) or None"
        )
