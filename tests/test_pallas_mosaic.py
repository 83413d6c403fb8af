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

from oracles import rel_err_per_head as _rel_per_head
from oracles import segment_ids_from_cuts

from lightning_jax.attention import MosaicConfig, TritonConfig, lightning_attention, reference
from lightning_jax.attention.pallas import choose_backend
from lightning_jax.attention.pallas_mosaic.config import (choose_backward, choose_stages, choose_state_split, launch_plan,
                                                          tail_plan)

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
    o, final, states = _run(q, k, v, jnp.array([0.0, 1.0]), s_in, chunk=64, interpret=params)
    assert not gpu_callbacks.get_races().races_found
    assert np.isfinite(np.asarray(states)).all()
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(final)).all()


# Three warpgroups (memory, state, output) and the launch layouts: pieces of a sequence with start
# states from the first kernel and the scan; several rows per program, the loads running ahead
# across rows; one stage, two and three.
@pytest.mark.parametrize(
    "batch,time,pieces,rows,stages",
    [(1, 200, 1, 1, 2), (2, 130, 1, 2, 1), (1, 300, 3, 1, 2), (2, 260, 4, 8, 2), (3, 64, 1, 3, 2),
     (1, 330, 1, 1, 3), (3, 200, 1, 3, 3), (1, 300, 2, 1, 3)],
)
def test_warp_specialized_matches_quadratic(batch, time, pieces, rows, stages):
    q, k, v, s_in = _inputs(batch, time, 2, 64, 128, seed=time)
    _check(q, k, v, jnp.array([0.0, 0.3]), s_in, pieces=pieces, rows_per_program=rows, stages=stages,
           warp_specialized=True)


@pytest.mark.parametrize("pieces,rows", [(2, 1), (3, 2)])
def test_one_warpgroup_pieces_and_rows(pieces, rows):
    q, k, v, s_in = _inputs(2, 250, 2, 64, 64, seed=7)
    _check(q, k, v, jnp.array([0.05, 2.0]), s_in, pieces=pieces, rows_per_program=rows)


def test_warp_specialized_no_races():
    """Shared buffers handed between warpgroups (slots, the bf16 state, o) are never read and
    written at once, and every barrier phase is waited for."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        pytest.skip("private race-detection state of GPU interpret mode moved in this jax")
    params = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
    q, k, v, s_in = _inputs(2, 200, 2, 64, 64, seed=8)
    o, final, states = _run(q, k, v, jnp.array([0.0, 1.0]), s_in, rows_per_program=2, warp_specialized=True,
                            chunk=64, interpret=params)  # chunk states share the state's fp32 buffer
    assert not gpu_callbacks.get_races().races_found
    seg = _segments(2, 200, [[70], [5, 130]], seed=0)  # the segment tables' slots too
    o_seg, _ = _run(q, k, v, jnp.array([0.0, 1.0]), s_in, seg, rows_per_program=2, warp_specialized=True,
                    interpret=params)
    assert not gpu_callbacks.get_races().races_found
    assert np.isfinite(np.asarray(o_seg, np.float32)).all()
    assert np.isfinite(np.asarray(states)).all()
    assert np.isfinite(np.asarray(o, np.float32)).all() and np.isfinite(np.asarray(final)).all()


# Chunk states (the Triton backward's residuals): R^(j) = lambda S before chunk j, written as the
# sweep passes, with every launch layout (one or three warpgroups, pieces, rows).
@pytest.mark.parametrize(
    "batch,time,chunk,kw",
    [(1, 300, 128, dict(warp_specialized=True)), (2, 260, 64, dict(warp_specialized=True, pieces=2, rows_per_program=2)),
     (1, 200, 128, dict(pieces=2)), (2, 64, 64, dict(warp_specialized=True, rows_per_program=2)),
     (1, 300, 128, dict(warp_specialized=True, stages=3))],
)
@pytest.mark.parametrize("initial_state", [False, True])
def test_chunk_states_are_the_prefix_states(batch, time, chunk, kw, initial_state):
    q, k, v, s_in = _inputs(batch, time, 2, 64, 64, seed=time + chunk)
    s_in = s_in if initial_state else None
    rates = jnp.array([0.0, 0.4])
    o, final, states = _run(q, k, v, rates, s_in, chunk=chunk, **kw)
    chunks = -(-time // chunk)
    assert states.shape == (batch, 2, chunks, 64, 64) and states.dtype == jnp.float32
    o_plain, final_plain = _run(q, k, v, rates, s_in, **kw)  # the outputs do not change
    np.testing.assert_array_equal(np.asarray(o, np.float32), np.asarray(o_plain, np.float32))
    np.testing.assert_array_equal(np.asarray(final), np.asarray(final_plain))
    lam = jnp.exp(-rates)[None, :, None, None]
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    for j in range(chunks):
        if j == 0:
            before = jnp.zeros((batch, 2, 64, 64)) if s_in is None else s_in
        else:
            before = reference.quadratic(*(x[:, : j * chunk] for x in up), rates, s_in)[1]
        assert _rel_per_head(states[:, :, j], lam * before, 1) < 1e-2 if j or s_in is not None else \
            not np.asarray(states[:, :, 0]).any()


# The backward as three sweeps of the forward kernels (dQ causal; dK, dV anti-causal, `reverse`).
# (batch, time, dim_k, dim_v, initial state, dL/dS_final, kernel options). GPU interpret mode hangs
# on the three-warpgroup kernel with a 128-wide "q" operand (a limit of the interpreter; the GPU runs
# it), so 128-wide dims go through the one-warpgroup kernel here.
@pytest.mark.parametrize(
    "batch,time,dim_k,dim_v,initial_state,d_final,kw",
    [(1, 150, 64, 64, True, True, {}), (2, 130, 64, 64, False, False, dict(warp_specialized=True, rows_per_program=2)),
     (1, 200, 128, 64, True, False, dict(pieces=2)), (1, 64, 64, 128, False, True, dict(warp_specialized=True)),
     (2, 1, 64, 64, True, True, {}),
     # pieces in all three sweeps; the last piece ends in a whole padding block (260 tokens: blocks
     # 0-2 and 3-5, block 4 holds 4 tokens, block 5 none)
     (1, 260, 64, 64, True, True, dict(pieces=2))],
)
def test_backward_matches_the_oracle_gradients(batch, time, dim_k, dim_v, initial_state, d_final, kw):
    from lightning_jax.attention.pallas_mosaic import backward

    keys = jax.random.split(jax.random.PRNGKey(time), 6)
    q, k = (jax.random.normal(key, (batch, time, 2, dim_k)).astype(jnp.bfloat16) for key in keys[:2])
    v, d_o = (jax.random.normal(key, (batch, time, 2, dim_v)).astype(jnp.bfloat16) for key in keys[2:4])
    s_in = jax.random.normal(keys[4], (batch, 2, dim_k, dim_v)) if initial_state else None
    d_f = jax.random.normal(keys[5], (batch, 2, dim_k, dim_v)) if d_final else None
    rates = jnp.array([0.0, 0.3])
    jax.block_until_ready((q, k, v, d_o, s_in, d_f))  # nothing else in flight while interpreting
    got = jax.block_until_ready(backward(q, k, v, rates, s_in, d_o, d_f, scale=0.5, interpret=INTERPRET, **kw))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, final), vjp = jax.vjp(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s, scale=0.5), *up, s_in)
    want = vjp((d_o.astype(jnp.float32), jnp.zeros_like(final) if d_f is None else d_f))
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape and a.dtype == (jnp.float32 if name == "d_initial_state" else jnp.bfloat16), name
        assert _rel_per_head(a, b, 2 if name != "d_initial_state" else 1) < 1e-2, name


@pytest.mark.parametrize("time,pieces,initial_state,kw", [
    (260, 2, True, {}),  # the last piece ends in a whole padding block
    (330, 4, False, dict(warp_specialized=True)),  # 6 blocks: 3 pieces of 2, a ragged last block
    (200, 4, True, dict(rows_per_program=2)),  # 4 blocks: 4 pieces of one, two per program
])
def test_reverse_sweep_in_pieces_matches_one_piece(time, pieces, initial_state, kw):
    """The anti-causal sweep cut into pieces (a first kernel sums each piece but the first, a scan
    from the last piece to the first links them) gives the one-piece sweep's outputs and state."""
    q, k, v, s_in = _inputs(1, time, 2, 64, 64, seed=time)
    rates = jnp.array([0.001, 0.01])  # slow decays: every piece's start state matters
    s_in = s_in if initial_state else None
    o1, g1 = _run(q, k, v, rates, s_in, reverse=True, scale=0.5)
    op, gp = _run(q, k, v, rates, s_in, reverse=True, scale=0.5, pieces=pieces, **kw)
    assert _rel_per_head(op, o1, 2) < 1e-2
    assert _rel_per_head(gp, g1, 1) < 1e-4  # fp32 sums in another order


