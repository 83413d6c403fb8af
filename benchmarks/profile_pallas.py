"""Runs the Pallas kernels a few times on one shape, for a profiler to watch (Nsight Compute).

    ncu --clock-control none -k regex:lightning --section SpeedOfLight --section LaunchStats \
        --section Occupancy python3 benchmarks/profile_pallas.py --shape 64x1024x16x128

Forward and forward+backward of `lightning_attention_triton` in bf16 (fresh N(0, 1) inputs, ALiBi
rates), `--calls` times each after one compile call; `--config key=value,...` overrides TritonConfig fields.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import jax.numpy as jnp

from lightning_jax.attention import TritonConfig
from lightning_jax.attention.pallas_triton import lightning_attention_triton
from lightning_jax.attention.schedules import alibi_slopes


def parse_config(text: str) -> TritonConfig:
    fields = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        fields[key] = int(value)
    return TritonConfig(**fields)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="64x1024x16x128", help="BxTxHxD")
    p.add_argument("--calls", type=int, default=1)
    p.add_argument("--config", default="")
    args = p.parse_args()
    shape = tuple(int(x) for x in args.shape.split("x"))
    cfg = parse_config(args.config)
    rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    q, k, v, d_o = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)

    def f(q, k, v):
        return lightning_attention_triton(q, k, v, rates, None, config=cfg)[0]

    fwd = jax.jit(f)

    @jax.jit
    def fb(q, k, v, d_o):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(d_o)

    jax.block_until_ready((fwd(q, k, v), fb(q, k, v, d_o)))
    for _ in range(args.calls):
        jax.block_until_ready(fwd(q, k, v))
        jax.block_until_ready(fb(q, k, v, d_o))
    print("done", shape, cfg)


if __name__ == "__main__":
    main()
