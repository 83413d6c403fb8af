"""The scan over chunks and the chunk-state kernel alone, for Config variants (GPU; one table).

    PYTHONPATH=$PWD python3 benchmarks/kernels_pallas.py [--shapes 1x65536x16x128,...] [--out F.json]

End-to-end sweeps (sweep_pallas.py) cannot tell a 10 us change in a 30 us kernel from noise; this
times `states.scan` (both directions, fp32 states) and `states.chunk_states` (U from k, v) by themselves and
checks each variant against the first of its kind. docs/kernels.md (the scan and chunk-state sections) has the
numbers behind the defaults of `TritonConfig.scan_*` and `TritonConfig.state_*`. A kernel of under ~50 us costs
about one jitted dispatch from Python, so its time here is the host's as much as the GPU's (the
scans' did not repeat between runs): time those with Nsight Compute (benchmarks/ncu_pallas.sh).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from attention import time_jax  # noqa: E402
from sweep_pallas import parse_shape  # noqa: E402

from lightning_jax.attention import TritonConfig  # noqa: E402
from lightning_jax.attention.pallas_triton import plan_for, states  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

C = TritonConfig
SCANS = {  # G chunks per step, state elements per program
    "default": C(),
    "g16_t1024": C(scan_group=16, scan_tile=1024),
    "g16_t256": C(scan_group=16, scan_tile=256),
    "g8_t512": C(scan_group=8, scan_tile=512),
    "g1_t1024": C(scan_group=1, scan_tile=1024),  # one row per step (the first scan's loop)
}
STATES = {  # value tile, block, stages, warps
    "default": C(),
    "t64_b64_s2": C(state_tile=64, state_block=64, state_num_stages=2),  # the forward's tiling
    "t128_b64_s2": C(state_num_stages=2),
    "t128_b128_s2": C(state_block=128, state_num_stages=2),
    "t128_b64_s2_w8": C(state_num_stages=2, state_num_warps=8),
}


def _plan(k, v, cfg):
    return plan_for(k.shape, v.shape[-1], k.dtype, config=cfg)


def time_kernels(shape):
    """{'SCAN|STATES name': {us, rel_err}} at one [batch, time, heads, dim] bf16 shape."""
    batch, time, heads, dim = shape
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    kv = [tuple(jax.random.normal(keys[2 * s + i], shape, jnp.bfloat16) for i in range(2)) for s in range(2)]
    plan = _plan(*kv[0], C())
    if plan.num_chunks == 1:
        return {"note": "one chunk per sequence at this shape: no scan, no chunk-state pass"}
    state_shape = (batch * heads, plan.dk_pad, plan.dv_pad)
    xs = [
        (jax.random.normal(keys[4 + s], (batch * heads, plan.num_chunks - 1) + state_shape[1:]),
         jax.random.normal(keys[6 + s], state_shape))
        for s in range(2)
    ]
    res = {}

    def record(key, fn, args, ref):
        out = jax.block_until_ready(fn(*args[0]))
        ref = out if ref is None else ref
        err = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        res[key] = dict(us=1e6 * time_jax(fn, args), rel_err=err)
        print(key, res[key], flush=True)
        return ref

    for reverse in (False, True):
        ref = None
        for name, cfg in SCANS.items():
            p = _plan(*kv[0], cfg)
            fn = jax.jit(lambda x, init, p=p: states.scan(p, x, init, rates, reverse=reverse))
            ref = record(f"scan{'_reverse' if reverse else ''} {name}", fn, xs, ref)
    ref = None
    for name, cfg in STATES.items():
        p = _plan(*kv[0], cfg)
        fn = jax.jit(lambda k, v, p=p: states.chunk_states(p, k, v, rates))
        ref = record(f"states {name}", fn, kv, ref)
    return res


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="1x65536x16x128,4x16384x16x128,8x2048x32x256")
    parser.add_argument("--out", default="kernels_pallas.json")
    args = parser.parse_args()
    try:
        shapes = [parse_shape(s) for s in args.shapes.split(",")]
        assert all(len(s) == 4 for s in shapes)
    except (ValueError, AssertionError):
        parser.error(f"--shapes: got {args.shapes!r}, expected BxTxHxD entries separated by commas")
    results = {str(shape): time_kernels(shape) for shape in shapes}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print("\nshape kernel variant: us (max |diff| / max |first variant|)")
    for shape, rows in results.items():
        for key, row in rows.items():
            print(f"{shape} {key:28s} " + (f"{row['us']:8.1f}  ({row['rel_err']:.1e})" if isinstance(row, dict) else row))


if __name__ == "__main__":
    main()