# A tail: the last heads in a second launch, cut into pieces, writing into the first launch's o.
@pytest.mark.parametrize("time,tail_heads,tail_pieces,initial_state,kw", [
    (330, 1, 2, True, dict(warp_specialized=True)),  # 6 blocks, a ragged last one: 2 pieces of 3
    (260, 2, 4, False, {}),  # one warpgroup; pieces of 2 blocks, the last one padding only
    (200, 2, 2, True, dict(warp_specialized=True, state_split=2)),  # the first kernel's sums in sub-pieces
])
def test_tail_matches_quadratic(time, tail_heads, tail_pieces, initial_state, kw):
    """Every head's output and final state, the tail's and the others', match the quadratic form
    (o is one buffer both launches write into)."""
    q, k, v, s_in = _inputs(1, time, 3, 64, 64, seed=time + 1)
    rates = jnp.array([0.3, 0.001, 0.01])  # slow decays in the tail: its pieces' start states matter
    _check(q, k, v, rates, s_in if initial_state else None, tail_heads=tail_heads, tail_pieces=tail_pieces, **kw)


def test_reverse_sweep_and_backward_with_a_tail():
    """The anti-causal sweep with a tail gives the one-launch sweep's outputs and state, and the
    backward with a tail in its three sweeps the oracle's gradients."""
    from lightning_jax.attention.pallas_mosaic import backward

    q, k, v, s_in = _inputs(1, 330, 3, 64, 64, seed=11)
    rates = jnp.array([0.001, 0.3, 0.01])
    o1, g1 = _run(q, k, v, rates, s_in, reverse=True, scale=0.5)
    o2, g2 = _run(q, k, v, rates, s_in, reverse=True, scale=0.5, tail_heads=2, tail_pieces=2, warp_specialized=True)
    assert _rel_per_head(o2, o1, 2) < 1e-2
    assert _rel_per_head(g2, g1, 1) < 1e-4
    keys = jax.random.split(jax.random.PRNGKey(12), 2)
    d_o = jax.random.normal(keys[0], v.shape).astype(jnp.bfloat16)
    d_f = jax.random.normal(keys[1], s_in.shape)
    jax.block_until_ready((d_o, d_f))
    got = jax.block_until_ready(backward(q, k, v, rates, s_in, d_o, d_f, scale=0.5, interpret=INTERPRET,
                                         tail_heads=1, tail_pieces=2, warp_specialized=True))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    _, vjp = jax.vjp(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s, scale=0.5), *up, s_in)
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state"), got, vjp((d_o.astype(jnp.float32), d_f))):
        assert _rel_per_head(a, b, 2 if name != "d_initial_state" else 1) < 1e-2, name


def test_tail_under_vmap():
    """vmap over the kernels with a tail (o is a mutable buffer inside): each slice is the
    one-launch result."""
    q, k, v, _ = _inputs(1, 200, 3, 64, 64, seed=3)
    rates = jnp.array([0.3, 0.001, 0.01])
    qs, ks, vs = (jnp.stack([x, x[:, ::-1]]) for x in (q, k, v))
    tail = lambda q, k, v: forward(q, k, v, rates, tail_heads=1, tail_pieces=2, warp_specialized=True,
                                   interpret=INTERPRET)
    got = jax.block_until_ready(jax.vmap(tail)(qs, ks, vs))
    for i in range(2):
        o, final = _run(qs[i], ks[i], vs[i], rates, warp_specialized=True)
        assert _rel_per_head(got[0][i], o, 2) < 1e-2 and _rel_per_head(got[1][i], final, 1) < 1e-4


