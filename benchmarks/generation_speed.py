"""Sampling speed: TNL-385M against Transformer-385M through `lightning_jax.generation.generate`:
prefill time, decode time per step and decode tokens/s, against the prompt length and the batch.

    python benchmarks/generation_speed.py                        # on the GPU machine (one H200)
    python benchmarks/generation_speed.py --models tnl --prompts 1024 --batches 1,64 --variants ""
    python benchmarks/generation_speed.py --tiny                 # tiny models, short prompts, on CPU

Random weights, bf16 compute, greedy sampling (temperature 0), vocab 64,000; prompts of random ids
in [1, vocab) (no padding). The Transformer runs `attention_implementation="cudnn"` on a GPU
(`--transformer-attention`), the config's default elsewhere.

Method. For each cell the jitted body of `generate` (`generation._generate`, after the same checks)
is compiled ahead of time for max_new_tokens N1 = 1 (prefill and the first token) and N2 = 1 +
`--steps`; each program is called once (warm-up), then `--repeats` times back to back with one
`block_until_ready` at the end, so the device runs the calls without waiting for Python. With t1,
t2 the seconds per call: prefill ~ t1, decode per step = (t2 - t1) / (N2 - N1), decode tokens/s =
batch x steps / (t2 - t1). A program whose first call takes over 2 s is timed by that call alone.
At long prompts the decode is a small part of t2 (`decode_share`): the difference is then noisier
(raise --steps for those cells).
TNL prompts longer than `--prefill-chunk` are prefilled a chunk at a time (`prefill_chunk`); the
Transformer's prefill is one call and its KV cache holds prompt + N2 positions.

Memory. `plan_gib` is XLA's plan for the N2 program (arguments + outputs + temporaries - aliased);
a plan over the device's limit is reported as "does not fit" without running (so is an
out-of-memory error while compiling or running). `peak_gib` is the process's peak so far (cells run
in one process, in order, so it is a running maximum). XLA_PYTHON_CLIENT_MEM_FRACTION defaults to
0.95 here. `floor_ms` is one decode step's HBM floor: weights (bf16, read once per step: the tied
embedding is the LM head) plus state bytes (TNL: the fp32 states read and written; Transformer: the
whole bf16 KV cache read, as masked attention does) over `--hbm-tbps`.

Default cells: {tnl, transformer} x prompts {1024, 32768, 131072} x batch {1, 64}, parameters bf16
and layers scanned, plus `--variants` (default: TNL, batch 1, shortest prompt, with fp32 parameters,
which every step casts to bf16, and with unscanned layers). Labels read model:params=..:scan=..
(:attn=.. for the Transformer; :decode=xla|pallas for TNL's decoding step, `TNLConfig.decode_implementation`,
when not the config's default). `scan` is the layout the model is built in: sampling converts a
scanned model to one layer at a time first (`generation.decoding_model`), and so does this
benchmark, so both layouts time the same program. One JSON line per cell, a markdown table last; the rows also go to
$OUT/generation_speed.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
if "--tiny" in sys.argv[1:]:  # the smoke run compiles ~20 small programs: XLA:CPU's cheap mode halves that time
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                               " --xla_llvm_disable_expensive_passes=true").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from lightning_jax import generation  # noqa: E402
from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig  # noqa: E402
from cells import parse_options, planned_bytes  # noqa: E402

PARAMS = {"bf16": "bfloat16", "fp32": "float32"}
VARIANT_KEYS = {"params": str, "scan": int, "attn": str, "decode": str, "prompt": int, "batch": int}
DECODE = {"default": None, "xla": "xla", "pallas": "pallas"}  # TNLConfig.decode_implementation
LONG_CALL_S = 2.0  # a call slower than this is timed by its first call alone


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def make_config(model: str, params: str, scan: int, attn: str | None, tiny: bool, decode: str = "default"):
    common = dict(dtype="bfloat16", param_dtype=PARAMS[params], scan_layers=bool(scan))
    if model == "tnl":
        common["decode_implementation"] = DECODE[decode]
        return TNLConfig.tiny(**common) if tiny else TNLConfig.tnl_385m(**common)
    common["attention_implementation"] = attn
    return TransformerConfig.tiny(**common) if tiny else TransformerConfig.transformer_385m(**common)


def label(cell: dict) -> str:
    text = f"{cell['model']}:params={cell['params']}:scan={cell['scan']}"
    if cell["model"] == "transformer":
        text += f":attn={cell['attn'] or 'default'}"
    elif cell.get("decode", "default") != "default":
        text += f":decode={cell['decode']}"
    return text


def memory_stats() -> dict:
    return jax.devices()[0].memory_stats() or {}  # None on CPU


def floor_bytes(config, model: str, prompt: int, batch: int, n2: int) -> tuple[float, float]:
    """(weight bytes, state bytes) one decode step moves at least."""
    weights = 2.0 * config.num_params()
    if model == "tnl":
        per_row = sum(config.num_heads * config.key_dim(layer) * config.head_dim * 4
                      for layer in range(config.num_layers))
        return weights, 2.0 * batch * per_row  # read and write
    length = prompt + n2  # the cache's allocated positions, all read (masked) each step
    return weights, 2.0 * config.num_layers * batch * length * config.attention_dim * 2


def plan_bytes(compiled) -> int | None:
    try:
        return planned_bytes(compiled.memory_analysis())
    except Exception:  # noqa: BLE001 (not every backend plans)
        return None


def time_calls(compiled, args, repeats: int) -> tuple[float, int, object]:
    """Seconds per call of `compiled(*args)`, the calls timed, the output: `repeats` calls after a
    warm-up call, or the first call alone if it took over LONG_CALL_S (the program is compiled
    already; what a first call adds is small against seconds, and the same in t1 and t2)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warm = time.perf_counter() - t0
    if warm > LONG_CALL_S:
        return warm, 1, out
    reps = repeats
    t0 = time.perf_counter()
    for _ in range(reps):
        out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps, reps, out


