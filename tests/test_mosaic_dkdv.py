"""The fused dK/dV sweep of the Mosaic backward (`pallas_mosaic/dkdv.py`) on CPU: GPU interpret
mode against the oracle's gradients (its staged form; the register form runs on the GPU only and
is checked there, docs/kernels.md), the race detector, cross-lowering for sm_90 (both forms: the
shared-memory budget is checked there), and the op's choice of it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from oracles import rel_err_per_head as _rel_per_head
from oracles import segment_ids_from_cuts

from lightning_jax import checks
from lightning_jax.attention import MosaicConfig, lightning_attention, reference
from lightning_jax.attention.pallas_mosaic.config import choose_fused_dkdv, dkdv_plan

plgpu = pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
if not hasattr(plgpu, "InterpretGPUParams"):
    pytest.skip("this jax has no Mosaic GPU interpret mode (plgpu.InterpretGPUParams)", allow_module_level=True)

from lightning_jax.attention.pallas_mosaic import backward
from lightning_jax.attention.pallas_mosaic.dkdv import dkdv


def _inputs(batch, time, heads, dim_k, dim_v, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q, k = (jax.random.normal(key, (batch, time, heads, dim_k)).astype(jnp.bfloat16) for key in keys[:2])
    v, d_o = (jax.random.normal(key, (batch, time, heads, dim_v)).astype(jnp.bfloat16) for key in keys[2:4])
    s_in = jax.random.normal(keys[4], (batch, heads, dim_k, dim_v))
    d_final = jax.random.normal(keys[5], (batch, heads, dim_k, dim_v))
    return jax.block_until_ready((q, k, v, d_o, s_in, d_final))  # nothing in flight while interpreting


def _oracle(q, k, v, d_o, rates, s_in, d_final, scale):
    """(dq, dk, dv, dL/dS_in) of the fp32 quadratic form."""
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, final), vjp = jax.vjp(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s, scale=scale), *up, s_in)
    return vjp((d_o.astype(jnp.float32), jnp.zeros_like(final) if d_final is None else d_final))


# (batch, time, dim_k, dim_v, dL/dS_final, rows per program, rates, pieces): one token; a block
# exactly; ragged last blocks (130: 2 tokens, 200: 8); dim_k != dim_v both ways; 128-wide dims; two
# sequences a program; no decay, fast decay, and a rate that zeroes all but the nearest tokens;
# pieces (330 tokens: 3 pieces of 2 blocks, a ragged last block; 260: 2 pieces of 3, the last
# ending in a whole padding block, two rows a program).
@pytest.mark.parametrize("batch,time,dim_k,dim_v,d_final,rows,rates,pieces", [
    (1, 1, 64, 64, True, 1, (0.0, 0.3), 1),
    (1, 64, 64, 128, True, 1, (0.1, 2.0), 1),
    (2, 130, 128, 64, False, 2, (0.0, 0.3), 1),
    (1, 200, 64, 64, True, 1, (0.05, 30.0), 1),
    (3, 150, 128, 128, True, 3, (0.2, 0.0), 1),
    (1, 330, 64, 64, True, 1, (0.0, 0.3), 3),
    (2, 260, 64, 128, False, 2, (0.05, 1.0), 2),
])
def test_matches_the_oracle_gradients(batch, time, dim_k, dim_v, d_final, rows, rates, pieces):
    """dK, dV and G (dL/dS_in = lambda G) against the fp32 quadratic form's gradients, on fresh inputs."""
    q, k, v, d_o, s_in, d_f = _inputs(batch, time, 2, dim_k, dim_v, seed=time + dim_k)
    d_f = d_f if d_final else None
    rates = jnp.array(rates)
    got_dk, got_dv, g = jax.block_until_ready(
        dkdv(q, k, v, d_o, rates, d_f, scale=0.5, pieces=pieces, rows_per_program=rows, interpret=True))
    _, want_dk, want_dv, want_ds = _oracle(q, k, v, d_o, rates, s_in, d_f, 0.5)
    assert got_dk.shape == k.shape and got_dv.shape == v.shape and got_dk.dtype == got_dv.dtype == jnp.bfloat16
    assert g.shape == s_in.shape and g.dtype == jnp.float32
    assert _rel_per_head(got_dk, want_dk, 2) < 1e-2
    assert _rel_per_head(got_dv, want_dv, 2) < 1e-2
    assert _rel_per_head(jnp.exp(-rates)[None, :, None, None] * g, want_ds, 1) < 1e-2