def test_tail_refuses_what_it_cannot_run():
    q, k, v, _ = _inputs(1, 256, 2, 64, 64)
    rates = jnp.zeros((2,))
    for kw, what in [(dict(tail_heads=2, tail_pieces=2), "tail_heads=2"), (dict(tail_heads=1, tail_pieces=1), "tail_pieces=1"),
                     (dict(tail_heads=1, tail_pieces=2, pieces=2), "pieces=2"),
                     (dict(tail_heads=1, tail_pieces=2, chunk=64), "chunk=64")]:
        with pytest.raises(ValueError, match=f"tail_heads must be in 1 .. heads - 1 .*{what}"):
            forward(q, k, v, rates, interpret=INTERPRET, **kw)


@pytest.mark.parametrize("time,reverse,kw", [
    (1000, False, {}),  # 16 blocks, the last ragged: 2 pieces of 8, the first summed as 2 sub-pieces of 4
    (900, True, {}),  # 15 real blocks and one of padding: the reverse first kernel sums the last piece in 2
    (2048, False, dict(warp_specialized=True, rows_per_program=2)),  # 4 pieces of 8 blocks, split 2
])
def test_state_split_matches_no_split(time, reverse, kw):
    """With pieces, the first kernel's sums in sub-pieces (state_split) give the same outputs and
    state as whole pieces (slow decays: every sub-piece's weight matters)."""
    q, k, v, s_in = _inputs(1, time, 2, 64, 64, seed=time)
    rates = jnp.array([0.002, 0.02])
    pieces = 4 if time == 2048 else 2
    o1, s1 = _run(q, k, v, rates, s_in, reverse=reverse, pieces=pieces, **kw)
    o2, s2 = _run(q, k, v, rates, s_in, reverse=reverse, pieces=pieces, state_split=2, **kw)
    assert _rel_per_head(o2, o1, 2) < 1e-2
    assert _rel_per_head(s2, s1, 1) < 1e-4


def _segments(batch, time, cuts, seed):
    return jnp.asarray(segment_ids_from_cuts(batch, time, cuts, seed))


# Documents starting inside a block, exactly at a block's first token, in the last ragged block,
# at the second token; one document per row; several rows per program.
@pytest.mark.parametrize("batch,time,cuts,kw", [
    (1, 200, [[30, 64, 190]], {}),
    (2, 130, [[1, 100], []], dict(rows_per_program=2)),
    (1, 64, [[63]], dict(stages=1)),
])
@pytest.mark.parametrize("initial_state", [False, True])
def test_segments_match_the_oracle(batch, time, cuts, kw, initial_state):
    """Packed documents: outputs and final state as reference.quadratic(segment_ids=) defines them."""
    q, k, v, s_in = _inputs(batch, time, 2, 64, 64, seed=time)
    s_in = s_in if initial_state else None
    seg = _segments(batch, time, cuts, seed=1)
    rates = jnp.array([0.01, 0.3])
    o, final = _run(q, k, v, rates, s_in, seg, warp_specialized=True, **kw)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want_o, want_final = reference.quadratic(*up, rates, s_in, segment_ids=seg)
    assert _rel_per_head(o, want_o, 2) < 1e-2
    assert _rel_per_head(final, want_final, 1) < 1e-2


# Pieces and a tail with documents: the piece links carry a state only across pieces without a
# document start. 330 tokens are 6 blocks: 3 pieces of 128 tokens (the last ragged), or 2 of 192.
@pytest.mark.parametrize("time,cuts,kw", [
    (330, [[100, 192]], dict(pieces=3)),  # a start inside the first and inside the second piece
    (330, [[128]], dict(pieces=3)),  # exactly at a piece's first token
    (330, [[127, 129]], dict(pieces=3)),  # at a piece's last token, and at its second
    (330, [[5]], dict(pieces=2)),  # every piece after the first inside one document
    (330, [[64, 65, 300]], dict(tail_heads=2, tail_pieces=3)),  # the tail's pieces
    (1000, [[300, 700]], dict(pieces=2, state_split=2)),  # pieces of 8 blocks: documents sum them whole
])
def test_segments_with_pieces_match_the_oracle(time, cuts, kw):
    q, k, v, s_in = _inputs(1, time, 3, 64, 64, seed=5)
    rates = jnp.array([0.001, 0.3, 0.01])  # slow decays: the carried states matter
    seg = _segments(1, time, cuts, seed=1)
    o, final = _run(q, k, v, rates, s_in, seg, warp_specialized=True, **kw)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want_o, want_final = reference.quadratic(*up, rates, s_in, segment_ids=seg)
    assert _rel_per_head(o, want_o, 2) < 1e-2
    assert _rel_per_head(final, want_final, 1) < 1e-2
    o1, g1 = _run(q, k, v, rates, s_in, seg, warp_specialized=True, reverse=True)  # the anti-causal sweep
    o2, g2 = _run(q, k, v, rates, s_in, seg, warp_specialized=True, reverse=True, **kw)
    assert _rel_per_head(o2, o1, 2) < 1e-2
    assert _rel_per_head(g2, g1, 1) < 1e-4


