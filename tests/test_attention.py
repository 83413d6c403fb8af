"""The lightning_attention op: every non-Pallas implementation against an independent float64 oracle,
gradients against autodiff of the quadratic reference, state continuity, decode, long sequences,
transformations, schedules and argument checks. (Pallas kernels: tests/test_pallas.py.)"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lightning_jax as lj
from lightning_jax.attention import reference
from oracles import recurrence_f64, rel_err

IMPLS = ["reference", "recurrent", "xla"]
BLOCK = 16


# ----------------------------------------------------------------------------------------------
# The oracle: the token recurrence in float64 numpy, written independently of the library.


def spread_rates(heads: int) -> np.ndarray:
    """Rates from 0 (no decay) to 8 (decay ~3e-4 per token): the extremes the doc asks for."""
    return np.linspace(0.0, 8.0, heads).astype(np.float32) if heads > 1 else np.zeros(1, np.float32)


def make_inputs(seed, batch, time, heads, dim_k, dim_v, dtype=jnp.float32, with_state=True):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((batch, time, heads, dim_k)) for _ in range(2))
    v = rng.standard_normal((batch, time, heads, dim_v))
    s0 = rng.standard_normal((batch, heads, dim_k, dim_v)) if with_state else None
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), (None if s0 is None else jnp.asarray(s0, jnp.float32))


# batch, time, heads, dim_k, dim_v: time 1, block - 1, block, block + 1, odd lengths, several blocks.
SHAPES = [
    (1, 1, 1, 8, 8),
    (2, BLOCK - 1, 3, 8, 12),
    (1, BLOCK, 2, 16, 8),
    (3, BLOCK + 1, 4, 8, 8),
    (2, 3 * BLOCK + 5, 8, 12, 20),
    (1, 77, 5, 6, 10),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_forward_matches_float64_recurrence(impl, shape, with_state):
    batch, time, heads, dim_k, dim_v = shape
    q, k, v, s0 = make_inputs(hash((impl, shape, with_state)) % 2**31, *shape, with_state=with_state)
    rates = spread_rates(heads)
    o, final = lj.lightning_attention(
        q, k, v, rates, initial_state=s0, return_final_state=True,
        block_size=BLOCK, implementation=impl,
    )
    o_ref, final_ref = recurrence_f64(q, k, v, rates, s0)
    assert o.shape == (batch, time, heads, dim_v) and o.dtype == q.dtype
    assert final.shape == (batch, heads, dim_k, dim_v) and final.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(final, final_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs(impl, dtype):
    q, k, v, s0 = make_inputs(7, 2, 2 * BLOCK + 3, 4, 16, 8, dtype=dtype)
    rates = spread_rates(4)
    o, final = lj.lightning_attention(
        q, k, v, rates, initial_state=s0, return_final_state=True,
        block_size=BLOCK, implementation=impl,
    )
    # The oracle sees exactly the rounded inputs, so the error measured is the op's own.
    o_ref, final_ref = recurrence_f64(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), rates, s0)
    assert o.dtype == dtype and final.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-2
    assert rel_err(final, final_ref) < 1e-3


@pytest.mark.parametrize("impl", ["recurrent", "xla"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 8, 8), (2, BLOCK + 1, 3, 8, 12), (1, 2 * BLOCK + 7, 4, 12, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_autodiff_of_reference(impl, shape):
    q, k, v, s0 = make_inputs(11, *shape)
    rates = spread_rates(shape[2])
    rng = np.random.default_rng(3)
    # Random cotangents for both outputs, so every path (o and final state) is exercised.
    w_o = jnp.asarray(rng.standard_normal((shape[0], shape[1], shape[2], shape[4])), jnp.float32)
    w_s = jnp.asarray(rng.standard_normal((shape[0], shape[2], shape[3], shape[4])), jnp.float32)

    def loss(fn, q, k, v, s0):
        o, s = fn(q, k, v, s0)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s) + 0.1 * jnp.sum(o**2)

    ours = functools.partial(
        lj.lightning_attention, rates=rates, return_final_state=True, block_size=BLOCK,
        implementation=impl, scale=0.7,
    )
    mine = jax.grad(lambda *a: loss(lambda q, k, v, s: ours(q, k, v, initial_state=s), *a), argnums=(0, 1, 2, 3))
    oracle = jax.grad(
        lambda *a: loss(lambda q, k, v, s: reference.quadratic(q, k, v, jnp.asarray(rates), s, scale=0.7), *a),
        argnums=(0, 1, 2, 3),
    )
    for name, g, g_ref in zip(["dq", "dk", "dv", "d_initial_state"], mine(q, k, v, s0), oracle(q, k, v, s0)):
        assert rel_err(g, g_ref) < 1e-4, name


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_multiplies_q(impl):
    q, k, v, _ = make_inputs(5, 1, 20, 2, 8, 8, with_state=False)
    rates = spread_rates(2)
    a = lj.lightning_attention(q, k, v, rates, scale=0.25, implementation=impl, block_size=BLOCK)
    b = lj.lightning_attention(q * 0.25, k, v, rates, implementation=impl, block_size=BLOCK)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("split", [1, BLOCK - 1, BLOCK, 23])
def test_two_calls_chained_through_state_equal_one_call(impl, split):
    q, k, v, s0 = make_inputs(21, 2, 40, 3, 8, 6)
    rates = spread_rates(3)
    call = functools.partial(
        lj.lightning_attention, rates=rates, return_final_state=True, block_size=BLOCK, implementation=impl
    )
    o_all, s_all = call(q, k, v, initial_state=s0)
    o1, s1 = call(q[:, :split], k[:, :split], v[:, :split], initial_state=s0)
    o2, s2 = call(q[:, split:], k[:, split:], v[:, split:], initial_state=s1)
    np.testing.assert_allclose(jnp.concatenate([o1, o2], axis=1), o_all, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s2, s_all, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_prefill_then_decode_equals_one_call(impl):
    q, k, v, _ = make_inputs(31, 2, 29, 4, 8, 12, with_state=False)
    rates = spread_rates(4)
    prefill = 19
    o_all = lj.lightning_attention(q, k, v, rates, block_size=BLOCK, implementation=impl)
    o, state = lj.lightning_attention(
        q[:, :prefill], k[:, :prefill], v[:, :prefill], rates,
        return_final_state=True, block_size=BLOCK, implementation=impl,
    )
    outs = [o]
    for t in range(prefill, q.shape[1]):
        o_t, state = lj.decode_step(q[:, t], k[:, t], v[:, t], jnp.asarray(rates), state)
        outs.append(o_t[:, None])
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), o_all, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ["xla", "recurrent"])
def test_long_sequence_is_finite_and_exact(impl):
    """65,536 tokens with rates up to 10: lambda^65536 underflows to 0, nothing may overflow."""
    time = 65_536
    q, k, v, s0 = make_inputs(41, 1, time, 4, 4, 4)
    rates = np.array([0.0, 1e-3, 0.5, 10.0], np.float32)
    # Keep the rate-0 head's sums O(sqrt(time)) rather than O(time) so fp32 has headroom.
    o, final = lj.lightning_attention(
        q, k, v, rates, initial_state=s0, return_final_state=True, implementation=impl,
    )
    o_ref, final_ref = recurrence_f64(q, k, v, rates, s0)
    assert np.all(np.isfinite(np.asarray(o))) and np.all(np.isfinite(np.asarray(final)))
    assert rel_err(o, o_ref) < 1e-4
    assert rel_err(final, final_ref) < 1e-4
    if impl == "xla":  # and the backward stays finite too
        g = jax.grad(lambda q, k, v: jnp.sum(lj.lightning_attention(q, k, v, rates, implementation=impl) ** 2),
                     argnums=(0, 1, 2))(q, k, v)
        assert all(np.all(np.isfinite(np.asarray(x))) for x in g)


@pytest.mark.parametrize("block_size", [1, 2, 8, 64, 128])
def test_xla_any_block_size_gives_the_same_answer(block_size):
    q, k, v, s0 = make_inputs(51, 1, 45, 2, 8, 8)
    rates = spread_rates(2)
    o, s = lj.lightning_attention(q, k, v, rates, initial_state=s0, return_final_state=True,
                                  block_size=block_size, implementation="xla")
    o_ref, s_ref = recurrence_f64(q, k, v, rates, s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


_NO_BIG_CONSTANTS = r"""
import re, jax, jax.numpy as jnp, numpy as np
import lightning_jax as lj
rates = np.linspace(0.1, 2.0, 4).astype(np.float32)  # closed over: a compile-time constant
f = lambda q, k, v: lj.lightning_attention(q, k, v, rates, implementation="xla")
g = lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do)
x = jax.ShapeDtypeStruct((1, 4096, 4, 16), jnp.float32)
hlo = jax.jit(g).lower(x, x, x, x).compile().as_text()
shapes = re.findall(r"= \w+\[([\d,]*)\]\S*\s+constant\(", hlo)
print(max(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes))
"""


def test_xla_decay_factors_are_not_compile_time_constants():
    """With constant rates the decay factors ([N, heads, C], [heads, C, C], ...) depend only on
    constants; XLA must not fold them into literals (1M elements at 64K tokens, slow to compile).
    XLA:CPU's aggressive folding (a subprocess: the flag is read once per process) folds
    everything foldable, so any factor left foldable shows up as a big constant here."""
    import os
    import subprocess
    import sys

    flags = os.environ.get("XLA_FLAGS", "") + " --xla_backend_extra_options=xla_cpu_fold_all_constants"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", _NO_BIG_CONSTANTS], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    # 4096 tokens / 64 = 64 blocks: only O(blocks + heads) constants (the end exponents) may remain;
    # a folded factor would have >= 4 * 64 * 64 = 16384 elements.
    assert int(run.stdout.split()[-1]) <= 64


def test_default_implementation_on_cpu_is_xla():
    assert jax.default_backend() == "cpu"
    assert lj.default_implementation() == "xla"
    q, k, v, _ = make_inputs(1, 1, 9, 2, 4, 4, with_state=False)
    rates = spread_rates(2)
    np.testing.assert_array_equal(
        lj.lightning_attention(q, k, v, rates),
        lj.lightning_attention(q, k, v, rates, implementation="xla"),
    )


# ----------------------------------------------------------------------------------------------
# Rates are not differentiable: an error, never a silent zero.


@pytest.mark.parametrize("impl", IMPLS)
def test_differentiating_rates_raises(impl):
    q, k, v, _ = make_inputs(2, 1, 8, 2, 4, 4, with_state=False)
    rates = jnp.asarray(spread_rates(2))
    with pytest.raises(TypeError, match="rates: .*no gradient"):
        jax.grad(lambda r: lj.lightning_attention(q, k, v, r, implementation=impl).sum())(rates)
    with pytest.raises(TypeError, match="rates: .*no gradient"):
        jax.jvp(lambda r: lj.lightning_attention(q, k, v, r, implementation=impl), (rates,), (rates,))
    # Constant rates are fine, and stop_gradient says "zero" explicitly.
    g = jax.grad(lambda r: lj.lightning_attention(q, k, v, jax.lax.stop_gradient(r), implementation=impl).sum())(rates)
    np.testing.assert_array_equal(g, np.zeros(2))


# ----------------------------------------------------------------------------------------------
# Transformations: jit, vmap, grad, checkpoint, pmap, shard_map.


def test_jit_vmap_checkpoint():
    q, k, v, s0 = make_inputs(61, 2, 33, 2, 8, 8)
    rates = spread_rates(2)
    f = lambda q, k, v: lj.lightning_attention(q, k, v, rates, block_size=BLOCK)  # noqa: E731
    expected = f(q, k, v)
    np.testing.assert_allclose(jax.jit(f)(q, k, v), expected, rtol=1e-5, atol=1e-5)
    # vmap over an extra leading axis: each slice is an independent call.
    stacked = [jnp.stack([x, 2 * x]) for x in (q, k, v)]
    batched = jax.vmap(f)(*stacked)
    np.testing.assert_allclose(batched[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched[1], f(2 * q, 2 * k, 2 * v), rtol=1e-5, atol=1e-5)
    loss = lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))  # noqa: E731
    g = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    g_remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g, g_remat):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_pmap_over_batch():
    n = jax.device_count()
    assert n == 8, "tests/conftest.py sets eight fake CPU devices"
    q, k, v, _ = make_inputs(71, n, 21, 2, 4, 4, with_state=False)
    rates = spread_rates(2)
    f = lambda q, k, v: lj.lightning_attention(q, k, v, rates, block_size=8)  # noqa: E731
    per_device = jax.pmap(f)(*(x[:, None] for x in (q, k, v)))[:, 0]
    np.testing.assert_allclose(per_device, f(q, k, v), rtol=1e-5, atol=1e-5)


def test_shard_map_over_batch_and_heads():
    mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    q, k, v, s0 = make_inputs(81, 4, 19, 8, 4, 6)
    rates = jnp.asarray(spread_rates(8))
    spec = jax.P("data", None, "tensor", None)
    state_spec = jax.P("data", "tensor", None, None)

    def per_shard(q, k, v, rates, s0):
        return lj.lightning_attention(q, k, v, rates, initial_state=s0, return_final_state=True, block_size=8)

    sharded = jax.jit(jax.shard_map(
        per_shard, mesh=mesh,
        in_specs=(spec, spec, spec, jax.P("tensor"), state_spec), out_specs=(spec, state_spec),
    ))
    g_ref = jax.grad(lambda q: jnp.sum(per_shard(q, k, v, rates, s0)[0] ** 2))(q)  # unsharded
    put = lambda x, p: jax.device_put(x, jax.NamedSharding(mesh, p))  # noqa: E731
    q, k, v = (put(x, spec) for x in (q, k, v))
    rates, s0 = put(rates, jax.P("tensor")), put(s0, state_spec)
    o, s = sharded(q, k, v, rates, s0)
    assert o.sharding.spec == spec
    o_ref, s_ref = recurrence_f64(q, k, v, rates, s0)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    # And the gradient through the sharded op equals the unsharded one.
    with jax.set_mesh(mesh):  # Explicit axes: reductions of sharded values need the mesh in scope
        g = jax.grad(lambda q: jnp.sum(sharded(q, k, v, rates, s0)[0] ** 2))(q)
    assert rel_err(g, g_ref) < 1e-5


# ----------------------------------------------------------------------------------------------
# Decay schedules.


def test_alibi_slopes_power_of_two_and_not():
    np.testing.assert_allclose(lj.alibi_slopes(8), 2.0 ** (-np.arange(1, 9)), rtol=1e-6)
    # 12 heads: the 8-head list, then every other entry of the 16-head list (first 4 of them).
    sixteen = 2.0 ** (-8.0 * np.arange(1, 17) / 16)
    expected = np.concatenate([2.0 ** (-np.arange(1, 9)), sixteen[0::2][:4]])
    np.testing.assert_allclose(lj.alibi_slopes(12), expected, rtol=1e-6)
    assert lj.alibi_slopes(1).shape == (1,) and lj.alibi_slopes(5).shape == (5,)
    assert np.all(np.diff(lj.alibi_slopes(16)) < 0)


def test_layer_schedules():
    slopes = lj.alibi_slopes(8)
    np.testing.assert_allclose(lj.tnl_rates(8, 0, 24), slopes * (1 + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(lj.tnl_rates(8, 23, 24), slopes * 1e-5, rtol=1e-4)
    np.testing.assert_allclose(lj.tnl_rates(8, 0, 1), slopes)  # L = 1 defined, not a division by zero
    np.testing.assert_allclose(lj.minimax_rates(8, 79, 80), slopes * (1 - 79 / (79 + 1e-5) + 1e-5), rtol=1e-4)
    paper = lj.paper_rates(4, 1, 4)
    np.testing.assert_allclose(paper, 8 * np.arange(4) / 4 * 0.75, rtol=1e-6)
    for fn in (lj.tnl_rates, lj.minimax_rates, lj.paper_rates):
        r = fn(6, 2, 5)
        assert r.shape == (6,) and r.dtype == np.float32 and np.all(r >= 0) and np.all(np.isfinite(r))
    with pytest.raises(ValueError, match="layer"):
        lj.tnl_rates(8, 24, 24)
    with pytest.raises(ValueError, match="heads"):
        lj.alibi_slopes(0)


# ----------------------------------------------------------------------------------------------
# Bad input: one test per class; each error names the argument.


def _call(**overrides):
    q, k, v, _ = make_inputs(0, 2, 8, 2, 4, 6, with_state=False)
    args = dict(q=q, k=k, v=v, rates=spread_rates(2))
    args.update(overrides)
    kwargs = {name: args.pop(name) for name in list(args) if name not in ("q", "k", "v", "rates")}
    return lj.lightning_attention(args["q"], args["k"], args["v"], args["rates"], **kwargs)


def test_bad_rank():
    with pytest.raises(ValueError, match=r"q: got shape \(2, 8, 4\).*rank 4"):
        _call(q=jnp.zeros((2, 8, 4)))


@pytest.mark.parametrize(
    "arg, shape, pattern",
    [
        ("k", (2, 8, 2, 5), "k: got shape"),
        ("k", (1, 8, 2, 4), "k: got shape"),
        ("v", (2, 9, 2, 6), r"v: got shape \(2, 9, 2, 6\)"),
        ("v", (2, 8, 3, 6), r"v: got shape \(2, 8, 3, 6\)"),
    ],
)
def test_mismatched_batch_time_heads_dims(arg, shape, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**{arg: jnp.ones(shape)})


@pytest.mark.parametrize("rates", [[0.1, -0.5], [0.1, np.nan], [np.inf, 0.0]])
def test_bad_rate_values(rates):
    with pytest.raises(ValueError, match="rates: got .*finite values >= 0"):
        _call(rates=np.asarray(rates, np.float32))


def test_traced_rates_are_not_value_checked_but_work():
    q, k, v, _ = make_inputs(0, 1, 8, 2, 4, 4, with_state=False)
    f = jax.jit(lambda r: lj.lightning_attention(q, k, v, r))
    assert f(jnp.asarray([0.0, 1.0])).shape == (1, 8, 2, 4)


def test_bad_rates_shape():
    with pytest.raises(ValueError, match=r"rates: got shape \(3,\), expected \(2,\)"):
        _call(rates=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"rates: got shape \(1, 2\)"):
        _call(rates=np.zeros((1, 2), np.float32))


def test_bad_initial_state_shape():
    with pytest.raises(ValueError, match=r"initial_state: got shape \(2, 2, 6, 4\).*expected shape \(2, 2, 4, 6\)"):
        _call(initial_state=jnp.zeros((2, 2, 6, 4)))


@pytest.mark.parametrize("arg", ["q", "rates", "initial_state"])
def test_integer_dtypes(arg):
    bad = {"q": jnp.zeros((2, 8, 2, 4), jnp.int32), "rates": np.zeros(2, np.int32),
           "initial_state": jnp.zeros((2, 2, 4, 6), jnp.int32)}[arg]
    with pytest.raises(TypeError, match=f"{arg}: got dtype int32"):
        _call(**{arg: bad})


def test_mixed_dtypes():
    with pytest.raises(TypeError, match="q, k, v: got dtypes float32, bfloat16, float32"):
        _call(k=jnp.zeros((2, 8, 2, 4), jnp.bfloat16))


def test_time_zero():
    empty = jnp.zeros((2, 0, 2, 4))
    with pytest.raises(ValueError, match="time = 0"):
        _call(q=empty, k=empty, v=jnp.zeros((2, 0, 2, 6)))


def test_unknown_implementation():
    with pytest.raises(ValueError, match=r"implementation: got 'cuda'.*'xla'"):
        _call(implementation="cuda")


@pytest.mark.parametrize("block_size", [0, -16, 48, 3, 16.0, True])
def test_bad_block_size(block_size):
    with pytest.raises(ValueError, match="block_size: got .*power of two"):
        _call(block_size=block_size)


def test_bad_scale():
    with pytest.raises(TypeError, match="scale: got 'big'"):
        _call(scale="big")
    with pytest.raises(ValueError, match="scale: got inf"):
        _call(scale=float("inf"))


@pytest.mark.parametrize("name, value", [("return_final_state", "yes"), ("return_final_state", 1), ("interpret", "no")])
def test_flags_must_be_bools(name, value):
    with pytest.raises(TypeError, match=f"{name}: got {value!r}, expected True or False"):
        _call(**{name: value})


def test_errors_carry_the_field():
    from lightning_jax.checks import ArgumentError

    with pytest.raises(ArgumentError) as info:
        _call(rates=jnp.array([0.1, -1.0]))
    assert info.value.field == "rates"
    nested = info.value.under("model").under("config")
    assert nested.field == "config.model.rates" and str(nested).startswith("config.model.rates: got")
    import pickle

    again = pickle.loads(pickle.dumps(nested))  # crosses process boundaries (multi-process runs)
    assert type(again) is ArgumentError and str(again) == str(nested)


def test_decode_step_checks_its_arguments():
    q = jnp.ones((1, 2, 8))
    v = jnp.ones((1, 2, 6))
    rates = jnp.array([0.1, 0.2])
    with pytest.raises(ValueError, match=r"state: got shape \(1, 2, 8, 9\).*expected shape \(1, 2, 8, 6\)"):
        lj.decode_step(q, q, v, rates, jnp.zeros((1, 2, 8, 9)))
    with pytest.raises(ValueError, match=r"rates: got shape \(3,\)"):
        lj.decode_step(q, q, v, jnp.ones(3), jnp.zeros((1, 2, 8, 6)))
    with pytest.raises(ValueError, match=r"q: got shape \(1, 4, 2, 8\).*rank 3"):
        lj.decode_step(jnp.ones((1, 4, 2, 8)), q, v, rates, jnp.zeros((1, 2, 8, 6)))
    o, state = lj.decode_step(q, q, v, rates, jnp.zeros((1, 2, 8, 6)))
    assert o.shape == (1, 2, 6) and state.shape == (1, 2, 8, 6)