def test_backward_with_the_fused_sweep():
    """`backward(fused=...)`: the dQ sweep and the fused one (here in 2 pieces, under a dQ sweep of
    one) give all four gradients."""
    q, k, v, d_o, s_in, d_f = _inputs(2, 300, 2, 64, 64, seed=7)
    rates = jnp.array([0.02, 0.4])
    fused = backward(q, k, v, rates, s_in, d_o, d_f, warp_specialized=True, fused=(2, 1, 2), interpret=INTERPRET)
    want = _oracle(q, k, v, d_o, rates, s_in, d_f, 1.0)
    for name, a, b, axis in zip(("dq", "dk", "dv", "d_initial_state"), fused, want, (2, 2, 2, 1)):
        assert _rel_per_head(a, b, axis) < 1e-2, name


INTERPRET = plgpu.InterpretGPUParams()


# Packed documents: starting inside a block, at a block's first token, in the last ragged block, at
# the second token; with pieces, inside a piece, at a piece's first token, and every piece after the
# first inside one document; two rows a program with a row of one document.
@pytest.mark.parametrize("batch,time,cuts,pieces,rows,d_final", [
    (1, 200, [[30, 64, 190]], 1, 1, True),
    (2, 130, [[1, 100], []], 1, 2, True),
    (1, 330, [[100, 128, 257]], 3, 1, True),
    (1, 330, [[5]], 2, 1, False),
])
def test_segments_match_the_oracle_gradients(batch, time, cuts, pieces, rows, d_final):
    """dK, dV and dL/dS_in with segment ids, as reference.quadratic(segment_ids=) defines them:
    attention within a document, dL/dS_final reaching the last document only."""
    q, k, v, d_o, s_in, d_f = _inputs(batch, time, 2, 64, 64, seed=time + pieces)
    d_f = d_f if d_final else None
    seg = jnp.asarray(segment_ids_from_cuts(batch, time, cuts))
    rates = jnp.array([0.001, 0.3])  # a slow decay: the carried G matters
    got_dk, got_dv, g = jax.block_until_ready(
        dkdv(q, k, v, d_o, rates, d_f, seg, scale=0.5, pieces=pieces, rows_per_program=rows, interpret=True))
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, final), vjp = jax.vjp(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s, scale=0.5, segment_ids=seg),
                              *up, s_in)
    _, want_dk, want_dv, want_ds = vjp((d_o.astype(jnp.float32), jnp.zeros_like(final) if d_f is None else d_f))
    assert _rel_per_head(got_dk, want_dk, 2) < 1e-2
    assert _rel_per_head(got_dv, want_dv, 2) < 1e-2
    assert _rel_per_head(jnp.exp(-rates)[None, :, None, None] * g, want_ds, 1) < 1e-2