@pytest.mark.parametrize("time,cuts,initial_state,d_final,kw", [
    (200, [[30, 64, 190]], True, True, {}),  # the last document starts in the last, ragged block
    (130, [[64]], False, True, {}),
    (150, [[1, 149]], True, False, {}),
    (330, [[100, 257]], True, True, dict(pieces=3)),  # documents with pieces in all three sweeps
    (330, [[128]], True, True, dict(tail_heads=1, tail_pieces=2)),
])
def test_segments_backward_matches_the_oracle_gradients(time, cuts, initial_state, d_final, kw):
    from lightning_jax.attention.pallas_mosaic import backward

    keys = jax.random.split(jax.random.PRNGKey(time + 1), 6)
    q, k, v, d_o = (jax.random.normal(key, (1, time, 2, 64)).astype(jnp.bfloat16) for key in keys[:4])
    s_in = jax.random.normal(keys[4], (1, 2, 64, 64)) if initial_state else None
    d_f = jax.random.normal(keys[5], (1, 2, 64, 64)) if d_final else None
    seg = _segments(1, time, cuts, seed=0)
    rates = jnp.array([0.0, 0.3])
    jax.block_until_ready((q, k, v, d_o, s_in, d_f, seg))
    got = backward(q, k, v, rates, s_in, d_o, d_f, seg, scale=0.5, warp_specialized=True, interpret=INTERPRET, **kw)
    got = jax.block_until_ready(got)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, final), vjp = jax.vjp(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s, scale=0.5, segment_ids=seg),
                              *up, s_in)
    want = vjp((d_o.astype(jnp.float32), jnp.zeros_like(final) if d_f is None else d_f))
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state"), got, want):
        if b is None:
            assert a is None, name
            continue
        assert _rel_per_head(a, b, 2 if name != "d_initial_state" else 1) < 1e-2, name


