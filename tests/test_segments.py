"""Packed documents: `lightning_attention(..., segment_ids=...)` in every implementation, against running
each document alone.

The oracle splits each row at its boundaries, runs every document by itself (the initial state only
for the row's first document), and concatenates: outputs and final state from the float64 token
recurrence (tests/oracles.py), gradients from autodiff of the quadratic reference per document. The
Pallas kernels run in interpret mode (slow: few, small cases) and are cross-lowered for CUDA.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lightning_jax as lj
from lightning_jax.attention import TritonConfig, reference
from lightning_jax.checks import ArgumentError, ArgumentTypeError
from oracles import recurrence_f64, rel_err

IMPLS = ["reference", "recurrent", "xla"]
BLOCK = 16


def _inputs(seed, batch, time, heads, dim_k, dim_v, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q, k = (rng.standard_normal((batch, time, heads, dim_k)) for _ in range(2))
    v = rng.standard_normal((batch, time, heads, dim_v))
    s0 = rng.standard_normal((batch, heads, dim_k, dim_v))
    d_o = rng.standard_normal((batch, time, heads, dim_v))
    d_final = rng.standard_normal((batch, heads, dim_k, dim_v))
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return cast(q), cast(k), cast(v), f32(s0), cast(d_o), f32(d_final)


def segments_from_boundaries(time: int, rows) -> np.ndarray:
    """[batch, time] int32 ids from each row's boundary positions (a new document starts there); ids
    start at an arbitrary value and jump by more than one, as packed data may."""
    seg = np.zeros((len(rows), time), np.int32)
    for b, starts in enumerate(rows):
        ids = 5 * b - 3
        for t in range(time):
            if t in starts:
                ids += 1 + t % 3
            seg[b, t] = ids
    return seg


def documents(seg_row) -> list[tuple[int, int]]:
    """[(start, end)) of each document of one row."""
    seg_row = np.asarray(seg_row)
    cuts = [0] + [t for t in range(1, len(seg_row)) if seg_row[t] != seg_row[t - 1]] + [len(seg_row)]
    return list(zip(cuts[:-1], cuts[1:]))


def _document_f64(q, k, v, rates, s0, d_o, d_final, scale):
    """One document [time, heads, dim], float64 numpy: (o, final, dq, dk, dv, d_s0) of the masked
    quadratic form, gradients written out by hand (independent of the library and of autodiff)."""
    n = q.shape[0]
    t = np.arange(n, dtype=np.float64)
    lam = np.asarray(rates, np.float64)
    lag = t[:, None] - t[None, :]
    mask = np.where(lag[None] >= 0, np.exp(-lam[:, None, None] * np.maximum(lag, 0)[None]), 0.0)  # [h, t, s]
    q_decay = np.exp(-lam[None, :] * (t[:, None] + 1))  # [t, h]: lambda^(t+1)
    k_decay = np.exp(-lam[None, :] * (n - 1 - t[:, None]))  # [t, h]: lambda^(n-1-t)
    qs = scale * q
    a = np.einsum("thd,shd->hts", qs, k) * mask
    o = np.einsum("hts,she->the", a, v)
    final = np.einsum("th,thd,the->hde", k_decay, k, v)
    p = np.einsum("the,she->hts", d_o, v) * mask
    dq = scale * np.einsum("hts,shd->thd", p, k)
    dk = np.einsum("hts,thd->shd", p, qs) + np.einsum("th,the,hde->thd", k_decay, v, d_final)
    dv = np.einsum("hts,the->she", a, d_o) + np.einsum("th,thd,hde->the", k_decay, k, d_final)
    d_s0 = None
    if s0 is not None:
        o = o + np.einsum("th,thd,hde->the", q_decay, qs, s0)
        final = final + np.exp(-lam * n)[:, None, None] * s0
        dq = dq + scale * np.einsum("th,the,hde->thd", q_decay, d_o, s0)
        d_s0 = np.einsum("th,thd,the->hde", q_decay, qs, d_o) + np.exp(-lam * n)[:, None, None] * d_final
    return o, final, dq, dk, dv, d_s0


def oracle(q, k, v, rates, s0, seg, d_o, d_final, scale=1.0):
    """Each document alone, float64: (o, final_state, dq, dk, dv, d_s0). The row's first document
    gets the initial state, its last the final state's cotangent (the others: zero)."""
    q, k, v, d_o = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v, d_o))
    s0 = None if s0 is None else np.asarray(s0, np.float64)
    d_final = np.asarray(d_final, np.float64)
    batch, time, heads, dim_k = q.shape
    dim_v = v.shape[-1]
    o, dq, dk, dv = (np.zeros(x.shape) for x in (v, q, k, v))
    final = np.zeros((batch, heads, dim_k, dim_v))
    d_s0 = np.zeros((batch, heads, dim_k, dim_v))
    for b in range(batch):
        docs = documents(seg[b])
        for i, (start, end) in enumerate(docs):
            first, last = i == 0, i == len(docs) - 1
            cut = slice(start, end)
            res = _document_f64(
                q[b, cut], k[b, cut], v[b, cut], rates, s0[b] if first and s0 is not None else None, d_o[b, cut],
                d_final[b] if last else np.zeros_like(d_final[b]), scale,
            )
            o[b, cut], dq[b, cut], dk[b, cut], dv[b, cut] = res[0], res[2], res[3], res[4]
            if last:
                final[b] = res[1]
            if res[5] is not None:
                d_s0[b] = res[5]
    return o, final, dq, dk, dv, d_s0


