"""The public op `lightning_attention`: argument checks, then dispatch to an implementation.

The implementations and their shared signature are listed once, in `registry.py`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_derivatives

from lightning_jax import checks
from lightning_jax.attention import context_parallel
from lightning_jax.attention.registry import IMPLEMENTATIONS, default_implementation

_FLOAT_DTYPES = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


def lightning_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rates: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    return_final_state: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
    implementation: str | None = None,
    config=None,
    interpret: bool | None = None,
    context_axis: str | None = None,
    checked: bool = False,
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
        Values are checked when known; traced rates (under `jit`) are trusted unless `checked`.
      initial_state: optional [batch, heads, dim_k, dim_v] state carried in from earlier tokens
        (the `final_state` of a previous call). Differentiable. With `segment_ids` it applies to
        the row's first segment only.
      segment_ids: optional [batch, time] integer ids of packed documents, non-decreasing along each
        row (checked when concrete); None (default) is one segment. The state resets at each
        boundary: token t sees only tokens j <= t with segment_ids[j] == segment_ids[t], and
        `final_state` is the state of the row's last segment (plus the decayed initial state if the
        row has one segment). Not differentiable (integers). With `context_axis`, this device's slice
        of them (documents may span slices).
      return_final_state: also return the float32 state after the last token.
      scale: multiplies q; default 1.0 (as in the papers).
      block_size: tokens per block for the block algorithm (a positive power of two); None picks
        the implementation's default. Ignored by "reference" and "recurrent".
      implementation: one of `IMPLEMENTATIONS` ("reference", "recurrent", "xla", "pallas",
        "pallas_triton", "pallas_mosaic"), or None for the best on this platform
        (`default_implementation()`). "pallas" picks a Pallas backend per call
        (`lightning_jax.attention.pallas.choose_backend`).
      config: tuning knobs of the implementation, an instance of its config class:
        `XlaConfig` for "xla", `TritonConfig` for "pallas" and "pallas_triton", `MosaicConfig` for
        "pallas_mosaic" (`IMPLEMENTATIONS[name].config_type`);
        None for its defaults. "reference" and "recurrent" take none.
      interpret: Pallas implementations only: True runs the kernels in Pallas interpret mode (any
        backend, slow), False lowers them for the GPU (also when only lowering on a CPU), None
        interprets when the default backend is not a GPU. Ignored by the others.
      context_axis: context parallelism: the name of a mesh axis over which one sequence is split
        along time, for calls inside `jax.shard_map` (or `pmap`). Device i of that axis (n devices)
        passes its contiguous slice, tokens [i T, (i + 1) T) with T = q.shape[1] (equal slices, any
        length); `rates` and `initial_state` (the state before the sequence's first token) are the
        same on every device. Each device reduces its slice to a local state, ONE all-gather of that
        fp32 [batch, heads, dim_k, dim_v] state per device (whatever the length; (n - 1) x 4 x
        batch x heads x dim_k x dim_v bytes received per device, the backward's reduce-scatter the
        same) gives each device the state entering its slice, and the chosen implementation computes
        the slice from it: o equals the single-device result on the whole sequence, and
        `final_state` is the state after the whole sequence, the same on every device (under
        shard_map's `check_vma` it is typed replicated along the axis, so an out_spec may omit it;
        "pallas" needs `check_vma=False`). Gradients flow as without it. None (default): the whole
        sequence is here. A name not bound here (outside shard_map) raises an error.
        See `context_parallel.py` and docs/lightning-math.md.
      checked: also check the values that argument checks cannot see under `jit`, with JAX's
        `checkify`: rates finite and >= 0, q, k, v and initial_state finite, segment_ids
        non-decreasing, and the outputs finite
        (float16 outputs overflow past 65504, e.g. without decay on long sequences). Off by default
        (it adds reductions over the outputs). Eager calls raise at once; under `jit`, wrap the
        function with `jax.experimental.checkify.checkify` and call `.throw()` on its error::

            f = checkify.checkify(jax.jit(lambda q, k, v, r: lightning_attention(q, k, v, r, checked=True)))
            err, o = f(q, k, v, rates)
            err.throw()   # JaxRuntimeError naming the argument, e.g. "rates: got [-1. ...], expected ..."

    Returns:
      o: [batch, time, heads, dim_v] in q's dtype; or (o, final_state) with final_state float32
      [batch, heads, dim_k, dim_v] when `return_final_state`. Gradients flow to q, k, v and
      initial_state, including from final_state.
    """
    name = implementation if implementation is not None else default_implementation()
    checks.check_choice("implementation", name, IMPLEMENTATIONS)
    impl = IMPLEMENTATIONS[name]
    check_arrays(q, k, v, rates, initial_state)
    if segment_ids is not None:
        segment_ids = check_segment_ids(segment_ids, q.shape[0], q.shape[1])
    return_final_state = checks.check_bool("return_final_state", return_final_state)
    scale = _check_scale(scale)
    checks.check_power_of_two("block_size", block_size, allow_none=True)
    _check_config(name, impl.config_type, config)
    if interpret is not None:
        interpret = checks.check_bool("interpret", interpret)
    if context_axis is not None:
        context_parallel.check_context_axis(context_axis)
    checked = checks.check_bool("checked", checked)
    if checked:
        _checkify_inputs(q, k, v, rates, initial_state)
        if segment_ids is not None:
            _checkify_segment_ids(segment_ids)
    rates = _no_rate_gradient(rates.astype(jnp.float32))
    if initial_state is not None:
        initial_state = initial_state.astype(jnp.float32)
    if context_axis is not None:
        o, final_state = context_parallel.context_parallel_attention(
            impl.load(), q, k, v, rates, initial_state, context_axis=context_axis,
            return_final_state=return_final_state, scale=scale, block_size=block_size, config=config,
            interpret=interpret, segment_ids=segment_ids,
        )
    elif segment_ids is not None:
        o, final_state = impl.load()(
            q, k, v, rates, initial_state, scale=scale, block_size=block_size, config=config, interpret=interpret,
            segment_ids=segment_ids,
        )
    else:
        o, final_state = impl.load()(
            q, k, v, rates, initial_state, scale=scale, block_size=block_size, config=config, interpret=interpret
        )
    if checked:
        _checkify_outputs(o, final_state if return_final_state else None)
    return (o, final_state) if return_final_state else o