def test_segments_refuse_chunk_states():
    q, k, v, _ = _inputs(1, 512, 1, 64, 64)
    seg = jnp.zeros((1, 512), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids need warp_specialized=True and no chunk states"):
        forward(q, k, v, jnp.zeros((1,)), None, seg, chunk=128, warp_specialized=True, interpret=INTERPRET)
    with pytest.raises(ValueError, match="segment_ids need warp_specialized=True"):
        forward(q, k, v, jnp.zeros((1,)), None, seg, warp_specialized=False, interpret=INTERPRET)
    with pytest.raises(ValueError, match="segment_ids: expected shape"):
        forward(q, k, v, jnp.zeros((1,)), None, seg[:, :10], warp_specialized=True, interpret=INTERPRET)


def test_launch_plan():
    """About one program per SM: pieces below half the SMs; from there two pieces for rows of 128
    blocks or more while that still fits the SMs, whole sequences otherwise; rows per program when
    many; always a power-of-two piece count, >= 4 blocks per piece, and rows dividing batch x
    pieces."""
    assert launch_plan(1, 65536, 16, 128, 132) == (4, 1)  # 32 programs
    assert launch_plan(1, 16384, 16, 128, 132) == (4, 1)  # 32 programs
    assert launch_plan(2, 16384, 16, 128, 132) == (2, 1)  # 64 programs, 256 blocks: two pieces fill the SMs
    assert launch_plan(3, 16384, 11, 128, 132) == (2, 1)  # 66 programs: 132 with two pieces
    assert launch_plan(3, 16384, 12, 128, 132) == (1, 1)  # 72 programs: two pieces would not fit
    assert launch_plan(2, 8192, 16, 128, 132) == (2, 1)  # 128 blocks
    assert launch_plan(2, 8128, 16, 128, 132) == (1, 1)  # 127 blocks: whole rows
    assert launch_plan(1, 16384, 29, 128, 132) == (2, 1)  # 58 programs: just below half
    assert launch_plan(64, 1024, 16, 128, 132) == (1, 16)  # 2,048 programs
    assert launch_plan(4, 16384, 16, 128, 132) == (1, 1)  # 128 programs: full
    assert launch_plan(1, 100, 1, 64, 132) == (1, 1)  # 2 blocks: too short to cut
    for batch, time, heads, dim_v in [(3, 5000, 2, 64), (5, 70000, 1, 256), (7, 64, 40, 128), (1, 1, 1, 64)]:
        pieces, rows = launch_plan(batch, time, heads, dim_v, 132)
        assert pieces & (pieces - 1) == 0 and (pieces == 1 or -(-time // 64) // pieces >= 4)
        assert (batch * pieces) % rows == 0


def test_tail_plan():
    """Where whole rows leave a last wave of programs under half full, its heads run after the
    others, cut into the most pieces (a power of two, at most 4) that fill one wave."""
    assert tail_plan(1, 8192, 96, 128, 1, 1, 132) == (30, 2)  # 192 programs: 66 heads whole, 30 in halves
    assert tail_plan(1, 8192, 72, 128, 1, 1, 132) == (6, 4)  # 144: 12 left over, 4 pieces at most
    assert tail_plan(2, 8192, 48, 128, 1, 1, 132) == (15, 2)
    assert tail_plan(1, 8192, 130, 128, 1, 1, 132) == (0, 1)  # 260: the second wave 128 of 132
    assert tail_plan(4, 16384, 16, 128, 1, 1, 132) == (0, 1)  # 128: one wave
    assert tail_plan(1, 2048, 96, 128, 1, 1, 132) == (0, 1)  # 32 blocks: rows too short
    assert tail_plan(1, 8192, 96, 128, 2, 1, 132) == (0, 1)  # pieces already
    assert tail_plan(64, 8192, 3, 128, 1, 2, 132) == (0, 1)  # rows grouped
    for batch, time, heads, dim_v in [(1, 8192, 70, 128), (3, 5000, 33, 64), (1, 70000, 140, 256), (2, 9000, 67, 128)]:
        tail_heads, tail_pieces = tail_plan(batch, time, heads, dim_v, 1, 1, 132)
        per_head = batch * -(-dim_v // 64)
        if tail_heads:  # the other heads fill whole waves as far as whole heads can; the tail's pieces fit in one
            whole, waves = (heads - tail_heads) * per_head, heads * per_head // 132
            assert whole <= waves * 132 < whole + per_head and tail_heads * per_head * tail_pieces <= 132
            assert 2 <= tail_pieces <= 4 and tail_pieces & (tail_pieces - 1) == 0


def test_stages_and_state_split_choices():
    """Three stages where the three-warpgroup kernels run whole sequences compiled, two elsewhere;
    with pieces, the first kernel split to about two programs per SM."""
    assert choose_stages(1, 128, True, True) == 3
    assert choose_stages(4, 128, True, True) == 2  # pieces
    assert choose_stages(1, 192, True, True) == 2  # shared memory
    assert choose_stages(1, 128, False, True) == 2  # interpret mode: no operands from registers
    assert choose_stages(1, 64, True, False) == 2  # one warpgroup
    assert choose_state_split(1, 16, 128, 4, 132) == 2  # 128 programs in the output pass -> 256
    assert choose_state_split(2, 16, 128, 2, 132) == 2
    assert choose_state_split(1, 8, 128, 8, 132) == 2
    assert choose_state_split(1, 1, 64, 4, 132) == 66
    assert choose_state_split(4, 16, 128, 1, 132) == 1  # no pieces, nothing to split


def test_op_passes_its_choices_to_the_kernels(monkeypatch):
    """The op runs its forward and the Mosaic backward's sweeps with the chosen stages and split
    (three stages without pieces, two with); an explicit MosaicConfig.stages reaches both."""
    from lightning_jax.attention.pallas_mosaic import op as mosaic_op

    seen = []
    for name in ("forward", "backward"):
        kernel = getattr(mosaic_op, name)
        monkeypatch.setattr(mosaic_op, name, lambda *a, _k=kernel, _n=name, **kw: (seen.append((_n, kw)), _k(*a, **kw))[1])

    def trace(shape, config=None, lower=False):
        seen.clear()
        q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        rates = jnp.zeros((shape[2],))
        op = lambda q: lightning_attention(q, q, q, rates, implementation="pallas_mosaic", interpret=False,
                                           config=config).astype(jnp.float32).sum()
        traced = jax.jit(jax.grad(op)).trace(q)
        if lower:  # the three-stage forward and sweeps lower for sm_90 together
            assert traced.lower(lowering_platforms=("cuda",)).as_text().count("mosaic_gpu") >= 4
        return {name: (kw["stages"], kw["pieces"], kw["state_split"]) for name, kw in seen}

    assert trace((1, 256, 128, 64), lower=True) == {"forward": (3, 1, 1), "backward": (3, 1, 1)}  # 128 programs
    assert trace((1, 256, 128, 64), MosaicConfig(stages=2)) == {"forward": (2, 1, 1), "backward": (2, 1, 1)}
    assert trace((1, 256, 128, 64), MosaicConfig(stages=1)) == {"forward": (1, 1, 1), "backward": (1, 1, 1)}
    assert trace((1, 4096, 16, 64), MosaicConfig(backward="mosaic")) == {  # 16 programs: 8 pieces
        "forward": (2, 8, 2), "backward": (2, 8, 2)}
    # Half the SMs (64 programs): whole sequences; the Mosaic backward with short rows only.
    assert trace((2, 2048, 16, 128)) == {"forward": (3, 1, 1), "backward": (3, 1, 1)}  # 32 blocks
    assert trace((2, 2112, 16, 128)) == {"forward": (3, 1, 1)}  # 33 blocks: the Triton backward


def test_op_plans_a_tail(monkeypatch):
    """192 programs on 132 SMs: the op runs the last 30 heads in halves in the forward and in the
    backward's sweeps (which lower for sm_90, o an aliased buffer the second launch writes into: the
    dQ sweep's, and the dV and dK sweeps' where the fused dK/dV sweep, which has no tail, is off);
    not in sweeps of another tile count, not with MosaicConfig(tail_pieces=1), and the forward for
    the Triton backward (which writes chunk states) runs without one."""
    from lightning_jax.attention.pallas_mosaic import op as mosaic_op

    seen = []
    for name in ("forward", "backward"):
        kernel = getattr(mosaic_op, name)
        monkeypatch.setattr(mosaic_op, name, lambda *a, _k=kernel, _n=name, **kw: (seen.append((_n, kw)), _k(*a, **kw))[1])

    def trace(shape, dim_v=None, config=None, aliases=0):
        seen.clear()
        q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        v = jax.ShapeDtypeStruct((*shape[:3], dim_v or shape[3]), jnp.bfloat16)
        rates = jnp.zeros((shape[2],))
        op = lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", interpret=False,
                                                 config=config).astype(jnp.float32).sum()
        traced = jax.jit(jax.grad(op, (0, 1, 2))).trace(q, q, v)
        if aliases:
            assert traced.lower(lowering_platforms=("cuda",)).as_text().count("output_operand_aliases") == aliases
        return {name: (kw.get("tail_heads", 0), kw.get("tail_pieces", 1), kw.get("chunk")) for name, kw in seen}

    assert trace((1, 4096, 96, 128), aliases=1) == {"forward": (30, 2, None), "backward": (30, 2, None)}
    assert trace((1, 4096, 96, 128), config=MosaicConfig(fused_dkdv=False), aliases=2) == {
        "forward": (30, 2, None), "backward": (30, 2, None)}
    assert trace((1, 4096, 96, 64), dim_v=128) == {"forward": (30, 2, None), "backward": (0, 1, None)}
    assert trace((1, 4096, 96, 128), config=MosaicConfig(tail_pieces=1)) == {"forward": (0, 1, None),
                                                                            "backward": (0, 1, None)}
    assert trace((1, 4096, 96, 128), config=MosaicConfig(tail_pieces=4)) == {"forward": (30, 4, None),
                                                                            "backward": (30, 4, None)}
    (tail_heads, tail_pieces, chunk), = trace((1, 4096, 96, 128), config=MosaicConfig(backward="triton")).values()
    assert (tail_heads, tail_pieces) == (0, 1) and chunk  # the forward with chunk states, in one launch
    assert trace((1, 2048, 96, 128)) == {"forward": (0, 1, None), "backward": (0, 1, None)}  # rows too short


def _op(q, k, v, rates, s_in, **kw):
    return lightning_attention(q, k, v, rates, initial_state=s_in, return_final_state=True,
                               implementation="pallas_mosaic", interpret=True, **kw)


def test_op_with_pieces_and_state_split():
    """MosaicConfig(pieces=, state_split=) reaches the kernels: the op's output and final state
    match the oracle."""
    q, k, v, s_in = _inputs(1, 1000, 2, 64, 64, seed=11)
    rates = jnp.array([0.002, 0.05])
    o, final = jax.block_until_ready(_op(q, k, v, rates, s_in, config=MosaicConfig(pieces=2, state_split=2)))
    want_o, want_final = reference.quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), rates, s_in)
    assert _rel_per_head(o, want_o, 2) < 1e-2 and _rel_per_head(final, want_final, 1) < 1e-2


# (time, initial state, the Triton plan's chunk): two chunks and an initial state; three chunks from
# a zero state; one chunk from a zero state (the backward then needs no chunk states).
@pytest.mark.parametrize("time,initial_state,chunk", [(100, True, 64), (300, False, 128), (60, False, 64)])
def test_op_forward_and_gradients(time, initial_state, chunk):
    """The op runs the Mosaic forward, under jax.vjp too (writing the Triton backward's chunk
    states); its gradients (Triton backward kernels) match the oracle's, initial state included."""
    q, k, v, s_in = _inputs(1, time, 2, 64, 64, seed=9)
    s_in = s_in if initial_state else None
    rates = jnp.array([0.0, 0.5])
    config = MosaicConfig(gradients=TritonConfig(chunk=chunk))
    o, final = jax.block_until_ready(_op(q, k, v, rates, s_in, config=config))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want_o, want_final = reference.quadratic(*up, rates, s_in)
    assert _rel_per_head(o, want_o, 2) < 1e-2 and _rel_per_head(final, want_final, 1) < 1e-2

    d_o = jax.random.normal(jax.random.PRNGKey(1), o.shape)
    d_final = jax.random.normal(jax.random.PRNGKey(2), final.shape)

    def grads(fn, *args):
        (o, final), vjp = jax.vjp(fn, *args)
        return vjp((d_o.astype(o.dtype), d_final))

    got = grads(lambda q, k, v, s: _op(q, k, v, rates, s, config=config), q, k, v, s_in)
    want = grads(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s), *up, s_in)
    for name, a, b in zip(("dq", "dk", "dv", "d_initial_state"), got, want):
        if b is None:  # no initial state
            assert a is None
            continue
        assert a.shape == b.shape, name
        err = np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)) / np.linalg.norm(np.asarray(b))
        assert err < 2e-2, (name, err)