def test_oracle_matches_the_float64_recurrence():
    """The hand-written oracle's forward against tests/oracles.py's token recurrence, per document."""
    rates = np.array([0.0, 0.6], np.float32)
    q, k, v, s0, d_o, d_final = _inputs(1, 2, 20, 2, 4, 3)
    seg = segments_from_boundaries(20, [{7, 8}, set()])
    o, final, *_ = oracle(q, k, v, rates, s0, seg, d_o, d_final, scale=0.5)
    for b in range(2):
        docs = documents(seg[b])
        for i, (start, end) in enumerate(docs):
            piece = [x[b:b + 1, start:end] for x in (q, k, v)]
            o_doc, f_doc = recurrence_f64(*piece, rates, s0[b:b + 1] if i == 0 else None, scale=0.5)
            assert rel_err(o[b, start:end], o_doc[0]) < 1e-12
        assert rel_err(final[b], f_doc[0]) < 1e-12


def test_oracle_gradients_match_autodiff():
    """The oracle's hand-written gradients against autodiff of the reference on one document."""
    rates = np.array([0.0, 0.6], np.float32)
    q, k, v, s0, d_o, d_final = _inputs(2, 1, 12, 2, 4, 3)
    seg = np.zeros((1, 12), np.int32)
    want = oracle(q, k, v, rates, s0, seg, d_o, d_final, scale=0.5)

    def fn(q, k, v, s0):
        return reference.quadratic(q, k, v, jnp.asarray(rates), s0, scale=0.5)

    _, vjp = jax.vjp(fn, q, k, v, s0)
    for name, a, b in zip(NAMES[2:], vjp((d_o, d_final)), want[2:]):
        assert rel_err(a, b) < 1e-5, name


NAMES = ["o", "final_state", "dq", "dk", "dv", "d_initial_state"]


def ours(q, k, v, rates, s0, seg, d_o, d_final, **kwargs):
    """(o, final_state, dq, dk, dv, d_s0) of the op with segment_ids, cotangents on both outputs."""
    @jax.jit
    def run(q, k, v, s0, seg, d_o, d_final):
        def fn(q, k, v, s0):
            return lj.lightning_attention(q, k, v, rates, initial_state=s0, segment_ids=seg, return_final_state=True,
                                          **kwargs)

        (o, final), vjp = jax.vjp(fn, q, k, v, s0)
        return (o, final, *vjp((d_o, d_final)))

    return run(q, k, v, s0, seg, d_o, d_final)


