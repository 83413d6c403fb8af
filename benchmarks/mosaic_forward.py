"""The Pallas Mosaic GPU forward on a Hopper GPU: correctness against the fp32 chunked reference,
then its speed per (stages, pieces) against our Triton forward and jla's, in one process.

    PYTHONPATH=$PWD python3 benchmarks/mosaic_forward.py [--shapes 1x65536x16x128,...] [--out F.json]

Timing as in attention.py: back-to-back calls with one sync per batch of calls, medians of 9.
Every timed row is the forward alone (o; the final state is computed but not returned).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from attention import FAMILY_A, chunked_reference, copy_bandwidth, jax_variants, log, rel_err, time_jax  # noqa: E402

from lightning_jax.attention.pallas_mosaic import forward  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

CHECKS = [  # (batch, time, heads, dim_k, dim_v, initial state, pieces, stages, warp-specialised)
    (1, 1, 2, 64, 64, True, 1, 2, True),
    (2, 1000, 4, 128, 128, True, 1, 2, True),
    (1, 4099, 8, 128, 128, False, 4, 2, True),
    (1, 65536, 4, 128, 128, True, 8, 2, True),
    (1, 777, 2, 64, 256, True, 2, 2, True),
    (6, 300, 2, 64, 64, True, 2, 2, True),
    (1, 2048, 2, 192, 64, False, 1, 1, False),
]
SHAPES = FAMILY_A + [(1, 8192, 96, 128), (4, 2048, 16, 128), (8, 1024, 8, 64)]
# name: s (one warpgroup) or w (warp-specialised), stages; p pieces; g rows per program
VARIANTS = ["s2p1g1", "w2p1g1", "w2p1g2", "w2p1g4", "w2p1g16", "w2p2g1", "w2p4g1", "w2p8g1", "w2p8g2"]


def check(case):
    batch, time, heads, dk, dv, with_s0, pieces, stages, ws = case
    rows_per_program = 3 if batch == 6 else 1
    keys = jax.random.split(jax.random.PRNGKey(time), 4)
    q, k = (jax.random.normal(key, (batch, time, heads, dk), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, time, heads, dv), jnp.bfloat16)
    s0 = jax.random.normal(keys[3], (batch, heads, dk, dv), jnp.float32) if with_s0 else None
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32).at[0].set(0.0)
    o, final = jax.jit(lambda *a: forward(*a, pieces=pieces, stages=stages, rows_per_program=rows_per_program, warp_specialized=ws))(q, k, v, rates, s0)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    zero = jnp.zeros((batch, heads, dk, dv), jnp.float32)
    want_o, want_final = jax.jit(chunked_reference)(*up, rates, zero if s0 is None else s0)
    return rel_err(o, want_o), rel_err(final, want_final)


def time_shape(shape):
    batch, time, heads, dim = shape
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    arg_sets = [tuple(jax.random.normal(keys[3 * s + i], shape, jnp.bfloat16) for i in range(3)) for s in range(2)]
    row = {}
    peers = jax_variants(shape, rates)
    for name in ("pallas", "jla"):
        if name in peers:
            try:
                row[name] = time_jax(jax.jit(peers[name]), arg_sets)
            except Exception as e:  # noqa: BLE001
                row[name] = repr(e)[:200]
    blocks = -(-time // 64)
    programs = batch * heads * (dim // 64)
    for name in VARIANTS:
        ws, stages = name[0] == "w", int(name[1])
        pieces, rows = (int(x) for x in name[3:].split("g"))
        if pieces > 1 and (blocks // pieces < 4 or programs >= 256):
            continue
        if rows > 1 and (batch * pieces < 4 * rows or time > 4096):
            continue
        fn = jax.jit(lambda q, k, v, s=stages, p=pieces, g=rows, w=ws: forward(
            q, k, v, rates, pieces=p, stages=s, rows_per_program=g, warp_specialized=w)[0])
        try:
            row[name] = time_jax(fn, arg_sets)
        except Exception as e:  # noqa: BLE001
            row[name] = repr(e)[:200]
        log(f"  {shape} {name} {row[name]}")
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated BxTxHxD (default: family a and three of b)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-check", action="store_true")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "times": {}}
    if not args.skip_check:
        for case in CHECKS:
            try:
                err_o, err_s = check(case)
                results["checks"].append(dict(case=list(case), err_o=err_o, err_state=err_s, ok=max(err_o, err_s) < 1e-2))
            except Exception as e:  # noqa: BLE001
                results["checks"].append(dict(case=list(case), error=repr(e)[:500]))
            log("check", results["checks"][-1])
    results["bandwidth"] = copy_bandwidth()
    for shape in shapes:
        results["times"]["x".join(map(str, shape))] = time_shape(shape)
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    log(f"copy bandwidth {results['bandwidth'] / 1e12:.2f} TB/s")
    log(f"{'shape':18s} {'floor':>6s} {'triton':>7s} {'jla':>7s} {'best':>7s} best-of  | all mosaic (ms)")
    for key, row in results["times"].items():
        b, t, h, d = map(int, key.split("x"))
        floor = 4 * b * t * h * d * 2 / results["bandwidth"] * 1e3
        ms = {k: v * 1e3 for k, v in row.items() if isinstance(v, float)}
        mos = {k: v for k, v in ms.items() if k[0] in "sw" and k[1].isdigit()}
        best = min(mos, key=mos.get) if mos else "-"
        fmt = lambda x: f"{x:7.3f}" if isinstance(x, float) else f"{'-':>7s}"
        log(f"{key:18s} {floor:6.3f} {fmt(ms.get('pallas'))} {fmt(ms.get('jla'))} {fmt(mos.get(best))} {best:7s} | "
            + " ".join(f"{k}={v:.3f}" for k, v in mos.items()))


if __name__ == "__main__":
    main()
