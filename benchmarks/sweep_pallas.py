"""Tuning sweep for the Pallas kernels' Config on the GPU (one process, one table).

    PYTHONPATH=$PWD python3 benchmarks/sweep_pallas.py --out $OUT/sweep.json \
        [--configs default,unfused] [--shapes 64x1024x16x128,...] [--modules old=OLD_pallas_gpu.py]

Times forward and forward+backward of `lightning_attention_triton` for each TritonConfig in
CONFIGS on a few bf16 shapes (family (a) ends at dim 128, and dim 256), then checks that the default
config compiles (Triton's shared-memory limit) for fp32, fp16 and bf16 at wide dims. `--modules`
adds the defaults of earlier single-file versions of the kernels (`pallas_gpu.py`, which exposes
`Config` and `lightning_attention_pallas`, e.g. `git show 8fe8642:lightning_jax/attention/pallas_gpu.py`),
each under its name, for before/after comparisons within one run. The defaults in
TritonConfig come from such sweeps; docs/kernels.md tabulates the variants tried.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from attention import time_jax  # noqa: E402

from lightning_jax.attention import TritonConfig  # noqa: E402
from lightning_jax.attention.pallas_triton import lightning_attention_triton  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

C = TritonConfig
CONFIGS = {
    "default": C(),
    "unfused": C(fuse_backward=False),
    "scan256": C(scan_tile=256),
    "fwd_s1": C(num_stages=1),
    "bwd_s1": C(bwd_num_stages=1),
    # Chunk rule: chunks up to 2048 tokens with >= one wave of programs (the rule before the
    # current one), then one and four waves of programs.
    "chunks2048_one_wave": C(chunk=2048, chunk_programs=264),
    "chunk_programs256": C(chunk_programs=256),
    "chunk_programs1024": C(chunk_programs=1024),
    "wide_t32_w4": C(wide_tile=32, wide_num_warps=4, wide_bwd_num_warps=4),
    "wide_w8": C(wide_num_warps=8),
    "wide_bwd_w4": C(wide_bwd_num_warps=4),
    "minprog64": C(min_programs=64),
    "fwd_v128_w8": C(block_v=128, num_warps=8),
    "fwd_c128_w8": C(block=128, num_warps=8),
    "fwd_c32": C(block=32),
    "bwd_c128_w8": C(bwd_block=128, bwd_num_warps=8),
    # Chunk-state kernel (its own block, tile, warps and stages) and the scan over chunks.
    "state_t64": C(state_tile=64),
    "state_s4": C(state_num_stages=4),
    "state_b32_s4": C(state_block=32, state_num_stages=4),
    "state_b32_s6": C(state_block=32, state_num_stages=6),
    "state_b128_s2": C(state_block=128, state_num_stages=2),
    "scan_t1024": C(scan_tile=1024),
    "scan_g8": C(scan_group=8),
}
SHAPES = [(64, 1024, 16, 128), (1, 65536, 16, 128), (8, 2048, 32, 256)]
COMPILE_CHECKS = [(jnp.float32, 128), (jnp.float32, 256), (jnp.float16, 192), (jnp.bfloat16, 256)]


def run(shape, cfg, dtype=jnp.bfloat16, timing=True, attend=lightning_attention_triton):
    """{fwd_ms, fb_ms} of `attend(q, k, v, rates, None, config=cfg)` at one shape."""
    rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(0), 8)
    sets = [tuple(jax.random.normal(keys[4 * s + i], shape, dtype) for i in range(4)) for s in range(2)]

    def f(q, k, v):
        return attend(q, k, v, rates, None, config=cfg)[0]

    fwd = jax.jit(lambda q, k, v, do: f(q, k, v))

    def fb(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    fb = jax.jit(fb)
    jax.block_until_ready(fb(*sets[0]))
    if not timing:
        return {}
    return dict(fwd_ms=1e3 * time_jax(fwd, sets), fb_ms=1e3 * time_jax(fb, sets))


def load_module(name: str, path: str):
    """An earlier single-file version of the kernels (imported under its own name, beside the package)."""
    spec = importlib.util.spec_from_file_location(f"pallas_gpu_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def parse_shape(text: str):
    return tuple(int(x) for x in text.split("x"))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="sweep.json")
    p.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS, comma separated")
    p.add_argument("--shapes", default=None, help="BxTxHxD,... (default: SHAPES)")
    p.add_argument("--modules", default=None, help="NAME=PATH,...: earlier single-file pallas_gpu.py versions")
    p.add_argument("--no-compile-checks", action="store_true")
    args = p.parse_args()
    shapes = [parse_shape(x) for x in args.shapes.split(",")] if args.shapes else SHAPES
    variants = {name: (CONFIGS[name], lightning_attention_triton) for name in args.configs.split(",")}
    for item in args.modules.split(",") if args.modules else []:
        name, path = item.split("=")
        module = load_module(name, path)
        variants = {name: (module.Config(), module.lightning_attention_pallas), **variants}
    res = {}
    for shape in shapes:
        for name, (cfg, attend) in variants.items():
            key = f"{shape} {name}"
            t0 = time.perf_counter()
            try:
                res[key] = run(shape, cfg, attend=attend)
            except Exception as e:
                res[key] = dict(error=repr(e)[:200])
            print(key, res[key], f"{time.perf_counter() - t0:.1f}s", flush=True)
            json.dump(res, open(args.out, "w"), indent=1)
    checks = [] if args.no_compile_checks else COMPILE_CHECKS
    for dtype, dim in checks:  # Triton's shared-memory limit, default config
        key = f"compile {jnp.dtype(dtype).name} dim{dim}"
        try:
            run((1, 1000, 2, dim), C(), dtype, timing=False)
            res[key] = "compiles"
        except Exception as e:
            res[key] = repr(e)[:160]
        print(key, res[key], flush=True)
    json.dump(res, open(args.out, "w"), indent=1)
    print("\nshape config: fwd_ms fb_ms")
    for k, v in res.items():
        if isinstance(v, dict) and "fwd_ms" in v:
            print(f"{k:40s} {v['fwd_ms']:7.3f} {v['fb_ms']:7.3f}")
        else:
            print(f"{k:40s} {v}")


if __name__ == "__main__":
    main()
