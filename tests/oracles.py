"""Oracles and comparisons the tests share, written independently of the library."""

from __future__ import annotations

import numpy as np


def recurrence_f64(q, k, v, rates, initial_state=None, scale=1.0):
    """The token recurrence in float64 numpy: (o [batch, time, heads, dim_v], final state)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, time, heads, dim_k = q.shape
    state = (
        np.zeros((batch, heads, dim_k, v.shape[-1]))
        if initial_state is None
        else np.asarray(initial_state, np.float64).copy()
    )
    decay = np.exp(-np.asarray(rates, np.float64))[None, :, None, None]
    out = np.empty((batch, time, heads, v.shape[-1]))
    for t in range(time):
        state = decay * state + k[:, t, :, :, None] * v[:, t, :, None, :]
        out[:, t] = np.einsum("bhd,bhde->bhe", scale * q[:, t], state)
    return out, state


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def rel_err_per_head(x, ref, head_axis) -> float:
    """Worst relative error (in norm) over heads: a fast-decaying head's small outputs are not
    hidden by the large outputs of a head without decay."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    x, ref = np.moveaxis(x, head_axis, 0), np.moveaxis(ref, head_axis, 0)
    return max(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30) for a, b in zip(x, ref))


def segment_ids_from_cuts(batch, time, cuts, seed=0):
    """segment_ids [batch, time]: row r starts documents at the positions in cuts[r] (arbitrary
    non-decreasing ids, gaps in the numbering on purpose: the kernels renumber them)."""
    ids = np.zeros((batch, time), np.int32)
    for r, row_cuts in enumerate(cuts):
        for c in row_cuts:
            ids[r, c:] += 3 + seed
    return ids


def assert_trees_close(actual, expected, rtol):
    """Pytrees of arrays equal leaf by leaf to `rtol` of each expected leaf's largest |value| (1 for
    an all-zero leaf)."""
    import jax

    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = float(np.max(np.abs(e))) or 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=0, atol=rtol * scale)
