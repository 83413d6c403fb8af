"""The lightning attention op with one sequence split over N GPUs (context parallelism) against one GPU.

    python benchmarks/context_parallel.py                       # N = all GPUs, 1M tokens per GPU
    python benchmarks/context_parallel.py --tokens-per-device 262144 --heads 16 --dim 128
    python benchmarks/context_parallel.py --tiny                 # CPU smoke run (fake devices, xla)

Inputs: batch 1, `--heads` heads of `--dim`, bf16, ALiBi rates, N(0, 1) q, k, v scaled by 1/sqrt(d).
1. Check: on a short sequence (`--check-tokens` per device), outputs and the gradients for q, k, v of
   the split op (`lightning_attention(..., context_axis="context")` in `jax.shard_map`) against the
   same call on one device: relative max error.
2. Time: forward and forward + backward at `--tokens-per-device` tokens on each of N devices (one
   sequence of N x that) against one device holding one sequence of `--tokens-per-device` tokens
   (the same work per device): back-to-back calls, one sync per batch of calls, median of 5 batches.
Prints one JSON line per measurement, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--tiny" in sys.argv:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lightning_jax.attention import lightning_attention  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

AXIS = "context"


def op(devices, rates, implementation, grad: bool):
    """jit-ted f(q, k, v): the op over `devices` with time split over them (one device: plain)."""
    n = len(devices)

    def attend(q, k, v):
        return lightning_attention(q, k, v, rates, implementation=implementation,
                                   context_axis=AXIS if n > 1 else None)

    fn = attend
    if n > 1:
        mesh = jax.sharding.Mesh(np.array(devices), (AXIS,))
        spec = jax.P(None, AXIS)
        fn = jax.shard_map(attend, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    if grad:
        def loss(q, k, v):
            return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2) / 2

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return jax.jit(fn)


def inputs(devices, time_, heads, dim, dtype, seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (1, time_, heads, dim)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) / np.sqrt(dim) for key in keys)
    if len(devices) > 1:
        sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.P(None, AXIS))
    else:
        sharding = jax.sharding.SingleDeviceSharding(devices[0])
    return tuple(jax.device_put(x.astype(dtype), sharding) for x in (q, k, v))


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / (np.max(np.abs(ref)) or 1.0))


def time_calls(fn, args, calls: int) -> float:
    """Median seconds per call over 5 batches of `calls` back-to-back calls, one sync per batch."""
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) / calls)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens-per-device", type=int, default=1048576)
    parser.add_argument("--check-tokens", type=int, default=65536, help="tokens per device in the check")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--calls", type=int, default=5, help="calls per timed batch")
    parser.add_argument("--implementation", default=None, help="default: the op's default for the device")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: 2 fake devices, short sequences")
    args = parser.parse_args()
    if args.tiny:
        args.tokens_per_device, args.check_tokens, args.heads, args.dim, args.calls = 2048, 512, 2, 32, 1
    devices = jax.devices()
    n = len(devices)
    if n < 2:
        raise SystemExit(f"needs 2 or more devices, found {n}")
    dtype = jnp.bfloat16
    rates = jnp.asarray(alibi_slopes(args.heads), jnp.float32)
    impl = args.implementation
    rows = []

    # 1. The check: N devices against one, same sequence.
    q, k, v = inputs(devices, n * args.check_tokens, args.heads, args.dim, dtype, seed=1)
    one = [devices[0]]
    q1, k1, v1 = (jax.device_put(x, devices[0]) for x in (q, k, v))
    out_n, out_1 = op(devices, rates, impl, False)(q, k, v), op(one, rates, impl, False)(q1, k1, v1)
    (_, grads_n), (_, grads_1) = op(devices, rates, impl, True)(q, k, v), op(one, rates, impl, True)(q1, k1, v1)
    check = {"check": f"{n} x {args.check_tokens:,} tokens vs one device", "o": rel_err(out_n, out_1),
             **{f"d{name}": rel_err(a, b) for name, a, b in zip("qkv", grads_n, grads_1)}}
    print(json.dumps(check), flush=True)

    # 2. Time: the same tokens per device.
    for devs in (one, devices):
        tokens = len(devs) * args.tokens_per_device
        q, k, v = inputs(devs, tokens, args.heads, args.dim, dtype, seed=2)
        row = {"devices": len(devs), "tokens": tokens, "heads": args.heads, "dim": args.dim,
               "device": devs[0].device_kind,
               "forward_ms": 1e3 * time_calls(op(devs, rates, impl, False), (q, k, v), args.calls),
               "forward_backward_ms": 1e3 * time_calls(op(devs, rates, impl, True), (q, k, v), args.calls)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]
    print("| devices | tokens (one sequence) | forward ms | fwd + bwd ms | fwd + bwd vs one device |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['devices']} | {r['tokens']:,} | {r['forward_ms']:.3f} | {r['forward_backward_ms']:.3f} | "
              f"{r['forward_backward_ms'] / base['forward_backward_ms']:.2f}x |")
    print(f"check ({check['check']}): relative max error o {check['o']:.1e}, dq {check['dq']:.1e}, "
          f"dk {check['dk']:.1e}, dv {check['dv']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
