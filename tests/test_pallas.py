"""The Pallas (Triton) kernels on CPU: interpret mode against the quadratic oracle, and CUDA lowering.

Interpret mode runs the very kernel bodies (slow: shapes stay small). Small `TritonConfig`s force the
multi-chunk path (chunk-state kernel, scans over chunks) and several column tiles per kernel (key
tiles for dQ/dK, value tiles for o/dV) at these sizes. Cross-lowering for an abstract H100 runs the Pallas-to-Triton lowering, which interpret mode
does not check (power-of-two values, supported primitives).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lightning_jax.attention import TritonConfig, XlaConfig, lightning_attention, recurrent, reference
from lightning_jax.attention.pallas_triton import config as triton_config, lightning_attention_triton, plan_for, states

RATES = (0.0, 8.0, 0.3, 0.02)
# Chunks of 32 tokens made of blocks of 16, column tiles of 16: every kernel and both scans run.
SMALL = TritonConfig(
    block=16, bwd_block=16, chunk=32, min_programs=10**6, block_v=16, bwd_tile=16, scan_tile=64,
    state_block=32, state_tile=16,
)


def _inputs(time, heads, dim_k, dim_v, dtype, seed, batch=1):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    q = jax.random.normal(keys[0], (batch, time, heads, dim_k)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, time, heads, dim_k)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, time, heads, dim_v)).astype(dtype)
    s_in = jax.random.normal(keys[3], (batch, heads, dim_k, dim_v))
    d_o = jax.random.normal(keys[4], (batch, time, heads, dim_v)).astype(dtype)
    d_final = jax.random.normal(keys[5], (batch, heads, dim_k, dim_v))
    return q, k, v, s_in, d_o, d_final


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30)


def _outputs_and_grads(fn, q, k, v, s_in, d_o, d_final):
    """(o, final_state, dq, dk, dv[, d_s_in]) with cotangents on both outputs."""
    args = (q, k, v) if s_in is None else (q, k, v, s_in)
    (o, final), vjp = jax.vjp(fn, *args)
    return (o, final, *vjp((d_o.astype(o.dtype), d_final)))


def _compare(time, dim_k, dim_v, dtype, *, initial_state, config, scale=1.0, seed=0, batch=1):
    heads = len(RATES)
    rates = jnp.array(RATES, jnp.float32)
    q, k, v, s_in, d_o, d_final = _inputs(time, heads, dim_k, dim_v, dtype, seed, batch)
    s_in = s_in if initial_state else None

    def ours(q, k, v, s=None):
        return lightning_attention_triton(q, k, v, rates, s, scale=scale, config=config, interpret=True)

    def ref(q, k, v, s=None):
        return reference.quadratic(q, k, v, rates, s, scale=scale)

    got = jax.jit(lambda *a: _outputs_and_grads(ours, *a))(q, k, v, s_in, d_o, d_final)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want = _outputs_and_grads(ref, *up, s_in, d_o.astype(jnp.float32), d_final)
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    assert got[0].shape == (batch, time, heads, dim_v) and got[1].shape == (batch, heads, dim_k, dim_v)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    names = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert np.isfinite(np.asarray(a, np.float32)).all(), name
        assert _rel(a, b) < tol, (name, _rel(a, b))


# Times around the block (16) and chunk (32): 1, block - 1, block, block + 1, odd, chunk + 1, 3 chunks.
@pytest.mark.parametrize("time", [1, 15, 16, 17, 33, 70])
def test_matches_quadratic_multi_chunk(time):
    _compare(time, 16, 16, jnp.float32, initial_state=True, config=SMALL)


@pytest.mark.parametrize(
    "dim_k, dim_v",
    [(24, 16), (16, 48), (48, 24)],  # non-powers of two: padded to 32 / 64 and masked
)
def test_non_power_of_two_dims(dim_k, dim_v):
    _compare(37, dim_k, dim_v, jnp.float32, initial_state=True, config=SMALL, seed=1)


def test_without_initial_state_and_scale():
    _compare(40, 16, 32, jnp.float32, initial_state=False, config=SMALL, scale=0.5, seed=2, batch=2)


def test_bfloat16():
    _compare(50, 32, 32, jnp.bfloat16, initial_state=True, config=SMALL, seed=3)


def test_backward_in_separate_launches():
    # fuse_backward=False runs dQ, dK and dV as three launches of the same kernel bodies.
    config = dataclasses.replace(SMALL, fuse_backward=False)
    _compare(41, 24, 40, jnp.float32, initial_state=True, config=config, seed=8)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("chunks, group", [(37, 16), (32, 8), (5, 16), (2, 16)])
def test_scan_over_chunks_matches_recurrence(reverse, chunks, group):
    # Whole steps of G chunks and the rows left over (36 rows = 2 x 16 + 4), whole steps only, rows
    # left over only, a single row (two chunks); a ragged last chunk; rate 0 among the heads.
    config = dataclasses.replace(SMALL, scan_group=group)
    time, heads, dk, dv = 32 * chunks - 5, len(RATES), 16, 8
    plan = plan_for((2, time, heads, dk), dv, jnp.float32, config=config, interpret=True)
    n = plan.num_chunks
    assert n == chunks
    rng = np.random.default_rng(9)
    # N - 1 rows: U_0 .. U_(N-2) forward, Y_1 .. Y_(N-1) reverse (see _scan_kernel).
    x = rng.standard_normal((2 * heads, n - 1, dk, dv)).astype(np.float32)
    init = rng.standard_normal((2 * heads, dk, dv)).astype(np.float32)
    rates = np.tile(np.array(RATES), 2)
    args = (jnp.asarray(x), jnp.asarray(init), jnp.asarray(RATES, jnp.float32))
    got = np.asarray(states.scan(plan, *args, reverse=reverse))
    decay = np.exp(-rates[:, None, None] * np.clip(time - 1 - 32 * np.arange(n), 0, 32)[None, :, None])
    terms = np.zeros((2 * heads, n, dk, dv))  # chunk j's term at index j; the unused one stays 0
    if reverse:
        terms[:, 1:] = x
    else:
        terms[:, :-1] = x
    want = np.zeros((2 * heads, n, dk, dv))
    want[:, n - 1 if reverse else 0] = init
    for j in (range(n - 2, -1, -1) if reverse else range(1, n)):
        src = j + 1 if reverse else j - 1
        want[:, j] = decay[:, src, :, None] * want[:, src] + terms[:, src]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("dim", [16, 48, 64, 100, 128, 192, 256])
def test_chunk_state_tiling_fits(dtype, dim):
    # The default TritonConfig's chunk-state tiling at every dim and dtype: its block divides the chunk
    # and the pipelined operands fit the shared-memory budget (Triton fails to compile otherwise,
    # which only a GPU would show); wide rows keep the forward's tiling.
    for time in (3000, 65536):
        plan = plan_for((1, time, 16, dim), dim, dtype, interpret=True)
        tiling = plan.for_chunk_states()
        assert plan.chunk % tiling.block == 0 and tiling.dv_pad % tiling.tile == 0
        if plan.row_bytes >= triton_config.WIDE_ROW_BYTES:
            assert tiling == plan
            continue
        stages = tiling.num_stages
        smem = (stages * (tiling.dk_pad + tiling.tile) + tiling.tile) * tiling.block * tiling.itemsize
        assert smem <= plan.facts.smem_budget == 192 * 1024, (dtype, dim, tiling.block, smem)


@pytest.mark.parametrize(
    "shape",
    [(1, 65536, 16, 128), (4, 16384, 16, 128), (1, 8192, 96, 128), (8, 1024, 8, 64), (64, 1024, 16, 128),
     (1, 100_000, 2, 32), (3, 5000, 5, 256), (1, 4096, 4, 128), (2, 63, 3, 48)],
)
def test_chunk_rule(shape):
    # The default TritonConfig's chunks: the whole sequence when (value tiles, batch, heads) reach
    # min_programs; else the longest power-of-two chunk up to config.chunk whose programs reach
    # chunk_programs (floored at two blocks), so that a longer chunk would fall short of them.
    cfg = TritonConfig()
    plan = plan_for(shape, shape[-1], jnp.bfloat16, config=cfg, interpret=True)
    min_programs, chunk_programs = cfg.resolved_min_programs(plan.facts), cfg.resolved_chunk_programs(plan.facts)
    assert (min_programs, chunk_programs) == (264, 512)  # Hopper's 132 SMs: one wave, two waves to a power of 2
    batch, time, heads, _ = shape
    per_chunk = plan.num_tiles("v") * batch * heads
    whole = 1 << (time - 1).bit_length()
    step = max(plan.block, plan.for_backward().block)
    assert plan.chunk & (plan.chunk - 1) == 0 and plan.chunk % step == 0
    if per_chunk >= min_programs:
        assert plan.chunk >= time and plan.num_chunks == 1
        return
    assert plan.chunk <= max(cfg.chunk, 2 * step)
    longer = 2 * plan.chunk
    if plan.chunk < min(cfg.chunk, whole):  # it was shortened: a longer one has too few programs
        assert per_chunk * -(-time // longer) < chunk_programs
    if plan.chunk > 2 * step:
        assert per_chunk * plan.num_chunks >= chunk_programs


def test_default_config_single_chunk():
    # The default TritonConfig at a short length: one chunk, no chunk-state kernel, no scans.
    _compare(20, 16, 16, jnp.float32, initial_state=True, config=None, seed=4)


def test_default_config_through_the_api():
    rates = jnp.array(RATES, jnp.float32)
    q, k, v, s_in, _, _ = _inputs(9, len(RATES), 16, 16, jnp.float32, 5)
    o, final = lightning_attention(
        q, k, v, rates, initial_state=s_in, return_final_state=True, implementation="pallas", interpret=True
    )
    o_ref, final_ref = recurrent.recurrent(q, k, v, rates, s_in)
    assert _rel(o, o_ref) < 1e-5 and _rel(final, final_ref) < 1e-5


def test_split_sequence_continuity():
    # Two calls chained through the state equal one call: final_state feeds initial_state.
    rates = jnp.array(RATES, jnp.float32)
    q, k, v, _, _, _ = _inputs(45, len(RATES), 16, 16, jnp.float32, 6)
    f = lambda q, k, v, s: lightning_attention_triton(q, k, v, rates, s, config=SMALL, interpret=True)
    o_all, s_all = f(q, k, v, None)
    o1, s1 = f(q[:, :19], k[:, :19], v[:, :19], None)
    o2, s2 = f(q[:, 19:], k[:, 19:], v[:, 19:], s1)
    assert _rel(jnp.concatenate([o1, o2], 1), o_all) < 1e-5
    assert _rel(s2, s_all) < 1e-5


def test_vmap_matches_loop():
    rates = jnp.array(RATES[:2], jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    q, k, v = (jax.random.normal(key, (2, 1, 18, 2, 16)) for key in keys)
    f = lambda q, k, v: lightning_attention_triton(q, k, v, rates, None, config=SMALL, interpret=True)[0]
    batched = jax.vmap(f)(q, k, v)
    looped = jnp.stack([f(q[i], k[i], v[i]) for i in range(2)])
    assert _rel(batched, looped) < 1e-6


# ----------------------------------------------------------------------------------------------
# Cross-lowering for CUDA: runs the Pallas-to-Triton lowering of every kernel without a GPU.

_H100 = jax.sharding.AbstractDevice(
    device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"
)


def _lower_for_cuda(shape_q, dim_v, dtype, config, initial_state=True):
    batch, time, heads, dim_k = shape_q
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
    args = [spec(shape_q), spec(shape_q), spec((batch, time, heads, dim_v)), spec((heads,), jnp.float32)]
    args.append(spec((batch, heads, dim_k, dim_v), jnp.float32) if initial_state else None)

    def loss(q, k, v, rates, s_in):
        o, final = lightning_attention_triton(q, k, v, rates, s_in, scale=0.5, config=config, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    grad = jax.grad(loss, argnums=(0, 1, 2) + ((4,) if initial_state else ()))
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(lambda *a: grad(*a)).trace(*args).lower(lowering_platforms=("cuda",))
    return lowered.as_text()


def _kernel_names(text):
    names = ("lightning_chunk_states", "lightning_chunk_scan", "lightning_chunk_scan_reverse",
             "lightning_forward", "lightning_backward_y", "lightning_backward",
             "lightning_backward_dq", "lightning_backward_dk", "lightning_backward_dv")
    # Whole names: "lightning_backward" is a prefix of the per-kind launches' names.
    return {n for n in names if re.search(rf"\b{n}\b", text)}


@pytest.mark.parametrize(
    "shape_q, dim_v, dtype",
    [
        ((1, 65536, 16, 128), 128, jnp.bfloat16),  # family (a), long: every kernel
        ((2, 1000, 2, 256), 256, jnp.bfloat16),  # wide rows: 64-wide tiles, half blocks backward
        ((1, 4100, 2, 24), 48, jnp.float32),  # padded dims, ragged tail, fp32 precise dots
        ((2, 100, 2, 192), 64, jnp.float16),
        ((1, 3, 1, 16), 16, jnp.bfloat16),  # time < block: the 16-token minimum block
    ],
)
def test_lowers_for_cuda(shape_q, dim_v, dtype):
    text = _lower_for_cuda(shape_q, dim_v, dtype, None)
    names = _kernel_names(text)
    assert {"lightning_forward", "lightning_backward"} <= names


_MULTI_CHUNK = {"lightning_chunk_states", "lightning_chunk_scan", "lightning_chunk_scan_reverse",
                "lightning_forward", "lightning_backward_y"}


def test_lowers_for_cuda_all_kernels_small_config():
    names = _kernel_names(_lower_for_cuda((1, 100, 2, 32), 48, jnp.bfloat16, SMALL))
    assert names == _MULTI_CHUNK | {"lightning_backward"}, names
    unfused = dataclasses.replace(SMALL, fuse_backward=False)
    names = _kernel_names(_lower_for_cuda((1, 100, 2, 32), 48, jnp.float32, unfused, initial_state=False))
    per_kind = {"lightning_backward_dq", "lightning_backward_dk", "lightning_backward_dv"}
    assert names == _MULTI_CHUNK | per_kind, names


# ----------------------------------------------------------------------------------------------
# The config reaches the kernels through the public op; GPU facts drive the tiling.


def test_config_through_the_api_reaches_the_kernels():
    # SMALL's 32-token chunks give the multi-chunk kernels; the default config gives one chunk.
    spec = jax.ShapeDtypeStruct((1, 100, 2, 32), jnp.bfloat16)
    rates = jnp.array([0.1, 0.5], jnp.float32)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)

    def lowered(config):
        def loss(q, k, v):
            o = lightning_attention(q, k, v, rates, implementation="pallas", config=config, interpret=False)
            return jnp.sum(o.astype(jnp.float32))

        with jax.sharding.use_abstract_mesh(mesh):
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec).lower(
                lowering_platforms=("cuda",)).as_text()

    assert _kernel_names(lowered(SMALL)) == _MULTI_CHUNK | {"lightning_backward"}
    assert _kernel_names(lowered(None)) == {"lightning_forward", "lightning_backward"}


def test_config_through_the_api_matches_reference():
    rates = jnp.array(RATES, jnp.float32)
    q, k, v, s_in, _, _ = _inputs(70, len(RATES), 16, 16, jnp.float32, 11)
    o = lightning_attention(q, k, v, rates, initial_state=s_in, implementation="pallas", config=SMALL,
                            interpret=True)
    assert _rel(o, reference.quadratic(q, k, v, rates, s_in)[0]) < 1e-5


@pytest.mark.parametrize(
    "implementation, config, pattern",
    [
        ("pallas", XlaConfig(), "config: got XlaConfig, expected TritonConfig"),
        ("xla", SMALL, "config: got TritonConfig, expected XlaConfig"),
        ("reference", SMALL, "config: got TritonConfig, expected None"),
        ("pallas", {"chunk": 32}, "config: got dict, expected TritonConfig"),
    ],
)
def test_wrong_config_is_named(implementation, config, pattern):
    x = jnp.ones((1, 8, 2, 16))
    with pytest.raises(TypeError, match=pattern):
        lightning_attention(x, x, x, jnp.ones(2), implementation=implementation, config=config)


@pytest.mark.parametrize(
    "field, value, pattern",
    [("block", 8, "config.block: got 8, expected a power of two >= 16"),
     ("chunk", 48, "config.chunk: got 48, expected a positive power of two"),
     ("num_stages", 0, "config.num_stages: got 0, expected an integer >= 1"),
     ("fuse_backward", "yes", "config.fuse_backward: got 'yes', expected True or False")],
)
def test_bad_config_field_is_named(field, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        TritonConfig(**{field: value})


def test_xla_config_block_size():
    rates = jnp.array(RATES, jnp.float32)
    q, k, v, _, _, _ = _inputs(33, len(RATES), 8, 8, jnp.float32, 12)
    want = lightning_attention(q, k, v, rates, implementation="xla", block_size=8)
    got = lightning_attention(q, k, v, rates, implementation="xla", config=XlaConfig(block_size=8))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the same program
    with pytest.raises(ValueError, match="config.block_size: got 12"):
        XlaConfig(block_size=12)


class _FakeGpu:
    """What `gpu_facts` reads off a jax GPU device."""

    def __init__(self, cores, capability, kind="fake"):
        self.core_count, self.compute_capability, self.device_kind = cores, capability, kind


def test_gpu_facts_from_the_device():
    assert triton_config.gpu_facts() == triton_config.HOPPER  # no GPU here
    a100 = triton_config.gpu_facts(_FakeGpu(108, "8.0", "NVIDIA A100"))
    assert (a100.sm_count, a100.smem_per_block, a100.smem_budget) == (108, 163 * 1024, 128 * 1024)
    assert triton_config.gpu_facts(_FakeGpu(70, "9.9")).smem_per_block == 227 * 1024  # unknown: Hopper's
    assert triton_config.gpu_facts(_FakeGpu(None, "9.0")) == triton_config.HOPPER
    cfg = TritonConfig()
    # One wave is 2 programs per SM; the chunk rule's two waves round down to a power of two.
    assert (cfg.resolved_min_programs(a100), cfg.resolved_chunk_programs(a100)) == (216, 256)
    assert TritonConfig(min_programs=7, chunk_programs=9).resolved_chunk_programs(a100) == 9


def test_chunk_rule_follows_the_sm_count():
    # 1 x 65536 x 16 x 128 bf16: 32 programs per chunk. 512 needed on Hopper -> 16 chunks of
    # 4096; 256 on an A100's 108 SMs -> 8 chunks of 8192.
    from lightning_jax.attention.pallas_triton.plan import make_plan

    def chunk(facts):
        return make_plan((1, 65536, 16, 128), 128, jnp.bfloat16, scale=1.0, block_size=None,
                         interpret=True, config=TritonConfig(), facts=facts).chunk

    assert chunk(triton_config.HOPPER) == 4096
    assert chunk(triton_config.gpu_facts(_FakeGpu(108, "8.0"))) == 8192


def test_constant_rates_stay_opaque_to_constant_folding():
    # Rates closed over as constants (as a model's are) enter behind an optimization barrier, so
    # XLA cannot fold the decay factors built from them into large literals at compile time.
    spec = jax.ShapeDtypeStruct((2, 64, 4, 16), jnp.float32)
    rates = jnp.array(RATES, jnp.float32)

    def loss(q, k, v, s):
        o, final = lightning_attention_triton(q, k, v, rates, s, config=SMALL, interpret=False)
        return jnp.sum(o) + jnp.sum(final)

    s_spec = jax.ShapeDtypeStruct((2, 4, 16, 16), jnp.float32)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 3))).trace(spec, spec, spec, s_spec).lower(
            lowering_platforms=("cuda",)).as_text()
    assert "optimization_barrier" in text
