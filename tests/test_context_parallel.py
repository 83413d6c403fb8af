"""Context parallelism: `lightning_attention(..., context_axis=...)` inside `jax.shard_map`, one sequence
split along time over 2, 4 and 8 (fake CPU) devices, must give the single-device result: outputs, the
final state and the gradients for q, k, v and initial_state. Also: one collective per call, and the
errors. (tests/conftest.py sets eight fake CPU devices before JAX starts.)"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lightning_jax as lj
from lightning_jax.checks import ArgumentError, ArgumentTypeError
from oracles import recurrence_f64, rel_err

AXIS = "context"
BLOCK = 16
TOKENS = jax.P(None, AXIS, None, None)  # [batch, time, heads, dim]: time split over the axis

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs the eight fake CPU devices of conftest.py")


def make_inputs(seed, batch, time, heads, dim_k, dim_v, dtype=jnp.float32, with_state=True):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.standard_normal((batch, time, heads, dim_k)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((batch, time, heads, dim_v)), dtype)
    s0 = jnp.asarray(rng.standard_normal((batch, heads, dim_k, dim_v)), jnp.float32) if with_state else None
    # Rates from 0 (no decay) to 8 (decay ~3e-4 per token).
    rates = np.linspace(0.0, 8.0, heads).astype(np.float32)
    return q, k, v, s0, rates


def context_mesh(n: int):
    # Auto axes: jit moves whole arrays onto the mesh as the specs say, also under grad.
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def split_op(n, rates, *, with_state, check_vma=True, return_final_state=True, **kwargs):
    """f(q, k, v[, s0]) on the whole arrays: shard_map over n devices, time split over AXIS."""
    mesh = context_mesh(n)

    def per_device(q, k, v, *s0):
        return lj.lightning_attention(
            q, k, v, rates, initial_state=s0[0] if s0 else None, return_final_state=return_final_state,
            context_axis=AXIS, **kwargs,
        )

    in_specs = (TOKENS,) * 3 + ((jax.P(),) if with_state else ())
    out_specs = (TOKENS, jax.P()) if return_final_state else TOKENS
    # Under jit: an eager (un-jitted) shard_map of the xla implementation crashes XLA's CPU compiler,
    # with or without context_axis.
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=check_vma))


def whole_op(rates, **kwargs):
    """The same op on one device, the whole sequence at once."""
    def f(q, k, v, *s0):
        return lj.lightning_attention(q, k, v, rates, initial_state=s0[0] if s0 else None,
                                      return_final_state=True, **kwargs)
    return f


def grads(f, args, w_o, w_s):
    """Gradients for every argument of a random linear-plus-quadratic loss on (o, final_state)."""
    def loss(*a):
        o, s = f(*a)
        return jnp.sum(o * w_o) + jnp.sum(s * w_s) + 0.1 * jnp.sum(o.astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)


def assert_gradients_match(split, whole, args, outputs, seed, tol):
    """dq, dk, dv (and d_initial_state) of the split op within `tol` (rel_err) of one device's, for
    the loss of `grads` with random weights drawn from `seed` shaped like `outputs` (o, final)."""
    rng = np.random.default_rng(seed)
    w_o, w_s = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in outputs)
    names = ["dq", "dk", "dv", "d_initial_state"]
    for name, g, g_one in zip(names, grads(split, args, w_o, w_s), grads(whole, args, w_o, w_s)):
        assert rel_err(g, g_one) < tol, name


# devices, tokens per device: odd slices, one token per device, a whole block per device.
LAYOUTS = [(2, 37), (4, 37), (8, 37), (8, 1), (4, BLOCK)]


@pytest.mark.parametrize("n, per_device", LAYOUTS, ids=lambda x: str(x))
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_outputs_final_state_and_gradients_equal_one_device(n, per_device, with_state):
    batch, heads, dim_k, dim_v = 2, 3, 8, 12
    q, k, v, s0, rates = make_inputs(n * 100 + per_device, batch, n * per_device, heads, dim_k, dim_v,
                                     with_state=with_state)
    args = (q, k, v) + ((s0,) if with_state else ())
    kwargs = {"scale": 0.7, "block_size": BLOCK, "implementation": "xla"}
    split, whole = split_op(n, rates, with_state=with_state, **kwargs), whole_op(rates, **kwargs)

    o, final = split(*args)
    o_one, final_one = whole(*args)
    assert o.shape == q.shape[:3] + (dim_v,) and final.shape == (batch, heads, dim_k, dim_v)
    # fp32 round-off (~1e-7 measured) against one device, the op's own error against float64.
    assert rel_err(o, o_one) < 1e-6 and rel_err(final, final_one) < 1e-6
    o_ref, final_ref = recurrence_f64(q, k, v, rates, s0, scale=0.7)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5

    assert_gradients_match(split, whole, args, (o, final), seed=7, tol=1e-6)


def test_long_slices():
    """Slices of 49,157 tokens with a decay still visible across a whole slice: the local states'
    long contraction matches the one-device result, forward and backward."""
    n, per_device = 2, 3 * 16384 + 5
    q, k, v, s0, _ = make_inputs(11, 1, n * per_device, 2, 4, 4)
    rates = np.array([0.0, 1e-4], np.float32)  # decay still visible across a whole slice
    kwargs = {"block_size": 256, "implementation": "xla"}
    split, whole = split_op(n, rates, with_state=True, **kwargs), whole_op(rates, **kwargs)
    (o, final), (o_one, final_one) = split(q, k, v, s0), whole(q, k, v, s0)
    assert rel_err(o, o_one) < 1e-5 and rel_err(final, final_one) < 1e-5
    assert_gradients_match(split, whole, (q, k, v, s0), (o, final), seed=3, tol=1e-5)


def test_bf16_inputs():
    n, per_device, heads = 4, 37, 4
    q, k, v, s0, rates = make_inputs(3, 2, n * per_device, heads, 16, 8, dtype=jnp.bfloat16)
    kwargs = {"block_size": BLOCK, "implementation": "xla"}
    split, whole = split_op(n, rates, with_state=True, **kwargs), whole_op(rates, **kwargs)
    o, final = split(q, k, v, s0)
    o_one, final_one = whole(q, k, v, s0)
    o_ref, final_ref = recurrence_f64(*(x.astype(jnp.float32) for x in (q, k, v)), rates, s0)
    assert o.dtype == jnp.bfloat16 and final.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-2 and rel_err(o, o_one) < 1e-2
    assert rel_err(final, final_ref) < 1e-3 and rel_err(final, final_one) < 1e-3
    assert_gradients_match(split, whole, (q, k, v, s0), (o, final), seed=8, tol=2e-2)


@pytest.mark.parametrize("implementation", ["reference", "recurrent", "pallas"])
def test_every_implementation(implementation):
    """The slice goes through the registry: any implementation (Pallas in interpret mode here; its
    kernels' output shapes carry no varying-axes type, so it runs under check_vma=False, as in
    models/sharding.py)."""
    n, per_device = 2, 19
    q, k, v, s0, rates = make_inputs(5, 1, n * per_device, 2, 16, 16)
    kwargs = {"implementation": implementation, "scale": 0.5}
    if implementation == "pallas":
        kwargs.update(interpret=True, check_vma=False)
    o, final = split_op(n, rates, with_state=True, **kwargs)(q, k, v, s0)
    o_ref, final_ref = recurrence_f64(q, k, v, rates, s0, scale=0.5)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(final, final_ref) < 1e-5


def segment_ids_of(time, starts_per_row):
    """[rows, time] int32 ids that change at each listed start (ids jump by varying amounts)."""
    ids = np.zeros((len(starts_per_row), time), np.int32)
    for row, starts in enumerate(starts_per_row):
        ids[row] = 3 * row + np.cumsum([(1 + t % 4) if t in starts else 0 for t in range(time)])
    return jnp.asarray(ids)


# Slices of 37 tokens. Row 0: documents that start at a slice's first token (37, 74) and inside
# slices (10, 50); row 1: one document over every slice (the initial state reaches the end); row 2:
# a document spanning three slices from 20 on, a one-token document at 111, starts at 140 and 147.
SEGMENT_ROWS = [{10, 37, 50, 74}, set(), {20, 111, 112, 140, 147}]


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "initial_state"])
def test_packed_documents_split_over_devices_equal_one_device(n, with_state):
    per_device, heads = 37, 3
    q, k, v, s0, rates = make_inputs(n + 40, 3, n * per_device, heads, 8, 6, with_state=with_state)
    rows = [{t for t in starts if t < n * per_device} for starts in SEGMENT_ROWS]
    seg = segment_ids_of(n * per_device, rows)
    mesh = context_mesh(n)
    kwargs = {"block_size": BLOCK, "implementation": "xla", "scale": 0.9}

    def per_device_op(q, k, v, seg, *s0):
        return lj.lightning_attention(q, k, v, rates, initial_state=s0[0] if s0 else None, segment_ids=seg,
                                      return_final_state=True, context_axis=AXIS, **kwargs)

    in_specs = (TOKENS,) * 3 + (jax.P(None, AXIS),) + ((jax.P(),) if with_state else ())
    split = jax.jit(jax.shard_map(per_device_op, mesh=mesh, in_specs=in_specs, out_specs=(TOKENS, jax.P())))

    def whole(q, k, v, *s0):
        return lj.lightning_attention(q, k, v, rates, initial_state=s0[0] if s0 else None, segment_ids=seg,
                                      return_final_state=True, **kwargs)

    args = (q, k, v) + ((s0,) if with_state else ())
    o, final = split(q, k, v, seg, *args[3:])
    o_one, final_one = whole(*args)
    assert rel_err(o, o_one) < 1e-5 and rel_err(final, final_one) < 1e-5
    assert_gradients_match(lambda *a: split(a[0], a[1], a[2], seg, *a[3:]), whole, args, (o, final), seed=n,
                           tol=1e-5)
    # The documents matter: without segment ids the output differs.
    assert rel_err(whole(*args)[0], lj.lightning_attention(q, k, v, rates, initial_state=args[3] if with_state
                                                           else None, **kwargs)) > 1e-2


def test_without_check_vma_the_final_state_may_be_returned_replicated():
    """check_vma=False keeps the plain all-gather; a replicated final state's gradient is still right
    (shard_map hands each device 1/n of its cotangent, the reduce-scatter sums them)."""
    n = 4
    q, k, v, s0, rates = make_inputs(9, 1, n * 13, 3, 8, 4)
    kwargs = {"block_size": BLOCK, "implementation": "xla"}
    split = split_op(n, rates, with_state=True, check_vma=False, **kwargs)
    whole = whole_op(rates, **kwargs)
    o, final = split(q, k, v, s0)
    o_one, final_one = whole(q, k, v, s0)
    assert rel_err(o, o_one) < 1e-5 and rel_err(final, final_one) < 1e-5
    rng = np.random.default_rng(9)
    w_o, w_s = (jnp.asarray(rng.standard_normal(x.shape), jnp.float32) for x in (o, final))
    for name, g, g_one in zip(["dq", "dk", "dv", "d_initial_state"], grads(split, (q, k, v, s0), w_o, w_s),
                              grads(whole, (q, k, v, s0), w_o, w_s)):
        assert rel_err(g, g_one) < 1e-5, name


def test_output_only_gradients():
    """return_final_state=False (the training path): the gather's transpose is a reduce-scatter."""
    n = 8
    q, k, v, _, rates = make_inputs(10, 2, n * 5, 2, 4, 6, with_state=False)
    kwargs = {"block_size": BLOCK, "implementation": "xla"}
    split = split_op(n, rates, with_state=False, return_final_state=False, **kwargs)
    whole = lambda q, k, v: lj.lightning_attention(q, k, v, rates, **kwargs)
    loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))
    assert rel_err(split(q, k, v), whole(q, k, v)) < 1e-5
    for name, g, g_one in zip(["dq", "dk", "dv"], jax.grad(loss(split), argnums=(0, 1, 2))(q, k, v),
                              jax.grad(loss(whole), argnums=(0, 1, 2))(q, k, v)):
        assert rel_err(g, g_one) < 1e-5, name