def assert_close(got, want, tol):
    for name, a, b in zip(NAMES, got, want):
        assert a.shape == b.shape, name
        assert rel_err(np.asarray(a, np.float32), b) < tol, (name, rel_err(np.asarray(a, np.float32), b))


# Rows of boundaries for time 53 with blocks of 16: row 0 at a block edge (16), mid-block (20), a
# one-token document (21) and the last token alone (52); row 1 one segment; row 2 a one-token first
# document, then mid-block and block-edge boundaries.
ROWS_53 = [{16, 20, 21, 52}, set(), {1, 9, 32, 33, 48}]


@pytest.mark.parametrize("impl, block_size", [("reference", None), ("recurrent", None), ("xla", 8), ("xla", 16)])
def test_matches_documents_alone(impl, block_size):
    rates = np.array([0.0, 0.7, 8.0], np.float32)  # no decay, moderate, large
    q, k, v, s0, d_o, d_final = _inputs(hash((impl, block_size)) % 2**31, 3, 53, 3, 8, 12)
    seg = jnp.asarray(segments_from_boundaries(53, ROWS_53))
    got = ours(q, k, v, rates, s0, seg, d_o, d_final, implementation=impl, block_size=block_size, scale=0.75)
    want = oracle(q, k, v, rates, s0, seg, d_o, d_final, scale=0.75)
    assert got[0].dtype == q.dtype and got[1].dtype == jnp.float32
    assert_close(got, want, 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_every_token_its_own_document_and_odd_length(impl):
    """time 1 and a row where every token is a document: o_t = (q_t k_t) v_t, the state resets each token."""
    rates = np.array([0.0, 3.0], np.float32)
    for time, rows in ((1, [set()]), (23, [set(range(23)), {11}])):
        q, k, v, s0, d_o, d_final = _inputs(time, len(rows), time, 2, 4, 6)
        seg = jnp.asarray(segments_from_boundaries(time, rows))
        got = ours(q, k, v, rates, s0, seg, d_o, d_final, implementation=impl, block_size=8)
        assert_close(got, oracle(q, k, v, rates, s0, seg, d_o, d_final), 2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_segment_is_exactly_the_default(impl):
    """Bit for bit, op by op (eager). Under jit the compiler may fuse the segment variant's program
    differently (XLA: dv differed in the last bit for 2 % of elements), so there: 1e-6."""
    rates = np.array([0.0, 0.5, 8.0], np.float32)
    q, k, v, s0, d_o, d_final = _inputs(3, 2, 45, 3, 8, 4)

    def run(seg):
        def fn(q, k, v, s0):
            return lj.lightning_attention(q, k, v, rates, initial_state=s0, segment_ids=seg, return_final_state=True,
                                          implementation=impl, block_size=16)

        (o, final), vjp = jax.vjp(fn, q, k, v, s0)
        return (o, final, *vjp((d_o, d_final)))

    got = run(jnp.full((2, 45), 7, jnp.int32))
    for name, a, b in zip(NAMES, got, run(None)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    jitted = ours(q, k, v, rates, s0, jnp.full((2, 45), 7, jnp.int32), d_o, d_final, implementation=impl,
                  block_size=16)
    for name, a, b in zip(NAMES, jitted, got):
        assert rel_err(a, b) < 1e-6, name


@pytest.mark.parametrize("impl", IMPLS)
def test_without_initial_state_and_jit_with_traced_ids(impl):
    rates = np.array([0.2, 0.0], np.float32)
    q, k, v, _, d_o, d_final = _inputs(5, 2, 37, 2, 8, 8)
    seg = jnp.asarray(segments_from_boundaries(37, [{5, 6, 32}, {18}]))

    @jax.jit
    def f(q, k, v, seg):
        def fn(q, k, v):
            return lj.lightning_attention(q, k, v, rates, segment_ids=seg, return_final_state=True,
                                          implementation=impl, block_size=16)

        (o, final), vjp = jax.vjp(fn, q, k, v)
        return (o, final, *vjp((d_o, d_final)))

    got = f(q, k, v, seg)
    want = oracle(q, k, v, rates, None, seg, d_o, d_final)
    assert_close(got, want[:5], 2e-5)


def test_decode_continues_the_last_document():
    """final_state is the last document's state: decoding on from it matches the last document run alone."""
    rates = np.array([0.1, 1.0], np.float32)
    q, k, v, s0, _, _ = _inputs(9, 1, 30, 2, 8, 8)
    seg = jnp.asarray(segments_from_boundaries(30, [{12}]))
    _, final = lj.lightning_attention(q[:, :29], k[:, :29], v[:, :29], rates, initial_state=s0,
                                      segment_ids=seg[:, :29], return_final_state=True, implementation="xla")
    o_last, _ = lj.attention.decode_step(q[:, 29], k[:, 29], v[:, 29], rates, final)
    o_alone = lj.lightning_attention(q[:, 12:], k[:, 12:], v[:, 12:], rates, implementation="reference")
    assert rel_err(o_last, o_alone[:, -1]) < 1e-5


# ----------------------------------------------------------------------------------------------
# Argument checks.


def test_bad_segment_ids_are_named():
    q, k, v, *_ = _inputs(0, 2, 10, 1, 4, 4)
    rates = np.zeros(1, np.float32)
    with pytest.raises(ArgumentError, match=r"segment_ids: got shape \(2, 9\).*expected shape \(2, 10\)"):
        lj.lightning_attention(q, k, v, rates, segment_ids=jnp.zeros((2, 9), jnp.int32))
    with pytest.raises(ArgumentTypeError, match="segment_ids: got dtype float32, expected an integer dtype"):
        lj.lightning_attention(q, k, v, rates, segment_ids=jnp.zeros((2, 10), jnp.float32))
    seg = np.zeros((2, 10), np.int32)
    seg[1, 4:] = 3
    seg[1, 7:] = 2
    with pytest.raises(ArgumentError, match=r"segment_ids: got a decrease in row 1 at time 7 \(3 -> 2\).*"
                                            "expected non-decreasing"):
        lj.lightning_attention(q, k, v, rates, segment_ids=seg)
    with pytest.raises(ArgumentTypeError, match="segment_ids: got list"):
        lj.lightning_attention(q, k, v, rates, segment_ids=seg.tolist())


def test_checked_mode_sees_traced_decreasing_ids():
    from jax.experimental import checkify

    q, k, v, *_ = _inputs(0, 1, 6, 1, 4, 4)
    rates = np.zeros(1, np.float32)
    f = checkify.checkify(jax.jit(lambda seg: lj.lightning_attention(q, k, v, rates, segment_ids=seg, checked=True,
                                                                     implementation="xla")))
    err, _ = f(jnp.array([[0, 0, 1, 1, 2, 2]], jnp.int32))
    err.throw()
    err, _ = f(jnp.array([[0, 0, 2, 1, 2, 2]], jnp.int32))
    with pytest.raises(Exception, match="segment_ids: got 1 decreases along rows"):
        err.throw()


# ----------------------------------------------------------------------------------------------
# Pallas (Triton) kernels: interpret mode on CPU (slow: few small cases), and CUDA lowering.

# Blocks of 16 in chunks of 64 tokens, column tiles of 16: the chunk-state kernels, both scans over
# chunks (with their chunk gates) and every backward program kind run.
SMALL = TritonConfig(
    block=16, bwd_block=16, chunk=64, min_programs=10**6, block_v=16, bwd_tile=16, scan_tile=64,
    state_block=32, state_tile=16,
)
# time 250 = chunks [0, 64), [64, 128), [128, 192), [192, 250): row 0 has boundaries at a chunk edge
# (64), mid-block (70), a one-token document (71), a block edge inside a chunk (96), a document
# spanning a whole chunk and ending in the ragged tail (200), the last token alone (249); row 1 a
# one-token first document and boundaries just after chunk edges (129, 193).
ROWS_250 = [{64, 70, 71, 96, 200, 249}, {1, 129, 193}]


@pytest.mark.parametrize("dtype, config, with_state", [
    (jnp.float32, SMALL, True),
    (jnp.bfloat16, dataclasses.replace(SMALL, fuse_backward=False), False),
    (jnp.float32, None, True),  # the default config: one chunk per sequence
], ids=["fp32-chunks", "bf16-chunks-unfused", "fp32-one-chunk"])
def test_pallas_matches_documents_alone(dtype, config, with_state):
    rates = np.array([0.0, 8.0], np.float32) if with_state else np.array([0.05, 0.5], np.float32)
    q, k, v, s0, d_o, d_final = _inputs(11, 2, 250, 2, 16, 24, dtype)
    seg = jnp.asarray(segments_from_boundaries(250, ROWS_250))
    s0 = s0 if with_state else None

    @jax.jit
    def run(q, k, v, s0, seg):
        def fn(q, k, v, *s):
            return lj.lightning_attention(q, k, v, rates, initial_state=s[0] if s else None, segment_ids=seg,
                                          return_final_state=True, implementation="pallas", config=config,
                                          interpret=True, scale=0.5)

        (o, final), vjp = jax.vjp(fn, q, k, v, *([s0] if s0 is not None else []))
        return (o, final, *vjp((d_o, d_final)))

    got = run(q, k, v, s0, seg)
    want = oracle(q, k, v, rates, s0, seg, d_o, d_final, scale=0.5)
    assert got[0].dtype == dtype
    assert_close(got, want if with_state else want[:5], 2e-5 if dtype == jnp.float32 else 2e-2)


def test_pallas_one_segment_is_exactly_the_default():
    rates = np.array([0.0, 0.4], np.float32)
    q, k, v, s0, d_o, d_final = _inputs(12, 1, 150, 2, 16, 16)

    def run(seg):
        def fn(q, k, v, s0):
            return lj.lightning_attention(q, k, v, rates, initial_state=s0, segment_ids=seg, return_final_state=True,
                                          implementation="pallas", config=SMALL, interpret=True)

        (o, final), vjp = jax.vjp(fn, q, k, v, s0)
        return (o, final, *vjp((d_o, d_final)))

    for name, a, b in zip(NAMES, run(jnp.full((1, 150), 4, jnp.int32)), run(None)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
_KERNELS = ("lightning_chunk_states", "lightning_chunk_scan", "lightning_chunk_scan_reverse", "lightning_forward",
            "lightning_backward_y", "lightning_backward", "lightning_backward_dq", "lightning_backward_dk",
            "lightning_backward_dv")


@pytest.mark.parametrize("shape_q, dim_v, dtype, config", [
    ((1, 65536, 16, 128), 128, jnp.bfloat16, None),  # family (a), long: every kernel
    ((2, 1000, 2, 256), 256, jnp.bfloat16, None),  # wide rows
    ((1, 4100, 2, 24), 48, jnp.float32, dataclasses.replace(SMALL, fuse_backward=False)),  # padded, ragged
])
def test_pallas_segments_lower_for_cuda(shape_q, dim_v, dtype, config):
    """The segment variant through the Pallas-to-Triton lowering (which interpret mode does not check)."""
    batch, time, heads, dim_k = shape_q
    spec = lambda shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    args = (spec(shape_q), spec(shape_q), spec((batch, time, heads, dim_v)),
            spec((batch, heads, dim_k, dim_v), jnp.float32), spec((batch, time), jnp.int32))
    rates = np.linspace(0.0, 1.0, heads).astype(np.float32)

    def loss(q, k, v, s0, seg):
        o, final = lj.lightning_attention(q, k, v, rates, initial_state=s0, segment_ids=seg, return_final_state=True,
                                          implementation="pallas", config=config, interpret=False)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(final)

    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_H100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(
            lowering_platforms=("cuda",)).as_text()
    names = {n for n in _KERNELS if re.search(rf"\b{n}\b", text)}
    assert {"lightning_forward"} <= names
    if config is None:
        assert "lightning_backward" in names
    else:
        assert {"lightning_chunk_states", "lightning_chunk_scan", "lightning_chunk_scan_reverse",
                "lightning_backward_y", "lightning_backward_dq", "lightning_backward_dk",
                "lightning_backward_dv"} <= names
