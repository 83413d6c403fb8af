"""Lightning attention on the GPU: correctness against a chunked fp32-HIGHEST reference, then speed.

Run on the device machine (see docs/benchmarks.md for the exact command):

    PYTHONPATH=$PWD python3 benchmarks/attention.py --out $OUT/attention.json

Sections (check, family_a and family_b by default; pick with --sections check,family_a,family_b,segments):
  check     our op ("pallas", or --check-implementation) against `chunked_reference` for time in {1, 63, 64, 1000, 4096, 65536},
            dims {64, 128, 192, 256}, rates incl. 0 and 8, with an initial state: output, final
            state and all gradients (q, k, v, initial state), bf16 (<= 1e-2) and some fp32 (<= 1e-3).
  family_a  65,536 tokens, heads 16, dim 128, time 1,024 .. 65,536 (batch = 65,536 / time), bf16.
  family_b  the flash-linear-attention shape set, bf16.
  segments  the cost of packed documents: our op ("pallas") forward and forward+backward with
            segment_ids (--segments N equal documents per row, ids a traced argument) against none,
            at the family_a shapes (or --shapes); reports the ratio with / without per shape.
Each timed row: forward and forward+backward medians (ms), peak memory, and the fraction of the HBM
floor (bytes of q, k, v, o [+ dO, dq, dk, dv] over the copy bandwidth measured in the same run).
Peers are timed in the same process when importable: fla (flash-linear-attention chunk_simple_gla),
jla (jax-linear-attention Mosaic GPU simple_gla), seed (lightning_attn2), cudnn (softmax attention).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch peers share the GPU

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lightning_jax.attention import lightning_attention, reference
from lightning_jax.attention.schedules import alibi_slopes

FAMILY_A = [(65536 // t, t, 16, 128) for t in (1024, 4096, 16384, 65536)]
FAMILY_B = [
    (1, 8192, 96, 128),
    (2, 16384, 16, 128),
    (4, 2048, 16, 128),
    (4, 4096, 64, 128),
    (8, 2048, 32, 256),
    (8, 1024, 8, 64),
]
CHECK_TIMES = (1, 63, 64, 1000, 4096, 65536)
CHECK_DIMS = (64, 128, 192, 256)
CHECK_RATES = (0.0, 8.0, 0.5, 2.0**-8)  # 0 (no decay) and 8 (decay ~3e-4 per token) included
SAVE = lambda: None  # set by main: write the JSON after every row, so a killed run keeps its results
SKIP: set[str] = set()  # variants not to time (--skip)
DEADLINE: float | None = None  # time.monotonic() after which no new row starts (--deadline)


def past_deadline(what: str) -> bool:
    """True (and says so) once --deadline has passed: the sections stop starting rows, and the
    run still prints its tables and keeps its JSON."""
    if DEADLINE is None or time.monotonic() < DEADLINE:
        return False
    log(f"--deadline reached: skipping {what}")
    return True
TOLERANCE = {"bfloat16": 1e-2, "float32": 1e-3}


def log(*args):
    print(*args, flush=True)


# ----------------------------------------------------------------------------------------------
# Correctness


def chunked_reference(q, k, v, rates, s_in, chunk: int = 512):
    """The masked quadratic form (reference.quadratic, fp32 HIGHEST) on chunks of `chunk` tokens,
    the state carried between chunks: exact, and memory O(chunk^2) instead of O(time^2)."""
    time_ = q.shape[1]
    n = time_ // chunk

    @jax.checkpoint
    def step(state, xs):
        o, state = reference.quadratic(*xs, rates, state)
        return state, o

    outs = []
    state = s_in
    if n:
        def split(x):
            x = x[:, : n * chunk]
            return jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)

        state, o = lax.scan(step, state, tuple(split(x) for x in (q, k, v)))
        outs.append(jnp.moveaxis(o, 0, 1).reshape(q.shape[0], n * chunk, *o.shape[3:]))
    if time_ > n * chunk:
        o, state = reference.quadratic(*(x[:, n * chunk :] for x in (q, k, v)), rates, state)
        outs.append(o)
    return jnp.concatenate(outs, axis=1), state


def rel_err(x, ref):
    x = jnp.asarray(x, jnp.float32)
    ref = jnp.asarray(ref, jnp.float32)
    num = jnp.linalg.norm((x - ref).ravel())
    den = jnp.linalg.norm(ref.ravel())
    return float(num / jnp.maximum(den, 1e-30))


CHECK_IMPLEMENTATION = "pallas"  # --check-implementation


def op_arguments(name: str) -> dict:
    """The op's keyword arguments for an implementation name of the check and the timing: a
    registry name, or "mosaic_backward" / "triton_backward" (the Mosaic forward with the Mosaic or
    the Triton backward pinned: `MosaicConfig(backward=...)`)."""
    if name in ("mosaic_backward", "triton_backward"):
        from lightning_jax.attention.pallas_mosaic import MosaicConfig

        return dict(implementation="pallas_mosaic", config=MosaicConfig(backward=name.split("_")[0]))
    return dict(implementation=name)


def check_one(time_, dim, dtype, seed):
    heads = len(CHECK_RATES)
    rates = jnp.array(CHECK_RATES, jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    shape = (1, time_, heads, dim)
    q, k, v, d_o = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys[:4])
    s_in = jax.random.normal(keys[4], (1, heads, dim, dim), jnp.float32)
    d_final = jax.random.normal(keys[5], (1, heads, dim, dim), jnp.float32)

    # rates go in as a traced argument: closed over, they would make every decay matrix of the
    # reference ([heads, 512, 512] per chunk) a compile-time constant for XLA to fold. Cases still
    # take 5-95 s each on an H200, mostly compiling.
    def ours(q, k, v, s_in, rates):
        return lightning_attention(
            q, k, v, rates, initial_state=s_in, return_final_state=True, **op_arguments(CHECK_IMPLEMENTATION)
        )

    def ref(q, k, v, s_in, rates):
        return chunked_reference(q, k, v, rates, s_in)

    def run(fn, args, rates):
        (o, final), vjp = jax.vjp(lambda *a: fn(*a, rates), *args)
        grads = vjp((d_o.astype(o.dtype), d_final))
        return o, final, grads

    got = jax.jit(lambda *a: run(ours, a[:-1], a[-1]))(q, k, v, s_in, rates)
    up = tuple(x.astype(jnp.float32) for x in (q, k, v))
    want = jax.jit(lambda *a: run(ref, a[:-1], a[-1]))(*up, s_in, rates)
    names = ("o", "final_state", "dq", "dk", "dv", "d_initial_state")
    flat_got = (got[0], got[1], *got[2])
    flat_want = (want[0], want[1], *want[2])
    errs = {n: rel_err(a, b) for n, a, b in zip(names, flat_got, flat_want)}
    finite = all(bool(jnp.isfinite(jnp.asarray(a, jnp.float32)).all()) for a in flat_got)
    return errs, finite


def parse_check_cases(text: str):
    """'4096x64:float32,1x256:bfloat16' -> [(4096, 64, jnp.float32), (1, 256, jnp.bfloat16)]."""
    cases = []
    for item in filter(None, text.split(",")):
        try:
            size, dtype = item.split(":")
            time_, dim = (int(n) for n in size.split("x"))
            cases.append((time_, dim, jnp.dtype(dtype).type))
        except (ValueError, TypeError) as e:
            raise ValueError(
                f"--check-set: got {item!r}, expected TIMExDIM:DTYPE such as 4096x64:float32"
            ) from e
    return cases


CHECK_SETS = ("full", "wide", "fp32_long", "quick")  # the named case sets of check_cases


def check_cases(which: str):
    if ":" in which:  # an explicit list, see parse_check_cases
        return parse_check_cases(which)
    if which == "full":
        cases = [(t, d, jnp.bfloat16) for t in CHECK_TIMES for d in CHECK_DIMS]
        return cases + [(t, d, jnp.float32) for t in (63, 4096, 65536) for d in (64, 128, 256)]
    if which == "quick":  # one case per kernel variant (tiles, wide rows, chunks), before a sweep
        cases = [(1000, 128, jnp.bfloat16), (65536, 128, jnp.bfloat16), (4096, 256, jnp.bfloat16)]
        return cases + [(63, 192, jnp.bfloat16), (4096, 64, jnp.float32), (1000, 256, jnp.float32)]
    if which == "fp32_long":  # the long fp32 cases at wide dims
        return [(65536, d, jnp.float32) for d in (128, 256)]
    # "wide": the cases a shorter run adds to an earlier full one (dims 192/256, fp32 128/256).
    cases = [(t, d, jnp.bfloat16) for t in CHECK_TIMES for d in (192, 256)]
    cases += [(t, 128, jnp.bfloat16) for t in (1000, 65536)]
    return cases + [(t, d, jnp.float32) for t in (63, 65536) for d in (128, 256)]


def section_check(results, which="full", first=0, shard=(0, 1)):
    cases = check_cases(which)
    rows = []
    index, count = shard
    for i, (t, d, dtype) in enumerate(cases):
        if i < first or i % count != index:
            continue
        if past_deadline(f"check case {i} and after (--check-start {i} resumes)"):
            break
        name = jnp.dtype(dtype).name
        try:
            start = time.perf_counter()
            errs, finite = check_one(t, d, dtype, seed=1000 + i)
            worst = max(errs.values())
            ok = finite and worst <= TOLERANCE[name]
            row = dict(time=t, dim=d, dtype=name, errors=errs, max_error=worst, finite=finite, ok=ok)
            log(f"check time={t:6d} dim={d:3d} {name:8s} max_rel_err={worst:.2e} "
                f"{'ok' if ok else 'FAIL'} ({time.perf_counter() - start:.1f}s) "
                + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
        except Exception as e:  # keep going: one failure must not hide the rest
            row = dict(time=t, dim=d, dtype=name, error=repr(e)[:500], ok=False)
            log(f"check time={t} dim={d} {name}: ERROR {e!r}"[:800])
        rows.append(row)
        results["check"] = rows
        SAVE()


# ----------------------------------------------------------------------------------------------
# Timing


def time_jax(fn, arg_sets, *, target_s=0.05, samples=9):
    """Median seconds per call: each sample times enough back-to-back calls (rotating input sets,
    so repeated calls do not hit a cached copy) to amortise the host dispatch and the final sync.
    The GPU queues the calls, so a sample of ~50 ms is device time; a sample of one or two calls
    (a 2 ms target did that) adds the sync latency to each and overstated sub-ms times by up to 2x."""
    jax.block_until_ready(fn(*arg_sets[0]))
    jax.block_until_ready(fn(*arg_sets[1 % len(arg_sets)]))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))
    single = time.perf_counter() - t0
    reps = max(1, min(500, int(target_s / max(single, 1e-6))))
    out = []
    for s in range(samples):
        t0 = time.perf_counter()
        r = None
        for i in range(reps):
            r = fn(*arg_sets[(s * reps + i) % len(arg_sets)])
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def jax_peak_bytes(fn, args):
    try:
        m = jax.jit(fn).lower(*args).compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:
        return None


def jax_variants(shape, rates):
    """name -> (forward fn, forward+backward fn), each taking (q, k, v, do)."""
    variants = {}

    def ours(impl):
        def f(q, k, v):
            return lightning_attention(q, k, v, rates, **op_arguments(impl))
        return f

    # "pallas": the Mosaic kernels where they cover the call; "triton_backward": the Mosaic forward
    # with the Triton backward, what "pallas" ran before the Mosaic backward became its choice.
    for impl in ("pallas", "pallas_triton", "xla", "triton_backward"):
        if impl == "triton_backward" and (shape[3] > 128 or jax.default_backend() != "gpu"):
            continue  # the Mosaic forward's dims; on a CPU it would interpret
        variants[impl] = ours(impl)
    try:
        import jla.ops  # noqa: F401

        if shape[3] in (64, 128):
            def jla_fn(q, k, v):
                g = jnp.broadcast_to(-rates, q.shape[:3]).astype(jnp.float32)
                return jla.ops.linear_attention("simple_gla", q, k, v, impl="mosaic_gpu", g=g, scale=1.0)[0]
            variants["jla"] = jla_fn
    except Exception as e:
        log(f"jla unavailable: {e!r}"[:300])

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    variants["cudnn"] = cudnn
    return variants


def torch_variants(shape, rates_np):
    """PyTorch peers: name -> callable(q, k, v) on [B, T, H, D] torch tensors, or nothing."""
    out = {}
    try:
        import torch
    except Exception:
        return out
    rates_t = torch.tensor(rates_np, device="cuda", dtype=torch.float32)
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        def fla_fn(q, k, v):
            return chunk_simple_gla(q, k, v, g_gamma=-rates_t, scale=1.0)[0]
        out["fla"] = fla_fn
    except Exception as e:
        log(f"fla unavailable: {e!r}"[:300])
    try:
        from lightning_attn.ops import lightning_attn2

        s = rates_t.reshape(-1, 1, 1).contiguous()

        def seed_fn(q, k, v):
            o = lightning_attn2(*(x.transpose(1, 2).contiguous() for x in (q, k, v)), s)
            return o.transpose(1, 2)
        out["seed"] = seed_fn
    except Exception as e:
        log(f"seed unavailable: {e!r}"[:300])
    return out


def time_torch(fn, arg_sets, backward: bool):
    import torch
    import triton.testing

    def run(i=[0]):
        q, k, v, do = arg_sets[i[0] % len(arg_sets)]
        i[0] += 1
        o = fn(q, k, v)
        if backward:
            o.backward(do)
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median",
                                 grad_to_none=[x for s in arg_sets for x in s[:3]] if backward else None)
    return ms / 1e3, peak


def copy_bandwidth():
    x = jax.random.normal(jax.random.PRNGKey(0), (512 * 1024 * 1024,), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)
    t = time_jax(f, [(x,)], target_s=0.02, samples=7)
    del x
    return 2 * 512 * 1024 * 1024 * 2 / t


def time_shape(shape, bandwidth, peers: bool):
    batch, time_, heads, dim = shape
    rates_np = np.asarray(alibi_slopes(heads), np.float32)
    rates = jnp.asarray(rates_np)
    elems = batch * time_ * heads * dim
    floor_fwd = 4 * elems * 2 / bandwidth
    floor_fb = 11 * elems * 2 / bandwidth
    n_sets = 2
    keys = jax.random.split(jax.random.PRNGKey(hash(shape) % 2**31), 4 * n_sets)
    arg_sets = [
        tuple(jax.random.normal(keys[4 * s + i], shape, jnp.bfloat16) for i in range(4))
        for s in range(n_sets)
    ]
    rows = {}
    for name, f in jax_variants(shape, rates).items():
        if name in SKIP:
            continue
        row = {}
        try:
            fwd = jax.jit(lambda q, k, v, do, f=f: f(q, k, v))
            def fb_fn(q, k, v, do, f=f):
                o, vjp = jax.vjp(f, q, k, v)
                return o, vjp(do)
            fb = jax.jit(fb_fn)
            o = fwd(*arg_sets[0])
            row["finite"] = bool(jnp.isfinite(o.astype(jnp.float32)).all())
            row["fwd_s"] = time_jax(fwd, arg_sets)
            row["fwd_peak"] = jax_peak_bytes(lambda q, k, v, do, f=f: f(q, k, v), arg_sets[0])
            row["fb_s"] = time_jax(fb, arg_sets)
            row["fb_peak"] = jax_peak_bytes(fb_fn, arg_sets[0])
        except Exception as e:
            row["error"] = repr(e)[:300]
        rows[name] = row
        log(f"  {shape} {name:7s} " + " ".join(f"{k}={v}" for k, v in row.items()))
    if peers:
        try:
            import torch
            t_sets = []
            for s in arg_sets:
                ts = [torch.from_dlpack(x).clone() for x in s]  # copies: jax buffers stay untouched
                for t in ts[:3]:
                    t.requires_grad_(True)
                t_sets.append(ts)
            for name, f in torch_variants(shape, rates_np).items():
                if name in SKIP:
                    continue
                row = {}
                try:
                    with torch.no_grad():
                        row["finite"] = bool(torch.isfinite(f(*t_sets[0][:3]).float()).all())
                    row["fwd_s"], row["fwd_peak"] = time_torch(f, t_sets, backward=False)
                    row["fb_s"], row["fb_peak"] = time_torch(f, t_sets, backward=True)
                except Exception as e:
                    row["error"] = repr(e)[:300]
                rows[name] = row
                log(f"  {shape} {name:7s} " + " ".join(f"{k}={v}" for k, v in row.items()))
            del t_sets
            torch.cuda.empty_cache()
        except Exception as e:
            log(f"torch peers skipped: {e!r}"[:300])
    for row in rows.values():
        if "fwd_s" in row:
            row["fwd_floor_frac"] = floor_fwd / row["fwd_s"]
        if "fb_s" in row:
            row["fb_floor_frac"] = floor_fb / row["fb_s"]
    return dict(shape=list(shape), floor_fwd_s=floor_fwd, floor_fb_s=floor_fb, impls=rows)


def time_segments(shape, documents: int, implementation: str = "pallas"):
    """Our op at `shape` with `documents` equal documents per row (segment_ids) and without: medians
    of forward and forward+backward, and their ratios (with / without)."""
    batch, time_, heads, dim = shape
    rates = jnp.asarray(alibi_slopes(heads), jnp.float32)
    keys = jax.random.split(jax.random.PRNGKey(hash(shape) % 2**31), 8)
    arg_sets = [tuple(jax.random.normal(keys[4 * s + i], shape, jnp.bfloat16) for i in range(4)) for s in range(2)]
    ids = jnp.broadcast_to(jnp.arange(time_, dtype=jnp.int32) * documents // time_, (batch, time_))

    def op(q, k, v, seg):
        return lightning_attention(q, k, v, rates, segment_ids=seg, implementation=implementation)

    def fb_fn(q, k, v, do, seg):
        o, vjp = jax.vjp(lambda q, k, v: op(q, k, v, seg), q, k, v)
        return o, vjp(do)

    fwd, fb = jax.jit(lambda q, k, v, do, seg: op(q, k, v, seg)), jax.jit(fb_fn)
    entry = dict(shape=list(shape), documents=documents, implementation=implementation)
    for name, seg in (("none", None), ("segments", ids)):
        sets = [(*a, seg) for a in arg_sets]  # the ids are an argument: traced, as in training
        entry[name] = row = {}
        try:
            row["finite"] = bool(jnp.isfinite(fwd(*sets[0]).astype(jnp.float32)).all())
            row["fwd_s"] = time_jax(fwd, sets)
            row["fb_s"] = time_jax(fb, sets)
        except Exception as e:
            row["error"] = repr(e)[:300]
        log(f"  {shape} {name:8s} " + " ".join(f"{k}={v}" for k, v in row.items()))
    for key in ("fwd_s", "fb_s"):
        if key in entry["none"] and key in entry["segments"]:
            entry[key.replace("_s", "_ratio")] = entry["segments"][key] / entry["none"][key]
    return entry


def section_segments(results, shapes, documents, implementation="pallas"):
    out = results["segments"] = []
    for shape in shapes:
        if past_deadline(f"segments from {shape} on"):
            break
        out.append(time_segments(shape, documents, implementation))
        SAVE()


def section_family(results, key, shapes, bandwidth, peers):
    out = results[key] = []
    for shape in shapes:
        if past_deadline(f"{key} from {shape} on"):
            break
        out.append(time_shape(shape, bandwidth, peers))
        SAVE()


# ----------------------------------------------------------------------------------------------


def versions():
    v = dict(python=platform.python_version(), jax=jax.__version__)
    try:
        v["device"] = jax.devices()[0].device_kind
    except Exception:
        pass
    for mod in ("jaxlib", "triton", "torch", "fla", "jla", "lightning_attn"):
        try:
            m = __import__(mod)
            v[mod] = getattr(m, "__version__", "present")
        except Exception:
            pass
    return v


def fmt_ms(row, key):
    return f"{row[key] * 1e3:.3f}" if key in row else ("err" if "error" in row else "-")


def print_tables(results):
    if "check" in results:
        rows = results["check"]
        bad = [r for r in rows if not r.get("ok")]
        log(f"\nGPU correctness: {len(rows) - len(bad)}/{len(rows)} cases within tolerance")
        for dtype in ("bfloat16", "float32"):
            errs = [r["max_error"] for r in rows if r.get("dtype") == dtype and "max_error" in r]
            if errs:
                log(f"  {dtype}: worst max rel err {max(errs):.2e} over {len(errs)} cases")
        for r in bad:
            log(f"  FAIL {r.get('time')} {r.get('dim')} {r.get('dtype')} {r.get('max_error', r.get('error'))}")
    for key in ("family_a", "family_b"):
        if key not in results:
            continue
        log(f"\n{key}: ms (pallas = ours); ratio = peer / ours (>1: we are faster)")
        for entry in results[key]:
            impls = entry["impls"]
            ours = impls.get("pallas", {})
            parts = []
            for name, row in impls.items():
                f, b = fmt_ms(row, "fwd_s"), fmt_ms(row, "fb_s")
                ratio = ""
                if name != "pallas" and "fwd_s" in row and "fwd_s" in ours:
                    ratio = f" x{row['fwd_s'] / ours['fwd_s']:.2f}"
                    if "fb_s" in row and "fb_s" in ours:
                        ratio += f"/x{row['fb_s'] / ours['fb_s']:.2f}"
                parts.append(f"{name} {f}/{b}{ratio}")
            floor = ours.get("fwd_floor_frac"), ours.get("fb_floor_frac")
            fl = f" floor {floor[0]:.2f}/{floor[1]:.2f}" if None not in floor else ""
            log(f"  {tuple(entry['shape'])}{fl}: " + "; ".join(parts))
    if "segments" in results:
        log("\nsegments: pallas ms forward/forward+backward, without and with segment_ids; ratio = with / without")
        for entry in results["segments"]:
            none, seg = entry["none"], entry["segments"]
            ratio = "/".join(f"x{entry[k]:.2f}" if k in entry else "-" for k in ("fwd_ratio", "fb_ratio"))
            log(f"  {tuple(entry['shape'])} {entry['documents']} documents per row: "
                f"{fmt_ms(none, 'fwd_s')}/{fmt_ms(none, 'fb_s')} -> {fmt_ms(seg, 'fwd_s')}/{fmt_ms(seg, 'fb_s')} "
                f"({ratio})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="attention.json")
    parser.add_argument("--sections", default="check,family_a,family_b")
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--skip", default="", help="variants not to time, e.g. xla,cudnn")
    parser.add_argument("--check-start", type=int, default=0,
                        help="first case of the check set to run (resume a run cut short)")
    parser.add_argument("--check-set", default="full",
                        help=", ".join(CHECK_SETS) + ", or cases such as 1x256:bfloat16,4096x64:float32")
    parser.add_argument("--check-implementation", default="pallas",
                        help="the implementation the check section runs (default pallas: it picks its backend; "
                             "mosaic_backward / triton_backward: pallas_mosaic with that backward pinned)")
    parser.add_argument("--check-shard", default="0/1",
                        help="I/N: run cases i with i %% N == I (N processes share the GPU)")
    parser.add_argument("--shapes", default=None,
                        help="shapes of family_b and segments, e.g. 8x2048x32x256,8x1024x8x64 (default: all of "
                             "family_b; family_a's for segments)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds after start from which no new shape or check case starts; the run then "
                             "prints its tables (for machines that stop a command at a time limit)")
    parser.add_argument("--segments", type=int, default=4,
                        help="segments section: equal documents per row (default 4)")
    parser.add_argument("--segments-implementation", default="pallas",
                        help="segments section: the implementation timed (default pallas; pallas_mosaic for the "
                             "Mosaic kernels with documents)")
    args = parser.parse_args()
    global DEADLINE
    if args.deadline is not None:
        if args.deadline <= 0:
            parser.error(f"--deadline: got {args.deadline}, expected seconds > 0")
        DEADLINE = time.monotonic() + args.deadline
    family_b = FAMILY_B
    if args.segments < 1:
        parser.error(f"--segments: got {args.segments}, expected >= 1")
    if args.shapes:
        family_b = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes.split(",")]
        unknown = [shape for shape in family_b if len(shape) != 4]
        if unknown:
            parser.error(f"--shapes: got {args.shapes!r}, expected BxTxHxD entries separated by commas")
    try:
        shard = tuple(int(n) for n in args.check_shard.split("/"))
        assert len(shard) == 2 and 0 <= shard[0] < shard[1]
    except (ValueError, AssertionError):
        parser.error(f"--check-shard: got {args.check_shard!r}, expected I/N with 0 <= I < N")
    if args.check_set not in CHECK_SETS:
        try:
            parse_check_cases(args.check_set)
        except ValueError as e:
            parser.error(str(e))
    global CHECK_IMPLEMENTATION
    CHECK_IMPLEMENTATION = args.check_implementation
    sections = args.sections.split(",")
    results = dict(date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), versions=versions())
    log(json.dumps(results["versions"]))

    def save():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    global SAVE
    SAVE = save
    SKIP.update(filter(None, args.skip.split(",")))

    if any(s.startswith("family") for s in sections):
        results["copy_bandwidth_Bps"] = bw = copy_bandwidth()
        log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
        if "family_a" in sections:
            section_family(results, "family_a", FAMILY_A, bw, not args.no_peers)
            save()
        if "family_b" in sections:
            section_family(results, "family_b", family_b, bw, not args.no_peers)
            save()
    if "segments" in sections:
        section_segments(results, family_b if args.shapes else FAMILY_A, args.segments, args.segments_implementation)
        save()
    if "check" in sections:
        section_check(results, args.check_set, args.check_start, shard)
    save()
    print_tables(results)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        raise