# ----------------------------------------------------------------------------------------------
# checked=True: value checks that also work on traced values (JAX's checkify).


def _count_non_finite(x):
    return jnp.sum(~jnp.isfinite(x.astype(jnp.float32)))


def _checkify_inputs(q, k, v, rates, initial_state) -> None:
    from jax.experimental import checkify

    r = rates.astype(jnp.float32)
    checkify.check(jnp.all(jnp.isfinite(r) & (r >= 0)),
                   "rates: got {rates}, expected finite values >= 0 (decay = exp(-rate))", rates=r)
    for name, x in (("q", q), ("k", k), ("v", v), ("initial_state", initial_state)):
        if x is not None:
            checkify.check(_count_non_finite(x) == 0,
                           f"{name}: got {{n}} inf or NaN values of {x.size}, expected finite values",
                           n=_count_non_finite(x))


def _checkify_segment_ids(segment_ids) -> None:
    from jax.experimental import checkify

    falls = jnp.sum(segment_ids[:, 1:] < segment_ids[:, :-1])
    checkify.check(falls == 0, "segment_ids: got {n} decreases along rows, expected non-decreasing ids", n=falls)


def _checkify_outputs(o, final_state) -> None:
    from jax.experimental import checkify

    overflow = ""
    if o.dtype == jnp.float16:
        overflow = (" (float16 holds at most 65504: without decay (rate 0) the outputs grow with the sequence "
                    "length; see docs/lightning-math.md, 'Checked mode and float16')")
    checkify.check(_count_non_finite(o) == 0,
                   f"lightning_attention output o: {{n}} of {o.size} values are inf or NaN{overflow}",
                   n=_count_non_finite(o))
    if final_state is not None:
        checkify.check(_count_non_finite(final_state) == 0,
                       f"lightning_attention final_state: {{n}} of {final_state.size} values are inf or NaN",
                       n=_count_non_finite(final_state))


def _check_config(name: str, config_type, config) -> None:
    if config is None:
        return
    if config_type is None:
        raise checks.ArgumentTypeError(
            "config", f"got {type(config).__name__}, expected None: implementation {name!r} has no tuning knobs"
        )
    if not isinstance(config, config_type) or not dataclasses.is_dataclass(config):
        raise checks.ArgumentTypeError(
            "config", f"got {type(config).__name__}, expected {config_type.__name__} for implementation {name!r}"
        )


# ----------------------------------------------------------------------------------------------
# Rates: no gradient, said loudly.


@jax.custom_jvp
def _no_rate_gradient(rates):
    return rates


def _no_rate_gradient_jvp(primals, tangents):
    (rates,), (tangent,) = primals, tangents
    if isinstance(tangent, custom_derivatives.SymbolicZero):
        return rates, tangent
    raise checks.ArgumentTypeError(
        "rates",
        "lightning_attention has no gradient with respect to the decay rates, but they are being "
        "differentiated. TNL keeps them fixed; if yours depend on something you differentiate, "
        "wrap them in jax.lax.stop_gradient(rates) to say the gradient through them is zero.",
    )


# symbolic_zeros: the rule sees whether rates really carry a tangent, so constants pass untouched.
_no_rate_gradient.defjvp(_no_rate_gradient_jvp, symbolic_zeros=True)


# ----------------------------------------------------------------------------------------------
# Argument checks: each error names the argument, what was received and what was expected.


def _describe(x) -> str:
    return f"shape {tuple(x.shape)} dtype {x.dtype}"