def test_op_refuses_what_it_does_not_cover():
    q, k, v, s_in = _inputs(1, 8, 1, 64, 64)
    rates = jnp.zeros((1,))
    seg = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ValueError, match="segment_ids: got segment ids with interpret mode"):
        _op(q, k, v, rates, None, segment_ids=seg)  # _op interprets
    compiled = dict(implementation="pallas_mosaic", interpret=False, segment_ids=seg)
    for config in (MosaicConfig(backward="triton"), MosaicConfig(gradients=TritonConfig())):
        with pytest.raises(ValueError, match="segment_ids: got segment ids with MosaicConfig"):
            lightning_attention(q, k, v, rates, config=config, **compiled)
    wide = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="v: got dim_v 256 with segment ids"):
        lightning_attention(q, k, wide, rates, **compiled)
    with pytest.raises(ValueError, match="block_size: got 128"):
        _op(q, k, v, rates, None, block_size=128)
    with pytest.raises(ValueError, match="q: got dtype float32"):
        _op(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), rates, None)
    wide = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    with pytest.raises(ValueError, match="q: got dim_k 256, expected <= 128"):
        _op(wide, wide, v, rates, None)
    with pytest.raises(TypeError, match="config: got TritonConfig, expected MosaicConfig"):
        _op(q, k, v, rates, None, config=TritonConfig())


@pytest.mark.parametrize(
    "field,value,match",
    [("stages", 4, "MosaicConfig.stages"), ("pieces", 0, "MosaicConfig.pieces: got 0"),
     ("rows_per_program", 1.5, "MosaicConfig.rows_per_program"), ("warp_specialized", 1, "warp_specialized"),
     ("gradients", {}, "MosaicConfig.gradients: got dict"), ("backward", "xla", "MosaicConfig.backward"),
     ("state_split", 0, "MosaicConfig.state_split: got 0")],
)
def test_config_checks(field, value, match):
    with pytest.raises(ValueError, match=match):
        MosaicConfig(**{field: value})


def test_three_stages_need_three_warpgroups():
    with pytest.raises(ValueError, match="MosaicConfig.stages: got 3 with warp_specialized=False"):
        MosaicConfig(stages=3, warp_specialized=False)
    with pytest.raises(ValueError, match="stages=3 needs warp_specialized=True"):
        q = jnp.zeros((1, 64, 1, 64), jnp.bfloat16)
        forward(q, q, q, jnp.zeros((1,)), stages=3, interpret=INTERPRET)
    assert MosaicConfig(stages=3).stages == 3


def test_pallas_chooses_mosaic_where_it_covers_the_call():
    hopper = dict(interpret=False, capability="9.0", sm_count=132)
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16, **hopper) == "mosaic"  # 256 programs
    assert choose_backend((16, 4096, 8, 64), 64, jnp.float16, block_size=64, **hopper) == "mosaic"  # 128
    assert choose_backend((2, 16384, 16, 128), 128, jnp.bfloat16, **hopper) == "mosaic"  # 64 programs: half
    assert choose_backend((1, 16384, 29, 128), 128, jnp.bfloat16, **hopper) == "triton"  # 58: pieces
    assert choose_backend((1, 16384, 16, 128), 128, jnp.bfloat16, **hopper) == "triton"  # 32
    assert choose_backend((1, 65536, 16, 128), 128, jnp.bfloat16, **hopper) == "mosaic"  # 32, long rows: pieces
    assert choose_backend((1, 65536 - 64, 16, 128), 128, jnp.bfloat16, **hopper) == "triton"  # one block short
    assert choose_backend((1, 131072, 8, 128), 128, jnp.bfloat16, **hopper) == "triton"  # 16 programs
    assert choose_backend((1, 65536, 24, 128), 128, jnp.bfloat16, **hopper) == "triton"  # 48: 2 pieces
    assert choose_backend((1, 65536, 16, 128), 128, jnp.bfloat16, segments=True, **hopper) == "triton"
    assert choose_backend((2, 16384, 16, 128), 128, jnp.bfloat16, segments=True, **hopper) == "triton"  # not full
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16, interpret=False, capability="8.0",
                          sm_count=108) == "triton"
    assert choose_backend((2, 4096, 64, 128), 128, jnp.float32, **hopper) == "triton"
    assert choose_backend((2, 4096, 64, 256), 256, jnp.bfloat16, **hopper) == "triton"
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16, segments=True, **hopper) == "mosaic"
    assert choose_backend((2, 4096, 64, 128), 256, jnp.bfloat16, segments=True, **hopper) == "triton"  # dim_v
    assert choose_backend((2, 4096, 64, 128), 256, jnp.bfloat16, **hopper) == "mosaic"
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16, block_size=128, **hopper) == "triton"
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16, interpret=True, capability="9.0",
                          sm_count=132) == "triton"
    # Without a GPU (this machine): Triton, also when only lowering for one.
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16) == "triton"
    assert choose_backend((2, 4096, 64, 128), 128, jnp.bfloat16, interpret=False) == "triton"


