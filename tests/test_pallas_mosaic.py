"""The Pallas Mosaic GPU (Hopper) forward on CPU: GPU interpret mode against the quadratic oracle,
the interpreter's race detector, and cross-lowering for sm_90.

GPU interpret mode (`plgpu.InterpretGPUParams`) simulates shared memory, TMA, barriers and wgmma
with the very kernel body; cross-lowering runs the Mosaic GPU layout inference and dialect lowering
(and the shared-memory budget check), which interpret mode does not. Shapes stay tiny: each
interpreted call takes about a second on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax.attention import reference

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpret mode (plgpu.InterpretGPUParams)", allow_module_level=True)

from lightning_jax.attention.pallas_mosaic import forward

INTERPRET = plgpu.InterpretGPUParams()


def _run(*args, interpret=INTERPRET, **kw):
    """The interpreted kernel, waited for before anything else is dispatched.

    On jax 0.11.2 the interpreter's host callbacks themselves run jax ops (e.g. `wait_smem_to_gmem`
    compares a jax array); if the main thread has meanwhile dispatched another computation (the
    oracle), XLA:CPU can queue the callback's op behind it while it waits for the kernel: a
    deadlock (seen under CPU contention). Blocking here avoids it."""
    return jax.block_until_ready(forward(*args, interpret=interpret, **kw))


def _inputs(batch, time, heads, dim_k, dim_v, dtype=jnp.bfloat16, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, time, heads, dim_k)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, time, heads, dim_k)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, time, heads, dim_v)).astype(dtype)
    s_in = jax.random.normal(keys[3], (batch, heads, dim_k, dim_v))
    return q, k, v, s_in


def _rel_per_head(x, ref, head_axis):
    """Worst relative error over heads: a fast-decaying head's small outputs are not hidden by the
    large outputs of a head without decay."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    x, ref = np.moveaxis(x, head_axis, 0), np.moveaxis(ref, head_axis, 0)
    errs = [np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) for a, b in zip(x, ref)]
    return max(errs)


def _check(q, k, v, rates, s_in, *, tol=1e-2, **kw):
    o, final = _run(q, k, v, rates, s_in, **kw)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want_o, want_final = reference.quadratic(*up, rates, s_in, scale=kw.get("scale", 1.0))
    assert o.dtype == q.dtype and o.shape == v.shape
    assert final.dtype == jnp.float32 and final.shape == (q.shape[0], q.shape[2], q.shape[3], v.shape[3])
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(final)).all()
    err_o, err_s = _rel_per_head(o, want_o, 2), _rel_per_head(final, want_final, 1)
    assert err_o < tol, ("o", err_o)
    assert err_s < tol, ("final_state", err_s)
    return o, final


# 1 and 63: shorter than a block; 64: exactly one; 130 and 200: ragged last blocks (2 and 8 tokens).
@pytest.mark.parametrize("time", [1, 63, 64, 130, 200])
@pytest.mark.parametrize("initial_state", [False, True])
def test_matches_quadratic(time, initial_state):
    q, k, v, s_in = _inputs(1, time, 2, 64, 64)
    _check(q, k, v, jnp.array([0.0, 8.0]), s_in if initial_state else None)


@pytest.mark.parametrize("rates", [(0.3, 0.02), (0.0, 0.0), (20.0, 1e-4)])
def test_rates(rates):
    q, k, v, s_in = _inputs(1, 150, 2, 64, 64, seed=1)
    _check(q, k, v, jnp.array(rates), s_in)


def test_batch_value_tiles_padded_key_dim_float16_scale():
    """batch 2, dim_v 128 (two value tiles), dim_k 32 (zero-padded to 64), float16, scale."""
    q, k, v, s_in = _inputs(2, 70, 2, 32, 128, dtype=jnp.float16, seed=2)
    _check(q, k, v, jnp.array([0.5, 0.0]), s_in, scale=0.125)


def test_block_128():
    q, k, v, s_in = _inputs(1, 200, 2, 64, 64, seed=3)
    _check(q, k, v, jnp.array([0.05, 2.0]), s_in, block=128)


def test_split_sequence_continuity():
    """Two calls chained through the state equal one call on the whole sequence."""
    q, k, v, _ = _inputs(1, 150, 2, 64, 64, seed=4)
    rates = jnp.array([0.1, 0.0])
    o, final = _run(q, k, v, rates)
    o1, s1 = _run(q[:, :70], k[:, :70], v[:, :70], rates)
    o2, s2 = _run(q[:, 70:], k[:, 70:], v[:, 70:], rates, s1)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([o1, o2], 1), np.float32), np.asarray(o, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.abs(o.astype(jnp.float32)).max()))
    assert _rel_per_head(s2, final, 1) < 1e-3


def test_no_races_and_no_uninitialised_reads():
    """The interpreter's race detector (shared memory, TMA, wgmma) finds nothing; uninitialised
    memory reads as NaN, so the finite-output checks would catch a read of unwritten memory."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        pytest.skip("private race-detection state of GPU interpret mode moved in this jax")
    params = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
    q, k, v, s_in = _inputs(1, 130, 2, 64, 64, seed=5)
    o, final = _run(q, k, v, jnp.array([0.0, 1.0]), s_in, interpret=params)
    assert not gpu_callbacks.get_races().races_found
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(final)).all()


def _lower(time, dim_k, dim_v, initial_state, **kw):
    q = jax.ShapeDtypeStruct((1, time, 2, dim_k), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, time, 2, dim_v), jnp.bfloat16)
    rates = jax.ShapeDtypeStruct((2,), jnp.float32)
    s_in = jax.ShapeDtypeStruct((1, 2, dim_k, dim_v), jnp.float32) if initial_state else None
    fn = lambda q, k, v, r, s: forward(q, k, v, r, s, interpret=False, **kw)
    return jax.jit(fn).trace(q, q, v, rates, s_in).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("time,dim_k,dim_v,initial_state", [(130, 64, 64, True), (64, 128, 256, False)])
def test_cross_lowers_for_sm90(time, dim_k, dim_v, initial_state):
    """Layout inference, the Mosaic GPU dialect lowering and the shared-memory check run on a CPU."""
    assert "mosaic_gpu" in _lower(time, dim_k, dim_v, initial_state)


def test_cross_lowering_checks_shared_memory():
    with pytest.raises(ValueError, match="shared memory"):
        _lower(64, 1024, 64, False)


def test_rejects_bad_arguments():
    q, k, v, _ = _inputs(1, 8, 1, 64, 64)
    rates = jnp.zeros((1,))
    with pytest.raises(ValueError, match="16-bit"):
        forward(q.astype(jnp.float32), k, v, rates, interpret=INTERPRET)
    with pytest.raises(ValueError, match="multiple of 64"):
        forward(q, k, v, rates, block=32, interpret=INTERPRET)
    with pytest.raises(ValueError, match="rates"):
        forward(q, k, v, jnp.zeros((2,)), interpret=INTERPRET)
