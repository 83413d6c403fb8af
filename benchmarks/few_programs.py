"""Grids that do not fill the GPU (batch x heads x 64-wide value tiles below the SM count, or a
last wave of programs mostly idle): the Mosaic kernels on whole sequences (one program per row,
some SMs idle) against the Mosaic kernels with pieces, the Triton kernels, `"pallas"` (which
chooses) and jla; `mosaic` and `mosaic_no_tail` are the Mosaic op with its own launch plan, with
and without the tail launch (`config.tail_plan`), `mosaic_backward` the same with the Mosaic
backward forced (where the plan cuts pieces it would take the Triton one), `mosaic_pieces2` and
`mosaic_pieces4` the Mosaic op with that many pieces forced (the plan's own choice of backward). Forward and forward +
backward, timed as attention.py (back-to-back calls, one sync per batch, medians). With --check,
first the op's output, final state and four gradients against the fp32 quadratic form at two
half-grid shapes (one with the Triton backward, one with the Mosaic backward), or at
--check-shapes, with packed documents starting at --check-starts (through "pallas_mosaic"). With
--document-length L the timings run packed documents of L tokens (segment ids t // L; jla, which
has none, is skipped).

    PYTHONPATH=$PWD python3 benchmarks/few_programs.py [--check] [--check-shapes 1x4099x96x128,...]
        [--check-starts 100,2048] [--shapes 2x2048x16x128,... or "" for none] [--variants pallas,pallas_triton,mosaic_whole,mosaic_pieces,jla]
        [--document-length L] [--deadline S] [--out F.json]

Data: docs/attention_mosaic_few_programs_h200.json (variants pallas_triton, mosaic_whole,
mosaic_pieces, jla; `pallas_triton` there is named `triton`), docs/attention_mosaic_half_grid_h200.json
(--check, variants pallas, pallas_triton, six half-grid shapes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from attention import jax_variants, log, time_jax  # noqa: E402
from mosaic_forward import check_gradients  # noqa: E402

from lightning_jax.attention import MosaicConfig, lightning_attention  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

SHAPES = [(2, 2048, 16, 128), (1, 2048, 16, 128), (2, 4096, 16, 128), (2, 8192, 16, 128), (2, 16384, 16, 128),
          (1, 16384, 16, 128), (8, 1024, 8, 64), (1, 8192, 8, 128), (4, 1024, 16, 64)]
CHECKS = [(2, 3000, 16, 128, ()), (2, 2000, 16, 128, ())]  # 64 programs: 47 blocks (Triton backward), 32 (Mosaic)
VARIANTS = ["pallas", "pallas_triton", "mosaic_whole", "mosaic_pieces", "mosaic", "mosaic_no_tail", "mosaic_backward",
            "mosaic_pieces2", "mosaic_pieces4", "jla"]


def variant(name, rates, shape, segment_ids=None):
    """The forward of one variant, (q, k, v) -> o; None where it does not run (jla with documents)."""
    if name in ("pallas", "pallas_triton"):
        return lambda q, k, v: lightning_attention(q, k, v, rates, implementation=name, segment_ids=segment_ids)
    if name.startswith("mosaic"):  # mosaic_pieces and mosaic: the Mosaic op's own launch plan
        config = {"mosaic_whole": MosaicConfig(pieces=1), "mosaic_no_tail": MosaicConfig(tail_pieces=1),
                  "mosaic_backward": MosaicConfig(backward="mosaic"), "mosaic_pieces2": MosaicConfig(pieces=2),
                  "mosaic_pieces4": MosaicConfig(pieces=4)}.get(name)
        return lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_mosaic", config=config,
                                                   segment_ids=segment_ids)
    return None if segment_ids is not None else jax_variants(shape, rates).get(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=None, help="comma-separated BxTxHxD")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--check", action="store_true", help="the op against the fp32 quadratic form first")
    ap.add_argument("--check-shapes", default=None, help="comma-separated BxTxHxD for --check (default: two half grids)")
    ap.add_argument("--check-starts", default="", help="comma-separated token positions where documents start in "
                    "the --check-shapes cases (segment ids; none by default)")
    ap.add_argument("--document-length", type=int, default=None,
                    help="time packed documents of this many tokens (segment ids t // L)")
    ap.add_argument("--deadline", type=float, default=None, help="no new shape after this many seconds")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    def shape_list(text):  # "BxTxHxD,..." -> [(B, T, H, D), ...]
        return [tuple(int(x) for x in s.split("x")) for s in text.split(",") if s]

    shapes = SHAPES if args.shapes is None else shape_list(args.shapes)
    starts = tuple(int(x) for x in args.check_starts.split(",") if x)
    checks = CHECKS if args.check_shapes is None else [(*shape, starts) for shape in shape_list(args.check_shapes)]
    names = [n for n in args.variants.split(",") if n]
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"--variants: got {name!r}, expected names from {VARIANTS}")
    if args.document_length is not None and args.document_length < 1:
        raise SystemExit(f"--document-length: got {args.document_length}, expected a positive number of tokens")
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "times": {},
               "document_length": args.document_length}
    for case in checks if args.check else []:
        errs = check_gradients(case)
        results["checks"].append({"case": list(case[:4]), "starts": list(case[4]), **errs, "ok": max(errs.values()) < 1e-2})
        log("check", results["checks"][-1])
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    start = time.monotonic()
    for shape in shapes:
        if args.deadline is not None and time.monotonic() - start > args.deadline:
            log(f"--deadline reached: stopping before {shape}")
            break
        rates = jnp.asarray(alibi_slopes(shape[2]), jnp.float32)
        keys = jax.random.split(jax.random.PRNGKey(3), 8)
        arg_sets = [tuple(jax.random.normal(keys[4 * s + i], shape, jnp.bfloat16) for i in range(4)) for s in range(2)]
        segment_ids = None
        if args.document_length is not None:
            segment_ids = jnp.broadcast_to(jnp.arange(shape[1]) // args.document_length, shape[:2]).astype(jnp.int32)
        row = {}
        for name in names:
            f = variant(name, rates, shape, segment_ids)
            if f is None:
                continue

            def fb_fn(q, k, v, do, f=f):
                o, vjp = jax.vjp(f, q, k, v)
                return o, vjp(do)
            try:
                row[name] = [time_jax(jax.jit(lambda q, k, v, do, f=f: f(q, k, v)), arg_sets),
                             time_jax(jax.jit(fb_fn), arg_sets)]
            except Exception as e:  # noqa: BLE001
                row[name] = repr(e)[:200]
        key = "x".join(map(str, shape))
        results["times"][key] = row
        log(key, {k: [round(x * 1e3, 4) for x in v] if isinstance(v, list) else v for k, v in row.items()})
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    print("\nshape | programs | " + " | ".join(names) + "   (ms, forward / forward + backward)")
    for key, row in results["times"].items():
        b, t, h, d = map(int, key.split("x"))
        cells = [f"{row[n][0] * 1e3:.4f} / {row[n][1] * 1e3:.4f}" if isinstance(row.get(n), list) else "-"
                 for n in names]
        print(f"{key} | {b * h * -(-d // 64)} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