def _lower(time, dim_k, dim_v, initial_state, **kw):
    q = jax.ShapeDtypeStruct((1, time, 2, dim_k), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, time, 2, dim_v), jnp.bfloat16)
    rates = jax.ShapeDtypeStruct((2,), jnp.float32)
    s_in = jax.ShapeDtypeStruct((1, 2, dim_k, dim_v), jnp.float32) if initial_state else None
    fn = lambda q, k, v, r, s: forward(q, k, v, r, s, interpret=False, **kw)
    return jax.jit(fn).trace(q, q, v, rates, s_in).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
    "time,dim_k,dim_v,initial_state,kw",
    [(130, 64, 64, True, {}), (64, 128, 256, False, {}), (4096, 128, 128, True, dict(warp_specialized=True, pieces=4)),
     (1000, 128, 64, False, dict(warp_specialized=True, rows_per_program=2)),
     (500, 192, 64, True, dict(stages=1)), (4096, 128, 128, True, dict(warp_specialized=True, pieces=4, chunk=1024)),
     (1000, 64, 64, False, dict(chunk=256)),
     (4096, 128, 128, True, dict(warp_specialized=True, scores_in_registers=True)),
     (4096, 128, 128, False, dict(warp_specialized=True, scores_in_registers=True, pieces=4, chunk=1024)),
     (4096, 128, 128, True, dict(warp_specialized=True, scores_in_registers=False, update_in_registers=False)),
     (4096, 128, 128, True, dict(warp_specialized=True, update_in_registers=True, chunk=1024)),
     (500, 192, 64, True, dict(warp_specialized=True, stages=1, update_in_registers=True, reverse=True)),
     (4096, 128, 128, True, dict(warp_specialized=True, pieces=4, state_split=4, reverse=True)),
     (4096, 128, 128, True, dict(warp_specialized=True, stages=3)),
     (1000, 128, 64, False, dict(warp_specialized=True, stages=3, rows_per_program=2, chunk=256)),
     (777, 64, 256, True, dict(warp_specialized=True, stages=3, pieces=2, state_split=2))],
)
def test_cross_lowers_for_sm90(time, dim_k, dim_v, initial_state, kw):
    """Layout inference, the Mosaic GPU dialect lowering and the shared-memory check run on a CPU
    (every variant the op uses: three warpgroups, pieces with the first kernel, rows, dim_k 192)."""
    assert "mosaic_gpu" in _lower(time, dim_k, dim_v, initial_state, **kw)


def test_choose_backward():
    """The Mosaic backward without pieces, with dim_v in its limit, and on a full grid or short rows;
    Triton otherwise."""
    args = dict(stages=2, sm_count=132)
    assert choose_backward(4, 16384, 16, 128, 1, **args) == "mosaic"  # 128 programs: full
    assert choose_backward(8, 4096, 16, 64, 1, **args) == "mosaic"
    # pieces: the fused dK/dV sweep in pieces wins; three sweeps in pieces read twice and lose
    assert choose_backward(1, 65536, 16, 128, 4, **args) == "mosaic"
    assert choose_backward(1, 65536, 16, 128, 4, **args, fused=False) == "triton"
    assert choose_backward(1, 65536, 16, 128, 4, **args, dim_k=192) == "triton"  # the fused sweep: dims <= 128
    assert choose_backward(4, 16384, 16, 256, 1, **args) == "triton"  # dim_v past the sweeps' shared memory
    assert choose_backward(4, 16384, 16, 192, 1, stages=1, sm_count=132) == "mosaic"
    assert choose_backward(4, 16384, 16, 256, 1, stages=1, sm_count=132) == "triton"
    assert choose_backward(2, 2048, 16, 128, 1, **args) == "mosaic"  # 64 programs, 32 blocks: short rows
    assert choose_backward(2, 2049, 16, 128, 1, **args) == "triton"  # 33 blocks on a half-filled grid
    assert choose_backward(2, 8128, 16, 128, 1, **args) == "triton"  # 127 blocks: the fused sweep runs whole
    assert choose_backward(2, 16384, 16, 128, 2, **args) == "mosaic"  # 256 blocks: the fused sweep in 4 pieces


def _gradient_text(config, time=256):
    q = jax.ShapeDtypeStruct((1, time, 2, 64), jnp.bfloat16)
    rates = jnp.array([0.1, 0.2])
    op = lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", interpret=False,
                                             config=config)
    loss = lambda q, k, v: op(q, k, v).astype(jnp.float32).sum()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        return jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()


def test_op_chooses_the_backward():
    """MosaicConfig(backward=None): the Mosaic backward without pieces; the Triton one with pieces
    (4 pieces asked for) or with a TritonConfig for the gradients."""
    assert "triton" not in _gradient_text(None)
    assert "triton" in _gradient_text(MosaicConfig(pieces=4), time=1024)
    assert "triton" in _gradient_text(MosaicConfig(gradients=TritonConfig()))


