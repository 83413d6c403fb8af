"""The Pallas Mosaic GPU forward on a Hopper GPU: correctness against the fp32 chunked reference,
then the forward's speed: the op as users call it ("pallas", which picks the Mosaic forward where
it covers the call), the Triton kernels ("pallas_triton"), jla's Mosaic GPU forward, and, with
--variants, kernel launch layouts by name, all in one process.

    PYTHONPATH=$PWD python3 benchmarks/mosaic_forward.py [--shapes 1x65536x16x128,...] [--variants all]
        [--out F.json]

A variant name is s (one warpgroup) or w (three), the stages, p and the pieces per sequence, g and
the rows per program; then optionally x and a count (cut each piece into that many sub-pieces in
the first kernel, `state_split`), r (the masked scores multiplied by V from registers) and u (the
state update's K^T diag(kdec) from registers). r and u are the kernels' defaults on the GPU, so a
name without the letter times the staged form; both need three warpgroups. Examples: w2p4g1,
w2p1g1ru, w2p4g1x2ru; prefixed with b: (b:w2p1g1ru) the variant times the Mosaic backward
(`kernels.backward`, its three sweeps) instead of the forward. Timing as in attention.py:
back-to-back calls with one sync per batch of calls, medians of 9. The other rows are the forward
alone (o; the final state is computed but not returned); the op's forward + backward is
attention.py's.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, "benchmarks")
from attention import FAMILY_A, chunked_reference, copy_bandwidth, jax_variants, log, rel_err, time_jax  # noqa: E402

from lightning_jax.attention import MosaicConfig, lightning_attention, reference  # noqa: E402
from lightning_jax.attention.pallas import choose_backend  # noqa: E402
from lightning_jax.attention.pallas_mosaic import backward, forward  # noqa: E402
from lightning_jax.attention.schedules import alibi_slopes  # noqa: E402

CHECKS = [  # (batch, time, heads, dim_k, dim_v, initial state, pieces, stages, warp-specialised[, r[, u]])
    (1, 1, 2, 64, 64, True, 1, 2, True),
    (2, 1000, 4, 128, 128, True, 1, 2, True),
    (1, 4099, 8, 128, 128, False, 4, 2, True),
    (1, 65536, 4, 128, 128, True, 8, 2, True),
    (1, 777, 2, 64, 256, True, 2, 2, True),
    (6, 300, 2, 64, 64, True, 2, 2, True),
    (1, 2048, 2, 192, 64, False, 1, 1, False),
    # the masked scores multiplied by V from registers (scores_in_registers)
    (2, 1000, 4, 128, 128, True, 1, 2, True, True),
    (1, 4099, 8, 128, 128, False, 4, 2, True, True),
    # the state update's K^T diag(kdec) from registers (update_in_registers), with r
    (2, 1000, 4, 128, 128, True, 1, 2, True, True, True),
    (1, 4099, 8, 128, 128, False, 4, 2, True, True, True),
    (1, 777, 2, 64, 256, True, 2, 2, True, True, True),
    # three stages (dim_k <= 128, both register forms)
    (2, 1000, 4, 128, 128, True, 1, 3, True, True, True),
    (1, 4099, 8, 128, 128, False, 4, 3, True, True, True),
]
SHAPES = FAMILY_A + [(1, 8192, 96, 128), (2, 16384, 16, 128), (4, 2048, 16, 128), (4, 4096, 64, 128),
                     (8, 2048, 32, 256), (8, 1024, 8, 64)]
# through lightning_attention("pallas"); the last: 32 programs of long rows, the Mosaic forward with pieces
OP_CHECKS = [(2, 3001, 16, 128), (1, 20000, 4, 64), (3, 500, 2, 256), (1, 65536, 16, 128)]
# packed documents through "pallas_mosaic", forward and gradients: (batch, time, heads, dim, document starts)
SEGMENT_CHECKS = [(2, 1000, 4, 128, (1, 64, 300, 999)), (1, 4096, 2, 64, (100, 2048, 2049))]
# the Mosaic forward and backward with three stages forced (the defaults take two with pieces), 4 and
# 16 pieces, through "pallas_mosaic": (batch, time, heads, dim, no documents)
STAGE3_GRADIENT_CHECKS = [(2, 1000, 4, 128, ()), (1, 4096, 2, 64, ())]
# name: s (one warpgroup) or w (warp-specialised), stages; p pieces; g rows per program; then r:
# the masked scores multiplied by V from registers (scores_in_registers), u: the state update's
# K^T diag(kdec) from registers (update_in_registers); three warpgroups only
VARIANT_NAME = re.compile(r"(b:)?([sw])([123])p(\d+)g(\d+)(?:x(\d+))?([ru]*)")
VARIANTS = ["s2p1g1", "w2p1g1", "w2p1g2", "w2p1g4", "w2p1g16", "w2p2g1", "w2p4g1", "w2p8g1", "w2p8g2",
            "w2p1g1r", "w2p4g1r", "w2p1g1ru"]


def check(case):
    batch, time, heads, dk, dv, with_s0, pieces, stages, ws, *flags = case
    registers, update = (bool(f) for f in (list(flags) + [False, False])[:2])
    rows_per_program = 3 if batch == 6 else 1
    keys = jax.random.split(jax.random.PRNGKey(time), 4)
    q, k = (jax.random.normal(key, (batch, time, heads, dk), jnp.bfloat16) for key in keys[:2])
    v = jax.random.normal(keys[2], (batch, time, heads, dv), jnp.bfloat16)
    s0 = jax.random.normal(keys[3], (batch, heads, dk, dv), jnp.float32) if with_s0 else None
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32).at[0].set(0.0)
    o, final = jax.jit(lambda *a: forward(*a, pieces=pieces, stages=stages, rows_per_program=rows_per_program,
                                          warp_specialized=ws, scores_in_registers=registers,
                                          update_in_registers=update))(q, k, v, rates, s0)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    zero = jnp.zeros((batch, heads, dk, dv), jnp.float32)
    want_o, want_final = jax.jit(chunked_reference)(*up, rates, zero if s0 is None else s0)
    return rel_err(o, want_o), rel_err(final, want_final)


def check_op(shape):
    """The undifferentiated op as users call it, against the reference (initial state included)."""
    batch, time, heads, dim = shape
    keys = jax.random.split(jax.random.PRNGKey(time), 4)
    q, k, v = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys[:3])
    s0 = jax.random.normal(keys[3], (batch, heads, dim, dim), jnp.float32)
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32).at[0].set(0.0)
    op = lambda q, k, v, r, s: lightning_attention(q, k, v, r, initial_state=s, return_final_state=True,
                                                   implementation="pallas")
    o, final = jax.jit(op)(q, k, v, rates, s0)
    want_o, want_final = jax.jit(chunked_reference)(*(x.astype(jnp.float32) for x in (q, k, v)), rates, s0)
    return rel_err(o, want_o), rel_err(final, want_final)


def check_gradients(case, config=None):
    """pallas_mosaic (the Mosaic forward and backward; `config` a MosaicConfig) against the fp32
    quadratic form: o, final state and the four gradients, relative errors. Documents start at the
    positions in case[4] (segment ids), none when it is empty."""
    batch, time, heads, dim, cuts = case
    keys = jax.random.split(jax.random.PRNGKey(time), 6)
    q, k, v, d_o = (jax.random.normal(key, (batch, time, heads, dim), jnp.bfloat16) for key in keys[:4])
    s0, d_final = (jax.random.normal(key, (batch, heads, dim, dim), jnp.float32) for key in keys[4:])
    seg = jnp.zeros((batch, time), jnp.int32)
    for c in cuts:
        seg = seg.at[:, c:].add(1)
    seg = seg if cuts else None
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32).at[0].set(0.0)

    def grads(fn, *args):
        (o, final), vjp = jax.vjp(fn, *args)
        return (o, final, *vjp((d_o.astype(o.dtype), d_final)))

    ours = jax.jit(lambda q, k, v, s: grads(lambda q, k, v, s: lightning_attention(
        q, k, v, rates, initial_state=s, return_final_state=True, segment_ids=seg, implementation="pallas_mosaic",
        config=config),
        q, k, v, s))(q, k, v, s0)
    up = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.jit(lambda q, k, v, s: grads(lambda q, k, v, s: reference.quadratic(q, k, v, rates, s, segment_ids=seg),
                                            q, k, v, s))(*up, s0)
    names = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")
    return {name: rel_err(a, b) for name, a, b in zip(names, ours, want)}


def time_shape(shape, variants):
    batch, time, heads, dim = shape
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(1), 6)
    arg_sets = [tuple(jax.random.normal(keys[3 * s + i], shape, jnp.bfloat16) for i in range(3)) for s in range(2)]
    row = {}
    peers = jax_variants(shape, rates)
    peers["pallas_triton"] = lambda q, k, v: lightning_attention(q, k, v, rates, implementation="pallas_triton")
    for name in ("pallas", "pallas_triton", "jla"):
        if name in peers:
            try:
                row[name] = time_jax(jax.jit(peers[name]), arg_sets)
            except Exception as e:  # noqa: BLE001
                row[name] = repr(e)[:200]
    blocks = -(-time // 64)
    programs = batch * heads * (dim // 64)
    for name in variants:
        parsed = VARIANT_NAME.fullmatch(name)
        if parsed is None:
            raise SystemExit(f"--variants: got {name!r}, expected a name such as w2p4g1, w2p4g1x2ru or b:w2p1g1r")
        grads, kind, stages, pieces, rows, split, flags = parsed.groups()
        grads, ws, stages, pieces, rows = bool(grads), kind == "w", int(stages), int(pieces), int(rows)
        split, registers, update = int(split or 1), "r" in flags, "u" in flags
        if pieces > 1 and (blocks // pieces < 4 or programs >= 256):
            continue
        if rows > 1 and (batch * pieces < 4 * rows or time > 4096):
            continue
        options = dict(pieces=pieces, stages=stages, rows_per_program=rows, warp_specialized=ws,
                       scores_in_registers=registers, update_in_registers=update, state_split=split)
        if grads:  # the Mosaic backward alone (three sweeps), v standing in for dO
            fn = jax.jit(lambda q, k, v, o=options: backward(q, k, v, rates, None, v, None, **o)[:3])
        else:
            fn = jax.jit(lambda q, k, v, o=options: forward(q, k, v, rates, **o)[0])
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
    ap.add_argument("--skip-check", action="store_true", help="no kernel checks and no op checks")
    ap.add_argument("--check-cases", default=None, help="comma-separated indices into CHECKS (default: all)")
    ap.add_argument("--variants", default="", help="comma-separated kernel variants to time, or 'all'")
    args = ap.parse_args()
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "checks": [], "times": {}}
    cases = CHECKS if args.check_cases is None else [CHECKS[int(i)] for i in args.check_cases.split(",")]
    for case in [] if args.skip_check else cases:  # the kernels
        try:
            err_o, err_s = check(case)
            results["checks"].append(dict(case=list(case), err_o=err_o, err_state=err_s, ok=max(err_o, err_s) < 1e-2))
        except Exception as e:  # noqa: BLE001
            results["checks"].append(dict(case=list(case), error=repr(e)[:500]))
        log("check", results["checks"][-1])
    for shape in [] if args.skip_check else OP_CHECKS:  # the op as users call it
        err_o, err_s = check_op(shape)
        results["checks"].append(dict(op_shape=list(shape), err_o=err_o, err_state=err_s, ok=max(err_o, err_s) < 1e-2))
        log("check", results["checks"][-1])
    gradient_cases = [("segments", case, None) for case in SEGMENT_CHECKS]  # packed documents
    gradient_cases += [("stages3", case, MosaicConfig(stages=3, backward="mosaic")) for case in STAGE3_GRADIENT_CHECKS]
    for kind, case, config in [] if args.skip_check else gradient_cases:
        try:
            errs = check_gradients(case, config)
            results["checks"].append({kind: list(case[:4]), "starts": list(case[4]), **errs,
                                      "ok": max(errs.values()) < 1e-2})
        except Exception as e:  # noqa: BLE001
            results["checks"].append({kind: list(case[:4]), "error": repr(e)[:500]})
        log("check", results["checks"][-1])
    results["bandwidth"] = copy_bandwidth()
    for shape in shapes:
        variants = VARIANTS if args.variants == "all" else [v for v in args.variants.split(",") if v]
        results["times"]["x".join(map(str, shape))] = time_shape(shape, variants)
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    log(f"copy bandwidth {results['bandwidth'] / 1e12:.2f} TB/s")
    log(f"{'shape':18s} {'floor':>6s} {'pallas':>7s} backend {'triton':>7s} {'jla':>7s} {'best':>7s} best-of  | variants (ms)")
    for key, row in results["times"].items():
        b, t, h, d = map(int, key.split("x"))
        floor = 4 * b * t * h * d * 2 / results["bandwidth"] * 1e3
        ms = {k: v * 1e3 for k, v in row.items() if isinstance(v, float)}
        mos = {k: v for k, v in ms.items() if k[0] in "sw" and k[1].isdigit()}
        best = min(mos, key=mos.get) if mos else "-"
        fmt = lambda x: f"{x:7.3f}" if isinstance(x, float) else f"{'-':>7s}"
        backend = choose_backend((b, t, h, d), d, jnp.bfloat16)
        log(f"{key:18s} {floor:6.3f} {fmt(ms.get('pallas'))} {backend:7s} {fmt(ms.get('pallas_triton'))} "
            f"{fmt(ms.get('jla'))} {fmt(mos.get(best))} {best:7s} | "
            + " ".join(f"{k}={v:.3f}" for k, v in mos.items())
            + "".join(f" {k}={v:.3f}" for k, v in ms.items() if k.startswith("b:")))


if __name__ == "__main__":
    main()