def _bad(field: str, detail: str):
    raise checks.ArgumentError(field, detail)


def _bad_type(field: str, detail: str):
    raise checks.ArgumentTypeError(field, detail)


def _check_floating(name: str, x) -> None:
    if not any(x.dtype == d for d in _FLOAT_DTYPES):
        _bad_type(name, f"got dtype {x.dtype}, expected a floating dtype (float16, bfloat16, float32)")


def _check_is_array(name: str, x) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        _bad_type(name, f"got {type(x).__name__}, expected a jax or numpy array")


def check_arrays(q, k, v, rates, initial_state) -> None:
    """The op's array checks: ranks, dtypes, matching shapes, rates' values when known."""
    for name, x in (("q", q), ("k", k), ("v", v), ("rates", rates)):
        _check_is_array(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            _bad(name, f"got {_describe(x)}, expected rank 4 [batch, time, heads, dim]")
        _check_floating(name, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _bad_type("q, k, v", f"got dtypes {q.dtype}, {k.dtype}, {v.dtype}, expected one dtype for all three")
    batch, time, heads, dim_k = q.shape
    if k.shape != q.shape:
        _bad("k", f"got shape {tuple(k.shape)}, expected q's shape {tuple(q.shape)} [batch, time, heads, dim_k]")
    if v.shape[:3] != q.shape[:3]:
        _bad("v", f"got shape {tuple(v.shape)}, expected [batch, time, heads] = {tuple(q.shape[:3])} "
                  "to match q and k, then dim_v")
    if time == 0:
        _bad("q", f"got time = 0 (shape {tuple(q.shape)}), expected at least one token")
    if 0 in (batch, heads, dim_k, v.shape[3]):
        _bad("q, v", f"got shapes {tuple(q.shape)}, {tuple(v.shape)}, expected no zero-sized dimension")
    check_rates(rates, heads)
    if initial_state is not None:
        check_state("initial_state", initial_state, (batch, heads, dim_k, v.shape[3]))


def check_rates(rates, heads: int) -> None:
    """[heads] floating rates; values >= 0 and finite when known (not traced: traced rates are
    trusted)."""
    _check_is_array("rates", rates)
    if rates.shape != (heads,):
        _bad("rates", f"got shape {tuple(rates.shape)}, expected ({heads},) = [heads]")
    _check_floating("rates", rates)
    try:
        values = np.asarray(rates, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    bad = ~np.isfinite(values) | (values < 0)
    if bad.any():
        _bad("rates", f"got {values.tolist()}, expected finite values >= 0 "
                      f"(decay = exp(-rate)); bad at heads {np.flatnonzero(bad).tolist()}")


def check_state(name: str, state, expected: tuple[int, ...]) -> None:
    """A floating [batch, heads, dim_k, dim_v] state of exactly the `expected` shape."""
    if not hasattr(state, "shape") or tuple(state.shape) != tuple(expected):
        got = _describe(state) if hasattr(state, "shape") else type(state).__name__
        _bad(name, f"got {got}, expected shape {tuple(expected)} = [batch, heads, dim_k, dim_v]")
    _check_floating(name, state)


def check_segment_ids(segment_ids, batch: int, time: int, *, like: str = "q"):
    """[batch, time] integer segment ids, non-decreasing along each row when concrete (traced ids
    are trusted). Returns them as int32. `like`: the argument whose shape gives batch and time (named
    in the error)."""
    _check_is_array("segment_ids", segment_ids)
    if tuple(segment_ids.shape) != (batch, time):
        _bad("segment_ids", f"got {_describe(segment_ids)}, expected shape ({batch}, {time}) = [batch, time] "
                            f"to match {like}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        _bad_type("segment_ids", f"got dtype {segment_ids.dtype}, expected an integer dtype (int32)")
    try:
        values = np.asarray(segment_ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        values = None
    if values is not None:
        if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
            _bad("segment_ids", f"got values in [{values.min()}, {values.max()}], expected int32 values")
        falls = np.diff(values.astype(np.int64), axis=1) < 0
        if falls.any():
            row, col = (int(x[0]) for x in np.nonzero(falls))
            _bad("segment_ids", f"got a decrease in row {row} at time {col + 1} "
                                f"({int(values[row, col])} -> {int(values[row, col + 1])}) (rows "
                                f"{np.flatnonzero(falls.any(axis=1)).tolist()}), expected non-decreasing "
                                "ids along each row (documents packed back to back)")
    return segment_ids.astype(jnp.int32)


def _check_scale(scale) -> float:
    if scale is None:
        return 1.0
    if isinstance(scale, jax.core.Tracer):
        raise checks.ArgumentTypeError("scale", "got a traced value, expected a Python float (it is static)")
    if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer, np.floating)):
        checks.fail("scale", scale, "a Python float", kind=checks.ArgumentTypeError)
    return checks.check_float("scale", scale)