def test_pallas_takes_the_mosaic_backward_unless_given_a_triton_config(monkeypatch):
    """Where "pallas" picks the Mosaic kernels, its gradients are the Mosaic backward's; a
    TritonConfig (which tunes the Triton kernels) pins the Triton backward. choose_backend is
    forced to "mosaic": without a GPU it always answers "triton"."""
    from lightning_jax.attention import pallas

    monkeypatch.setattr(pallas, "choose_backend", lambda *a, **k: "mosaic")
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    rates = jnp.array([0.1, 0.2])
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")

    def gradient_text(config, segment_ids=None):
        op = lambda q, k, v: pallas.lightning_attention_pallas(q, k, v, rates, None, config=config, interpret=False,
                                                               segment_ids=segment_ids)
        loss = lambda q, k, v: op(q, k, v)[0].astype(jnp.float32).sum()  # (o, final state)
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
            return jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()

    default = gradient_text(None)
    assert "mosaic_gpu" in default and "triton" not in default
    assert "triton" in gradient_text(TritonConfig())
    # Packed documents: Mosaic both ways (forward and three sweeps); with a TritonConfig, Triton both ways.
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 64)[None]
    documents = gradient_text(None, seg)
    assert documents.count("mosaic_gpu") >= 4 and "triton" not in documents
    assert "tensor<1x4x5x64xf32>" in documents  # the segment tables (kernels.segment_tables) reach the kernels
    documents = gradient_text(TritonConfig(), seg)
    assert "triton" in documents and "mosaic_gpu" not in documents


def test_op_cross_lowers_with_segment_ids():
    """Packed documents through the op: the Mosaic forward and, for gradients, the Mosaic backward
    only (the segment tables ride along), with the pieces the launch plan cuts (2 heads: 4 programs)
    and with a tail (96 heads: 192 programs)."""
    # Under grad the forward is not needed and the dV and dK sweeps share one function: the dQ sweep and
    # that function hold 2 kernels each with pieces (the first kernel and the output pass). With a tail
    # the dQ sweep holds 3, and dK and dV come from the fused sweep (96 programs: config.choose_fused_dkdv).
    for shape, kernels in (((1, 4096, 2, 64), 4), ((1, 4096, 96, 128), 4)):
        q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
        seg = jax.ShapeDtypeStruct(shape[:2], jnp.int32)
        rates = jnp.linspace(0.1, 0.2, shape[2])
        op = lambda q, k, v, seg: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", interpret=False,
                                                      segment_ids=seg)
        loss = lambda q, k, v, seg: op(q, k, v, seg).astype(jnp.float32).sum()
        text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q, seg).lower(lowering_platforms=("cuda",)).as_text()
        assert text.count("mosaic_gpu_v2") == kernels and "triton" not in text


def test_op_cross_lowers_with_triton_gradients():
    """The op's primal lowers to the Mosaic kernel; its gradient to the Mosaic forward (with chunk
    states) and the Triton backward kernels."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    rates = jnp.array([0.1, 0.2])
    op = lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", interpret=False,
                                             config=MosaicConfig(backward="triton"))
    forward_text = jax.jit(op).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in forward_text and "triton" not in forward_text
    loss = lambda q, k, v: op(q, k, v).astype(jnp.float32).sum()
    # Triton's lowering asks for a GPU's facts: an abstract H100 stands in for one.
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "triton" in text and "mosaic_gpu" in text


def test_op_cross_lowers_with_the_mosaic_backward():
    """MosaicConfig(backward="mosaic"): the gradient program is Mosaic GPU kernels only."""
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
    rates = jnp.array([0.1, 0.2])
    config = MosaicConfig(backward="mosaic")
    op = lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", interpret=False,
                                             config=config)
    loss = lambda q, k, v: op(q, k, v).astype(jnp.float32).sum()
    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "triton" not in text
    # Pieces in the reverse sweeps too (their first kernel and the link scan).
    from lightning_jax.attention.pallas_mosaic import backward

    long = jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.bfloat16)
    s = jax.ShapeDtypeStruct((1, 2, 64, 64), jnp.float32)
    grads = lambda q, k, v, d_o, s_in, d_f: backward(q, k, v, rates, s_in, d_o, d_f, pieces=4, interpret=False)
    text = jax.jit(grads).trace(long, long, long, long, s, s).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("mosaic_gpu") >= 5  # dQ, dV and dK sweeps, and two reverse first kernels
    wide = jnp.zeros((1, 8, 1, 256), jnp.bfloat16)
    narrow = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="v: got dim_v 256, expected <= 128 for the Mosaic backward"):
        lightning_attention(narrow, narrow, wide, jnp.zeros((1,)), implementation="pallas_mosaic", config=config)


@pytest.mark.parametrize("backward", ["triton", "mosaic"])
def test_context_parallel_cross_lowers(backward):
    """context_axis= (one sequence over two devices) runs the Mosaic kernels on each slice: the
    gradient program has the Mosaic kernels, the states' all-gather, and the Triton kernels only
    with the Triton backward."""
    from tests.test_pallas import _H100

    axis = "context"
    mesh = jax.sharding.AbstractMesh((2,), (axis,), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=_H100)
    tokens = jax.P(None, axis)
    rates = jnp.array([0.1, 0.2])

    def per_device(q, k, v, s0):
        return lightning_attention(q, k, v, rates, initial_state=s0, return_final_state=True, context_axis=axis,
                                   implementation="pallas_mosaic", interpret=False,
                                   config=MosaicConfig(backward=backward))

    split = jax.shard_map(per_device, mesh=mesh, in_specs=(tokens,) * 3 + (jax.P(),), out_specs=(tokens, jax.P()),
                          check_vma=False)

    def loss(q, k, v, s0):
        o, final = split(q, k, v, s0)
        return o.astype(jnp.float32).sum() + final.sum()

    q = jax.ShapeDtypeStruct((1, 512, 2, 64), jnp.bfloat16)
    s0 = jax.ShapeDtypeStruct((1, 2, 64, 64), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, (0, 1, 2, 3))).trace(q, q, q, s0).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text and "all_gather" in text
    assert ("triton" in text) == (backward == "triton")


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
    with pytest.raises(ValueError, match="scores_in_registers needs"):
        forward(q, k, v, rates, warp_specialized=True, scores_in_registers=True, interpret=INTERPRET)
