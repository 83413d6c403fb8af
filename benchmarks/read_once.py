"""The read-once forward (`pallas_mosaic.windows.forward_windows`: a cluster of P programs per
chain, windows of P x W blocks) against `"pallas"`'s forward and jla at grids with few chains.

First checks (--check): o and the final state against the fp32 quadratic form at small shapes
(ragged lengths, an initial state, P = 2 and 4), and against the Mosaic forward with pieces at
the long shapes. Then times the forward, back-to-back calls with one sync per batch (attention.py's
`time_jax`), medians, and prints a table last.

    PYTHONPATH=$PWD python3 benchmarks/read_once.py [--check] [--shapes 1x65536x16x128,...]
        [--layouts 4x8,4x4,2x8] [--peers pallas,jla] [--out F.json]

A layout PxW is P programs per chain and W blocks per segment.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, "benchmarks")
from attention import jax_variants, log, time_jax  # noqa: E402

from lightning_jax.attention import lightning_attention, reference  # noqa: E402
from lightning_jax.attention.pallas_mosaic import forward as pieces_forward  # noqa: E402
from lightning_jax.attention.pallas_mosaic.windows import forward_windows  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

SHAPES = [(1, 65536, 16, 128), (1, 131072, 16, 128), (1, 32768, 16, 128), (2, 16384, 16, 128)]
# (batch, time, heads, dim_k, dim_v, P, W, initial state): against the fp32 quadratic form.
SMALL = [(1, 3001, 4, 128, 128, 4, 2, True), (2, 1000, 2, 64, 128, 2, 4, False), (1, 4099, 2, 128, 64, 4, 8, True)]


def _inputs(shape, dim_v, seed):
    b, t, h, d = shape
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k = (jax.random.normal(keys[i], (b, t, h, d), jnp.bfloat16) for i in range(2))
    v = jax.random.normal(keys[2], (b, t, h, dim_v), jnp.bfloat16)
    s0 = jax.random.normal(keys[3], (b, h, d, dim_v), jnp.float32)
    return q, k, v, s0


def _rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def checks(shapes, layouts):
    rows = []
    for b, t, h, dk, dv, p, w, with_s0 in SMALL:
        q, k, v, s0 = _inputs((b, t, h, dk), dv, 1)
        s0 = s0 if with_s0 else None
        rates = jnp.asarray(alibi_slopes(h), jnp.float32).at[0].set(0.0)
        o, final = forward_windows(q, k, v, rates, s0, segments=p, window=w)
        want_o, want_final = reference.quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), rates, s0)
        rows.append({"case": [b, t, h, dk, dv, p, w, with_s0], "against": "fp32 quadratic", "o": _rel(o, want_o),
                     "final": _rel(final, want_final)})
        log("check", rows[-1])
    for shape in shapes:
        q, k, v, s0 = _inputs(shape, shape[3], 2)
        rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
        want_o, want_final = pieces_forward(q, k, v, rates, s0, pieces=4, warp_specialized=True)
        for p, w in layouts:
            o, final = forward_windows(q, k, v, rates, s0, segments=p, window=w)
            rows.append({"case": [*shape, p, w], "against": "Mosaic forward, 4 pieces", "o": _rel(o, want_o),
                         "final": _rel(final, want_final)})
            log("check", rows[-1])
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated BxTxHxD")
    ap.add_argument("--layouts", default="4x8,4x4,2x8", help="comma-separated PxW")
    ap.add_argument("--peers", default="pallas,jla", help="comma-separated: pallas, pallas_triton, jla")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s]
    layouts = [tuple(int(x) for x in s.split("x")) for s in args.layouts.split(",") if s]
    peers = [n for n in args.peers.split(",") if n]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "times": {}}
    if args.check:
        results["checks"] = checks(shapes[:1], layouts)
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    names = [f"windows_{p}x{w}" for p, w in layouts] + peers
    for shape in shapes:
        rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
        arg_sets = [_inputs(shape, shape[3], s)[:3] for s in range(2)]
        fns = {f"windows_{p}x{w}": (lambda q, k, v, p=p, w=w: forward_windows(q, k, v, rates, segments=p, window=w)[0])
               for p, w in layouts}
        others = jax_variants(shape, rates)
        for name in peers:
            if name in ("pallas", "pallas_triton"):
                fns[name] = lambda q, k, v, name=name: lightning_attention(q, k, v, rates, implementation=name)[0]
            elif name in others:
                fns[name] = others[name]
        row = {}
        for name, fn in fns.items():
            try:
                row[name] = time_jax(jax.jit(fn), arg_sets)
            except Exception as e:  # noqa: BLE001
                row[name] = repr(e)[:300]
            log("x".join(map(str, shape)), name, row[name])
        results["times"]["x".join(map(str, shape))] = row
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    for row in results["checks"]:
        print("check", row)
    print("\nshape | " + " | ".join(names) + "   (forward, ms)")
    for key, row in results["times"].items():
        cells = [f"{row[n] * 1e3:.4f}" if isinstance(row.get(n), float) else "-" for n in names]
        print(f"{key} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
