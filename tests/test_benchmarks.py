"""The GPU benchmark's own pieces on CPU, so that a device call is never spent on a broken script:
the chunked reference that the GPU check trusts, and one check case end to end (Pallas kernels in
interpret mode)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import attention as bench  # noqa: E402

from lightning_jax.attention import reference  # noqa: E402


def test_chunked_reference_matches_quadratic():
    # 2 whole chunks of 512 and a tail of 76: the carried state must join them exactly.
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    shape = (2, 1100, 3, 8)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
    s_in = jax.random.normal(keys[3], (2, 3, 8, 8), jnp.float32)
    rates = jnp.array([0.0, 0.5, 0.01], jnp.float32)
    o, s = bench.chunked_reference(q, k, v, rates, s_in)
    o_ref, s_ref = reference.quadratic(q, k, v, rates, s_in)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)


def test_check_case_passes_on_cpu():
    errs, finite = bench.check_one(600, 16, jnp.bfloat16, seed=3)
    assert finite
    assert set(errs) == {"o", "final_state", "dq", "dk", "dv", "d_initial_state"}
    assert max(errs.values()) <= bench.TOLERANCE["bfloat16"], errs
    assert min(errs.values()) > 0  # bf16 inputs against an fp32 reference: never exact


def test_kernels_script_runs_on_cpu(monkeypatch):
    # benchmarks/kernels_pallas.py end to end at a tiny shape with several chunks (interpret mode),
    # each call run once instead of timed: its arrays must fit the kernels' current signatures.
    import kernels_pallas

    monkeypatch.setattr(kernels_pallas, "time_jax", lambda fn, sets: 0.0)
    monkeypatch.setattr(kernels_pallas, "SCANS", dict(list(kernels_pallas.SCANS.items())[:2]))
    monkeypatch.setattr(kernels_pallas, "STATES", dict(list(kernels_pallas.STATES.items())[:2]))
    res = kernels_pallas.time_kernels((1, 512, 2, 16))
    assert len(res) == 2 * 2 + 2, res
    for row in res.values():
        assert np.isfinite(row["rel_err"]) and row["rel_err"] < 1e-5, res
