"""The fused dK/dV sweep of the Mosaic backward (`lightning_jax/attention/pallas_mosaic/dkdv.py`) on
the GPU: checks against the fp32 quadratic form, the kernel alone against the dV and dK sweeps it
replaces, and the op's forward + backward with it on and off.

    PYTHONPATH=$PWD python3 benchmarks/fused_dkdv.py [--check] [--kernel-shapes 64x1024x16x128,...]
        [--shapes 4x16384x16x128,...] [--variants default,fused,two_sweeps,mosaic_fused,triton_backward]
        [--document-length L] [--out F.json]

--check: `kernels.backward(fused=(pieces, 1, 2))` and the three sweeps against the oracle's dq, dk,
dv and dL/dS_in (relative to the largest entry) at CHECKS (batch, time, heads, dim_k, dim_v,
pieces, initial state and dL/dS_final). --kernel-shapes: ms of `dkdv` alone (each rows-per-program
count that keeps >= 100 programs) against the dV and dK sweeps (`kernels.forward(reverse=True)`
twice, the op's rows per program). --shapes / --variants: the op's forward, then forward +
backward (o and the three gradients of one `jax.vjp`) through `"pallas_mosaic"` with
`MosaicConfig(fused_dkdv=...)`: default (the op's choice), fused (True), two_sweeps (False),
mosaic_fused (the Mosaic backward forced, fused), triton_backward (the Triton backward forced).
--document-length L: the op's timings and one more check (the op's gradients through the fused
sweep against the oracle's, documents starting at 1, 64, 300 and 999 of (2, 1000, 4, 128)) with
packed documents (segment ids t // L). Timing as attention.py: back-to-back calls over two input
sets, one sync per sample, medians.

Data (docs/, recorded by two scratch scripts this one joins, with the same checks and timing):
attention_mosaic_dkdv_first_h200.json (checks and kernel timings; its fused_r* rows ran the dQ
sweep with r rows too),
attention_mosaic_dkdv_op_h200.json (the op's backward alone: o was not returned, so the forward
dropped out), attention_mosaic_dkdv_pieces_check_h200.json, attention_mosaic_dkdv_pieces_op_h200.json
and attention_mosaic_dkdv_half_grid_op_h200.json (forward + backward with o).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "benchmarks")
from attention import log, time_jax  # noqa: E402

from lightning_jax.attention import MosaicConfig, lightning_attention  # noqa: E402
from lightning_jax.attention.pallas_mosaic import kernels  # noqa: E402
from lightning_jax.attention.pallas_mosaic.config import launch_plan  # noqa: E402
from lightning_jax.attention.pallas_mosaic.dkdv import dkdv  # noqa: E402
from lightning_jax.attention.reference import quadratic  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

CHECKS = [(2, 1000, 3, 128, 128, 1, True), (1, 4100, 2, 128, 128, 4, True), (2, 3000, 3, 64, 128, 2, True),
          (3, 300, 2, 128, 64, 1, False)]
VARIANTS = {"default": None, "fused": MosaicConfig(fused_dkdv=True), "two_sweeps": MosaicConfig(fused_dkdv=False),
            "mosaic_fused": MosaicConfig(backward="mosaic", fused_dkdv=True),
            "triton_backward": MosaicConfig(backward="triton")}


def _inputs(b, t, h, dk, dv, seed):
    keys = jax.random.split(jax.random.key(seed), 6)
    q, k = (jax.random.normal(key, (b, t, h, dk), jnp.bfloat16) for key in keys[:2])
    v, d_o = (jax.random.normal(key, (b, t, h, dv), jnp.bfloat16) for key in keys[2:4])
    return q, k, v, d_o, keys


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


def check(case, interpret=False):
    """Relative errors of (dq, dk, dv[, dL/dS_in]) of the fused and the three-sweep backward."""
    b, t, h, dk, dv, pieces, states = case
    q, k, v, d_o, keys = _inputs(b, t, h, dk, dv, seed=t)
    rates = jnp.asarray(alibi_slopes(h)) * 4
    s0 = jax.random.normal(keys[4], (b, h, dk, dv), jnp.float32) if states else None
    d_final = jax.random.normal(keys[5], (b, h, dk, dv), jnp.float32) if states else None
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    (_, final), vjp = jax.vjp(lambda q, k, v, s: quadratic(q, k, v, rates, s, scale=0.3), *up, s0)
    want = vjp((d_o.astype(jnp.float32), jnp.zeros_like(final) if d_final is None else d_final))
    want = want if states else want[:3]
    kw = dict(scale=0.3, warp_specialized=True, stages=2 if interpret else 3, interpret=interpret)
    fused = jax.block_until_ready(kernels.backward(q, k, v, rates, s0, d_o, d_final, fused=(pieces, 1, 2), **kw))
    sweeps = jax.block_until_ready(kernels.backward(q, k, v, rates, s0, d_o, d_final, **kw))
    return dict(case=list(case), fused=[_rel(a, w) for a, w in zip(fused, want)],
                three_sweeps=[_rel(a, w) for a, w in zip(sweeps, want)])


def time_kernel(shape):
    """ms of the fused sweep alone (rows per program 1, 2, 4, ...) and of the dV and dK sweeps."""
    b, t, h, d = shape
    rates = jnp.asarray(alibi_slopes(h))
    sets = [_inputs(b, t, h, d, d, seed=s)[:4] for s in range(2)]
    _, rows = launch_plan(b, t, h, d, 132)
    kw = dict(warp_specialized=True, stages=3, rows_per_program=rows)
    sweeps = jax.jit(lambda q, k, v, d_o: (kernels.forward(k, q, d_o, rates, None, reverse=True, **kw)[0],
                                           kernels.forward(v, d_o, q, rates, None, reverse=True, **kw)[0]))
    row = dict(shape=list(shape), dk_dv_sweeps=time_jax(sweeps, sets) * 1e3)
    r = 1
    while b % r == 0 and (r == 1 or b * h // r >= 100):
        alone = jax.jit(lambda q, k, v, d_o, r=r: dkdv(q, k, v, d_o, rates, None, rows_per_program=r)[:2])
        row[f"dkdv_rows{r}"] = time_jax(alone, sets) * 1e3
        r *= 2
    return row


def check_documents(config=MosaicConfig(fused_dkdv=True)):
    """Relative errors (in norm) of the op's o and gradients with packed documents against the oracle's."""
    b, t, h, d = 2, 1000, 4, 128
    q, k, v, d_o, keys = _inputs(b, t, h, d, d, seed=11)
    rates = jnp.asarray(alibi_slopes(h))
    seg = jnp.broadcast_to(sum((jnp.arange(t) >= c).astype(jnp.int32) for c in (1, 64, 300, 999)), (b, t))
    s0 = jax.random.normal(keys[4], (b, h, d, d), jnp.float32)

    def run(f, *args):
        (o, final), vjp = jax.vjp(f, *args)
        return (o, *vjp((d_o.astype(o.dtype), jnp.zeros_like(final))))

    ours = run(lambda q, k, v, s: lightning_attention(q, k, v, rates, initial_state=s, implementation="pallas_mosaic",
                                                      config=config, segment_ids=seg, return_final_state=True),
               q, k, v, s0)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want = run(lambda q, k, v, s: quadratic(q, k, v, rates, s, segment_ids=seg), *up, s0)
    norm = lambda a, w: float(np.linalg.norm(np.asarray(a, np.float32) - np.asarray(w, np.float32))
                              / np.linalg.norm(np.asarray(w, np.float32)))
    return dict(case="documents", names=["o", "dq", "dk", "dv", "d_initial_state"],
                errors=[norm(a, w) for a, w in zip(ours, want)])


def time_op(shape, variants, document_length=None):
    """ms: the op's forward, then forward + backward for each variant."""
    b, t, h, d = shape
    rates = jnp.asarray(alibi_slopes(h))
    sets = [_inputs(b, t, h, d, d, seed=s)[:4] for s in range(2)]
    seg = None if document_length is None else jnp.broadcast_to(jnp.arange(t) // document_length, (b, t))

    def op(config):
        return lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", config=config,
                                                   segment_ids=seg)

    row = dict(shape=list(shape), forward=time_jax(jax.jit(lambda q, k, v, d_o: op(None)(q, k, v)), sets) * 1e3)
    for name in variants:
        def both(q, k, v, d_o, f=op(VARIANTS[name])):
            o, vjp = jax.vjp(f, q, k, v)
            return o, vjp(d_o)

        row[name] = time_jax(jax.jit(both), sets) * 1e3
    return row


def _shapes(text):
    return [tuple(int(n) for n in s.split("x")) for s in text.split(",") if s]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--kernel-shapes", default="")
    parser.add_argument("--shapes", default="64x1024x16x128,4x16384x16x128")
    parser.add_argument("--variants", default="default,two_sweeps")
    parser.add_argument("--document-length", type=int, default=None)
    parser.add_argument("--out", default="fused_dkdv.json")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: got {unknown}, expected names from {sorted(VARIANTS)}")
    results = dict(command=" ".join(sys.argv), jax=jax.__version__, device=str(jax.devices()[0].device_kind),
                   checks=[], kernel=[], op=[])

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    if args.check:
        for case in CHECKS:
            results["checks"].append(check(case))
            log(results["checks"][-1])
            save()
        if args.document_length:
            results["checks"].append(check_documents())
            log(results["checks"][-1])
            save()
    for shape in _shapes(args.kernel_shapes):
        results["kernel"].append(time_kernel(shape))
        log(results["kernel"][-1])
        save()
    for shape in _shapes(args.shapes):
        results["op"].append(time_op(shape, variants, args.document_length))
        log(results["op"][-1])
        save()


if __name__ == "__main__":
    main()