def _collectives(hlo: str) -> dict[str, int]:
    names = ["all_gather", "reduce_scatter", "all_reduce", "all_to_all", "collective_permute"]
    return {name: len(re.findall(rf"stablehlo\.{name}\b", hlo)) for name in names}


@pytest.mark.parametrize("return_final_state", [False, True])
def test_one_collective_forward_and_one_backward(return_final_state):
    n = 4
    q, k, v, _, rates = make_inputs(11, 1, n * 9, 2, 4, 4, with_state=False)
    mesh = context_mesh(n)
    per_device = lambda q, k, v: lj.lightning_attention(
        q, k, v, rates, context_axis=AXIS, return_final_state=return_final_state, implementation="xla")
    out_specs = (TOKENS, jax.P()) if return_final_state else TOKENS
    f = jax.shard_map(per_device, mesh=mesh, in_specs=(TOKENS,) * 3, out_specs=out_specs)
    forward = _collectives(jax.jit(f).lower(q, k, v).as_text())

    def loss(*args):  # from the outputs and, when returned, the final state
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(f(*args)))

    backward = _collectives(jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text())
    assert forward == {**dict.fromkeys(forward, 0), "all_gather": 1}
    # Gradient: the forward's all-gather and its transpose (a reduce-scatter; an all-reduce of the
    # gathered states when the gather is invariant so that the final state can be returned replicated).
    transpose = "all_reduce" if return_final_state else "reduce_scatter"
    assert backward == {**dict.fromkeys(backward, 0), "all_gather": 1, transpose: 1}