def test_no_races():
    """The interpreter's race detector over a sweep of several blocks and two rows a program
    (the single bf16 G buffer, its union with the fp32 G, and the mask's with the dK, dV staging)."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
    except ImportError:
        pytest.skip("private race-detection state of GPU interpret mode moved in this jax")
    q, k, v, d_o, _, d_f = _inputs(2, 200, 1, 64, 64, seed=3)
    params = plgpu.InterpretGPUParams(detect_races=True, uninitialized_memory="nan")
    out = jax.block_until_ready(dkdv(q, k, v, d_o, jnp.array([0.1]), d_f, rows_per_program=2, interpret=params))
    assert not gpu_callbacks.get_races().races_found
    assert all(np.isfinite(np.asarray(x, np.float32)).all() for x in out)


@pytest.mark.parametrize("time,dim_k,dim_v,d_final,rows,registers", [
    (4096, 128, 128, True, 1, True), (1000, 128, 64, False, 2, True), (777, 64, 128, True, 1, True),
    (1000, 64, 64, True, 2, False),
])
@pytest.mark.parametrize("segments", [False, True])
def test_cross_lowers_for_sm90(time, dim_k, dim_v, d_final, rows, registers, segments):
    """Layout inference, the dialect lowering and the shared-memory check (dims 128 fill 212 KB)."""
    q = jax.ShapeDtypeStruct((2, time, 2, dim_k), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((2, time, 2, dim_v), jnp.bfloat16)
    rates = jax.ShapeDtypeStruct((2,), jnp.float32)
    d_f = jax.ShapeDtypeStruct((2, 2, dim_k, dim_v), jnp.float32) if d_final else None
    seg = jax.ShapeDtypeStruct((2, time), jnp.int32) if segments else None
    fn = lambda q, k, v, d_o, r, d_f, s: dkdv(q, k, v, d_o, r, d_f, s, rows_per_program=rows, registers=registers)
    text = jax.jit(fn).trace(q, q, v, v, rates, d_f, seg).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_refuses_what_it_cannot_run():
    q = jnp.zeros((2, 64, 1, 64), jnp.bfloat16)
    rates = jnp.array([0.1])
    with pytest.raises(ValueError, match="dims must be <= 128"):
        dkdv(jnp.zeros((1, 64, 1, 192), jnp.bfloat16), jnp.zeros((1, 64, 1, 192), jnp.bfloat16), q[:1], q[:1], rates)
    with pytest.raises(ValueError, match="rows_per_program must divide batch"):
        dkdv(q, q, q, q, rates, rows_per_program=3)
    with pytest.raises(ValueError, match="segment_ids: expected shape"):
        dkdv(q, q, q, q, rates, None, jnp.zeros((2, 63), jnp.int32), interpret=True)
    with pytest.raises(ValueError, match="registers=True needs interpret=False"):
        dkdv(q, q, q, q, rates, interpret=True, registers=True)


def test_plan_and_choice():
    """dkdv_plan: rows per program keep a full grid; below DKDV_GRID, long rows go in pieces; dims
    over 128 cannot run. choose_fused_dkdv: grids of at least 0.7 x the SMs' programs, pieces, or
    dim_v 64 where the two sweeps run whole rows too (their grid is then no larger)."""
    assert dkdv_plan(64, 1024, 16, 128, 128, 132) == (1, 8, 1)  # 1,024 programs -> 128
    assert dkdv_plan(16, 4096, 16, 128, 128, 132) == (1, 2, 1)
    assert dkdv_plan(1, 8192, 96, 128, 128, 132) == (1, 1, 1)  # 96 programs: whole rows
    assert dkdv_plan(4, 16384, 16, 128, 128, 132)[:2] == (2, 1)  # 64 programs of 256 blocks: 2 pieces
    assert dkdv_plan(1, 65536, 16, 128, 128, 132)[:2] == (8, 1)
    assert dkdv_plan(4, 8128, 16, 128, 128, 132)[:2] == (1, 1)  # 127 blocks: whole
    assert dkdv_plan(4, 16384, 16, 128, 192, 132) is None
    assert choose_fused_dkdv(1, 96, 128, 1, 1, 132)  # 96 programs: measured 1.28x faster (docs/kernels.md)
    assert not choose_fused_dkdv(4, 16, 128, 1, 1, 132)  # 64 programs of short rows
    assert not choose_fused_dkdv(1, 92, 128, 1, 1, 132)  # under 0.7 x 132
    assert choose_fused_dkdv(8, 8, 64, 1, 1, 132)  # dim 64: 1.10x
    assert not choose_fused_dkdv(1, 2, 64, 1, 16, 132)  # dim 64, but the sweeps run 16 pieces: 16x the programs
    assert choose_fused_dkdv(4, 16, 128, 2, 1, 132)  # pieces
    with pytest.raises(checks.ArgumentTypeError, match="fused_dkdv"):
        MosaicConfig(fused_dkdv="yes")


def _gradient_custom_calls(config, shape=(8, 256, 16, 64), segment_ids=None):
    """The Mosaic kernels in the op's lowered gradient (its forward is not needed for it: dropped)."""
    q = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    rates = jnp.linspace(0.1, 0.2, shape[2])
    op = lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", interpret=False,
                                             config=config, segment_ids=segment_ids)
    loss = lambda q, k, v: op(q, k, v).astype(jnp.float32).sum()
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=h100)):
        text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    return text.count("custom_call @mosaic_gpu")


def test_op_takes_the_fused_sweep_where_chosen():
    """128 programs: dQ and the fused sweep (two kernels); fused_dkdv=False: the dQ, dV, dK sweeps."""
    assert _gradient_custom_calls(None) == 2
    assert _gradient_custom_calls(MosaicConfig(fused_dkdv=True)) == 2
    assert _gradient_custom_calls(MosaicConfig(fused_dkdv=False)) == 3
    assert _gradient_custom_calls(None, shape=(2, 256, 16, 128)) == 3  # 32 programs of 4 blocks: no pieces
    # 2 x 8,192 x 16: the Mosaic backward (no longer Triton) with the dQ sweep in the forward's 2
    # pieces and the fused sweep in 4, each a first kernel and a sweep
    assert _gradient_custom_calls(None, shape=(2, 8192, 16, 128)) == 4
    seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 64)[None].repeat(8, 0)  # packed documents
    assert _gradient_custom_calls(None, segment_ids=seg) == 2
    assert _gradient_custom_calls(MosaicConfig(fused_dkdv=False), segment_ids=seg) == 3
