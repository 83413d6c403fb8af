"""Where a short call's forward time goes (GPU): the op as users call it ("pallas"), the Mosaic
forward kernel called directly (its XLA decay tables built per call from the rates, behind an
optimization barrier as the op does), the same with the final state returned, the same with the
tables baked in as constants (no XLA work but the kernel), the tables alone, a trivial jitted call
(the host's dispatch floor), and jla. Timing as attention.py.

    PYTHONPATH=$PWD python3 benchmarks/short_calls.py [--shapes 4x2048x16x128,...] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from attention import jax_variants, log, time_jax  # noqa: E402

from lightning_jax.attention import lightning_attention  # noqa: E402
from lightning_jax.attention.pallas_mosaic import kernels  # noqa: E402
from lightning_jax.attention.pallas_mosaic.config import launch_plan  # noqa: E402
from lightning_jax.attention.pallas_triton.config import gpu_facts  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

SHAPES = [(4, 2048, 16, 128), (64, 1024, 16, 128), (2, 2048, 16, 128)]


def time_shape(shape):
    batch, time, heads, dim = shape
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    arg_sets = [tuple(jax.random.normal(keys[3 * s + i], shape, jnp.bfloat16) for i in range(3)) for s in range(2)]
    _, rows = launch_plan(batch, time, heads, dim, gpu_facts().sm_count)
    options = dict(stages=3, warp_specialized=True, rows_per_program=rows)  # the op's forward without pieces
    barrier = jax.lax.optimization_barrier  # as the op: the tables are built at run time, not folded
    original = kernels.decay_tables
    row = {"op": time_jax(jax.jit(lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas")),
                          arg_sets),
           "kernel": time_jax(jax.jit(lambda q, k, v: kernels.forward(q, k, v, barrier(rates), **options)[0]),
                              arg_sets),
           "kernel+final": time_jax(jax.jit(lambda q, k, v: kernels.forward(q, k, v, barrier(rates), **options)),
                                    arg_sets)}
    tables = {}

    def constant_tables(_, **kw):  # computed once, outside the timed function: constants in its program
        key = tuple(sorted(kw.items()))
        if key not in tables:
            tables[key] = jax.block_until_ready(original(rates, **kw))
        return tables[key]

    kernels.decay_tables = constant_tables
    try:
        row["kernel, constant tables"] = time_jax(
            jax.jit(lambda q, k, v: kernels.forward(q, k, v, rates, **options)[0]), arg_sets)
    finally:
        kernels.decay_tables = original
    row["tables alone"] = time_jax(jax.jit(lambda r: original(r, block=64, length=time, dim_k=dim)),
                                   [(rates,), (rates + 0.001,)])
    row["trivial"] = time_jax(jax.jit(lambda q, k, v: q[0, :8] + 1), arg_sets)
    peers = jax_variants(shape, rates)
    if "jla" in peers:
        row["jla"] = time_jax(jax.jit(peers["jla"]), arg_sets)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated BxTxHxD")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "times": {}}
    for shape in shapes:
        row = time_shape(shape)
        results["times"]["x".join(map(str, shape))] = row
        log(shape, {k: round(v * 1e3, 4) for k, v in row.items()})
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    names = list(next(iter(results["times"].values())))
    print("\nshape | " + " | ".join(names) + "   (ms)")
    for key, row in results["times"].items():
        print(key + " | " + " | ".join(f"{row[n] * 1e3:.4f}" if n in row else "-" for n in names))


if __name__ == "__main__":
    main()