# ----------------------------------------------------------------------------------------------
# Errors.


def test_context_axis_outside_shard_map():
    q, k, v, _, rates = make_inputs(0, 1, 8, 2, 4, 4, with_state=False)
    with pytest.raises(ArgumentError, match="context_axis: got 'context', expected the name of a mesh axis in scope") as info:
        lj.lightning_attention(q, k, v, rates, context_axis=AXIS)
    assert info.value.field == "context_axis"


def test_context_axis_not_an_axis_of_this_shard_map():
    q, k, v, _, rates = make_inputs(0, 2, 8, 2, 4, 4, with_state=False)
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    spec = jax.P("data")
    f = jax.jit(jax.shard_map(lambda q, k, v: lj.lightning_attention(q, k, v, rates, context_axis="sequence"),
                              mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
    with pytest.raises(ArgumentError, match=r"context_axis: got 'sequence'.*in scope here: \['data'\]"):
        f(q, k, v)


@pytest.mark.parametrize("value", [1, ("context",), True])
def test_context_axis_must_be_a_str(value):
    q, k, v, _, rates = make_inputs(0, 1, 8, 2, 4, 4, with_state=False)
    with pytest.raises(ArgumentTypeError, match="context_axis: got .*expected a mesh axis name"):
        lj.lightning_attention(q, k, v, rates, context_axis=value)