def run_cell(cell: dict, model_obj, args) -> dict:
    prompt, batch, steps = cell["prompt"], cell["batch"], args.steps
    config = model_obj.config
    n1, n2 = 1, 1 + steps
    chunk = args.prefill_chunk if cell["model"] == "tnl" and prompt > args.prefill_chunk else None
    weights, state_bytes = floor_bytes(config, cell["model"], prompt, batch, n2)
    bandwidth = args.hbm_tbps * 1e12
    row = {"label": label(cell), **cell, "steps": steps, "prefill_chunk": chunk, "params_count": config.num_params(),
           "weights_gb": weights / 1e9, "state_gb": state_bytes / 1e9,
           "floor_ms": 1e3 * (weights + state_bytes) / bandwidth}
    stats = memory_stats()
    limit = stats.get("bytes_limit")
    row["limit_gib"] = None if limit is None else limit / 2**30
    rng_np = np.random.default_rng(prompt * 131 + batch)
    tokens = rng_np.integers(1, config.vocab_size, (batch, prompt), dtype=np.int32)
    compiled = {}
    try:
        tokens_j, pad_mask, temperature, top_p = generation._check_arguments(
            model_obj, tokens, n2, 0.0, None, None, 0, None, chunk)
        # What `generate` runs: a scanned model is converted to one layer at a time first.
        graphdef, state = nnx.split(generation.decoding_model(model_obj))
        dynamic = (tokens_j, pad_mask, jax.random.key(0), temperature, top_p)
        compile_s = 0.0
        for n in (n2, n1):  # the larger program first: if it does not fit, the cell stops there
            t0 = time.perf_counter()
            compiled[n] = generation._generate.lower(
                graphdef, state, *dynamic, max_new_tokens=n, top_k=None, prefill_chunk=chunk).compile()
            compile_s += time.perf_counter() - t0
            if n == n2:
                plan = plan_bytes(compiled[n])
                row["plan_gib"] = None if plan is None else plan / 2**30
                if plan is not None and limit is not None and plan > limit:
                    row.update(status="does not fit", compile_s=compile_s)
                    return row
        row["compile_s"] = compile_s
        call_args = (state, *dynamic)
        t2, reps2, out2 = time_calls(compiled[n2], call_args, args.repeats)
        t1, reps1, out1 = time_calls(compiled[n1], call_args, args.repeats)
        out1, out2 = np.asarray(out1), np.asarray(out2)
        if out1.shape != (batch, n1) or out2.shape != (batch, n2):
            raise AssertionError(f"generated tokens: got shapes {out1.shape} {out2.shape}")
        # Recorded, not enforced: the two programs may round the logits differently (near ties).
        row["first_tokens_agree"] = bool(np.array_equal(out1[:, 0], out2[:, 0]))
        if args.compare_xla and cell["model"] == "tnl" and cell["decode"] != "xla":
            # The same weights (same seed) decoding with XLA's step: greedy tokens, compared.
            xla = TNL(dataclasses.replace(config, decode_implementation="xla"), rngs=nnx.Rngs(0))
            other = np.asarray(generation.generate(xla, tokens, n2, temperature=0.0, rng=jax.random.key(0),
                                                   prefill_chunk=chunk))
            same = np.all(other == out2, axis=0)
            row["same_tokens_as_xla"] = int(n2 if same.all() else np.argmin(same))  # leading steps that agree
            del xla
        if args.check_generate:  # the public function gives the tokens timed here
            public = np.asarray(generation.generate(model_obj, tokens, n2, temperature=0.0, rng=jax.random.key(0),
                                                    prefill_chunk=chunk))
            if not np.array_equal(public, out2):
                raise AssertionError("generate() and the compiled program disagree")
        decode_s = t2 - t1
        row.update(
            status="ok", repeats=[reps1, reps2], t1_ms=1e3 * t1, t2_ms=1e3 * t2,
            prefill_ms=1e3 * t1, prefill_tokens_per_s=batch * prompt / t1,
            decode_ms_per_step=1e3 * decode_s / (n2 - n1),
            decode_tokens_per_s=batch * (n2 - n1) / decode_s if decode_s > 0 else None,
            decode_share=decode_s / t2,
        )
        row["x_floor"] = row["decode_ms_per_step"] / row["floor_ms"]
    except Exception as e:  # noqa: BLE001 (one failing cell must not end the sweep)
        first = (str(e).strip().splitlines() or [repr(e)])[0][:300]
        row.update(status="does not fit" if _is_oom(e) else "error", error=first)
    finally:
        compiled.clear()
        gc.collect()
    stats = memory_stats()
    if "peak_bytes_in_use" in stats:
        row["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
    return row


def parse_variant(text: str, prompts: list[int]) -> dict:
    """'tnl:params=fp32:scan=0' -> {model, key: value...} (prompt: the shortest, batch 1 by default)."""
    model, *options = text.split(":")
    return {"model": model, "prompt": min(prompts), "batch": 1,
            **parse_options(text, options, VARIANT_KEYS, "--variants")}


def make_cells(args) -> list[dict]:
    models = args.models.split(",")
    for m in models:
        if m not in ("tnl", "transformer"):
            raise SystemExit(f"--models: got {m!r}, expected tnl and/or transformer")
    prompts = [int(p) for p in args.prompts.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    if args.param_dtype not in PARAMS:
        raise SystemExit(f"--param-dtype: got {args.param_dtype!r}, expected one of {sorted(PARAMS)}")
    base = {"params": args.param_dtype, "scan": args.scan, "attn": args.transformer_attention, "decode": "default"}
    cells = [{"model": m, "prompt": p, "batch": b, **base} for m in models for p in prompts for b in batches]
    for text in filter(None, (args.variants or "").split(",")):
        variant = {**base, **parse_variant(text, prompts)}
        if variant["params"] not in PARAMS:
            raise SystemExit(f"--variants: params={variant['params']!r}, expected one of {sorted(PARAMS)}")
        if variant["decode"] not in DECODE:
            raise SystemExit(f"--variants: decode={variant['decode']!r}, expected one of {sorted(DECODE)}")
        if variant["model"] in models and variant not in cells:
            cells.append(variant)
    for cell in cells:
        if cell["model"] == "tnl" or cell["attn"] in ("default", "none", ""):
            cell["attn"] = None
        elif cell["attn"] not in ("cudnn", "xla"):
            raise SystemExit(f"attention: got {cell['attn']!r}, expected cudnn, xla or default")
    # Cells of one model configuration run together: the model is built once for them.
    key = lambda c: (c["model"] != "tnl", c["params"] != args.param_dtype, c["scan"] != args.scan, c["params"],
                     c["scan"], str(c["attn"]), c["decode"])
    return sorted(cells, key=key)


def table(rows: list[dict]) -> str:
    lines = ["| cell | prompt | batch | prefill ms | decode ms/step | decode tok/s | floor ms (weights + state GB) "
             "| x floor | plan GiB | compile s | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    f = lambda v, spec: "-" if v is None else format(v, spec)
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['prompt']:,} | {r['batch']} | {f(r.get('prefill_ms'), '.2f')} "
            f"| {f(r.get('decode_ms_per_step'), '.3f')} | {f(r.get('decode_tokens_per_s'), ',.0f')} "
            f"| {r['floor_ms']:.3f} ({r['weights_gb']:.2f} + {r['state_gb']:.2f}) | {f(r.get('x_floor'), '.1f')} "
            f"| {f(r.get('plan_gib'), '.1f')} | {f(r.get('compile_s'), '.0f')} | {r['status']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, short prompts, steps 4 (CPU smoke run)")
    parser.add_argument("--models", default="tnl,transformer")
    parser.add_argument("--prompts", default=None, help="comma-separated prompt lengths (default 1024,32768,131072)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64)")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed: N2 = 1 + steps (default 128)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls of each program (default 3, 10 with --tiny; 1 if a call takes > 2 s)")
    parser.add_argument("--prefill-chunk", type=int, default=None,
                        help="TNL prompts longer than this prefill a chunk at a time (default 32768)")
    parser.add_argument("--param-dtype", default="bf16", help="parameters of the main cells: bf16 or fp32")
    parser.add_argument("--scan", type=int, default=1, help="main cells: 1 layers scanned, 0 unscanned")
    parser.add_argument("--variants", default="tnl:params=fp32,tnl:scan=0",
                        help="extra cells MODEL[:key=value...], keys params, scan, attn, decode (TNL: xla, pallas "
                             "or default), prompt, batch (default "
                             "batch 1 at the shortest prompt); '' for none")
    parser.add_argument("--transformer-attention", default=None,
                        help="cudnn, xla or default (the config's); default cudnn on a GPU, else the config's")
    parser.add_argument("--hbm-tbps", type=float, default=4.8, help="HBM bandwidth of the floor (H200: 4.8)")
    parser.add_argument("--compare-xla", action="store_true",
                        help="TNL cells not pinned to XLA's decoding step: also generate with it (same weights) and "
                             "record how many leading greedy tokens agree (same_tokens_as_xla, of 1 + steps)")
    parser.add_argument("--check-generate", action="store_true",
                        help="also call the public generate() per cell and compare tokens (default with --tiny)")
    args = parser.parse_args(argv)
    args.prompts = args.prompts or ("16,64" if args.tiny else "1024,32768,131072")
    args.batches = args.batches or ("1,2" if args.tiny else "1,64")
    args.steps = (4 if args.tiny else 128) if args.steps is None else args.steps
    args.repeats = (10 if args.tiny else 3) if args.repeats is None else args.repeats
    args.prefill_chunk = (32 if args.tiny else 32768) if args.prefill_chunk is None else args.prefill_chunk
    args.check_generate = args.check_generate or args.tiny
    if args.transformer_attention is None:
        args.transformer_attention = "cudnn" if jax.default_backend() == "gpu" and not args.tiny else "default"
    if args.steps < 1 or args.repeats < 1 or args.prefill_chunk < 1:
        parser.error("--steps, --repeats and --prefill-chunk must be >= 1")
    cells = make_cells(args)

    device = jax.devices()[0].device_kind
    print(f"{device}, jax {jax.__version__}, {len(cells)} cells, steps {args.steps}, repeats {args.repeats}, "
          f"prefill chunk {args.prefill_chunk}", flush=True)
    rows, built, model_obj = [], None, None
    for cell in cells:
        key = (cell["model"], cell["params"], cell["scan"], cell["attn"], cell["decode"])
        if key != built:
            model_obj = None
            gc.collect()
            config = make_config(cell["model"], cell["params"], cell["scan"], cell["attn"], args.tiny, cell["decode"])
            cls = TNL if cell["model"] == "tnl" else Transformer
            model_obj, built = cls(config, rngs=nnx.Rngs(0)), key
        row = run_cell(cell, model_obj, args)
        row["device"] = device
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "generation_speed.json"), "w") as f:
            json.dump({"device": device, "jax": jax.__version__, "argv": sys.argv, "rows": rows}, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
