"""Train steps of the 385M models at long contexts on one GPU (or a sequence split over several): tokens/s, compile seconds, peak memory.

    python benchmarks/long_context_memory.py                     # the default cells (below)
    python benchmarks/long_context_memory.py --cells "2048x32 1048576:chunk=16384:remat=none"
    python benchmarks/long_context_memory.py --cells "262144:model=transformer" --compile-only
    python benchmarks/long_context_memory.py --tiny              # CPU smoke run (tiny models, short contexts)

A cell is `CONTEXT[xBATCH][:key=value...]` with keys
  model   tnl (default) or transformer: TNLConfig.tnl_385m / TransformerConfig.transformer_385m,
          bf16 compute, fp32 parameters;
  remat   the model's remat policy (default full);
  loss    optim.loss_block_tokens (default 4096; 0 = full logits);
  chunk   optim.time_chunk_tokens (default 0: whole sequences; TNL only);
  scan    1 (default): layers scanned; 0: one compiled body per layer;
  gpus    GPUs each sequence is split over (mesh.context, context parallelism; default 1). A
          cell's process sees only that many GPUs (CUDA_VISIBLE_DEVICES): tokens/s is per GPU.
Each cell runs in its own process through benchmarks/train_throughput.py's `measure` (compile step,
warm-up step, timed steps), so `peak_gib` is that cell's peak and an out-of-memory error (or a crash)
ends only that cell. `--compile-only` reports XLA's memory plan of the compiled step instead
(`plan_gib`: arguments + outputs + temporaries - aliased) without running it: what fits, quickly.
Prints one JSON line per cell, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from cells import parse_options, planned_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = ("2048x32", "262144", "1048576:chunk=16384:remat=none", "1048576:chunk=32768:remat=none",
         "1048576:chunk=16384:remat=full", "4194304:chunk=32768:remat=none")
TINY_CELLS = ("256x8", "4096", "16384:chunk=4096:remat=none", "16384:chunk=4096")
KEYS = {"model": str, "remat": str, "loss": int, "chunk": int, "scan": int, "gpus": int}
DEFAULTS = {"model": "tnl", "remat": "full", "loss": 4096, "chunk": 0, "scan": 1, "gpus": 1}


def parse_cell(text: str) -> dict:
    """'1048576x1:chunk=16384:remat=none' -> {context, batch, model, remat, loss, chunk}."""
    head, *options = text.split(":")
    context, _, batch = head.partition("x")
    return {"context": int(context), "batch": int(batch or 1), **DEFAULTS,
            **parse_options(text, options, KEYS, "--cells")}


def one_cell(cell: dict, steps: int, tiny: bool, compile_only: bool) -> dict:
    sys.path.insert(0, ROOT)
    import jax

    from benchmarks import train_throughput as bench
    from lightning_jax.models import TNLConfig, TransformerConfig, make_mesh
    from lightning_jax.training import metrics as metrics_lib

    common = {"dtype": "bfloat16", "param_dtype": "float32", "scan_layers": bool(cell["scan"]), "remat": cell["remat"]}
    if cell["model"] == "tnl":
        config = TNLConfig.tiny(**common) if tiny else TNLConfig.tnl_385m(**common)
    else:
        config = TransformerConfig.tiny(**common) if tiny else TransformerConfig.transformer_385m(**common)
    mesh = make_mesh(1, 1, 1, cell["gpus"], devices=jax.devices()[:cell["gpus"]])
    options = dict(loss_block_tokens=cell["loss"], time_chunk_tokens=cell["chunk"])
    context, batch = cell["context"], cell["batch"]
    if compile_only:
        return {**cell, **compiled_plan(config, context, batch, mesh, options)}
    row = bench.measure(cell["model"], config, context, batch * context, steps, mesh,
                        metrics_lib.peak_flops_per_device(), step_options=options)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    row.update(cell, device=jax.devices()[0].device_kind, peak_gib=None if peak is None else round(peak / 2**30, 2),
               limit_gib=None if "bytes_limit" not in stats else round(stats["bytes_limit"] / 2**30, 2))
    if row.get("status") == "ok":
        row["tokens_per_s"] = row["tokens_per_sec_per_device"]
    return row


def compiled_plan(config, context: int, batch: int, mesh, options: dict) -> dict:
    """XLA's memory plan of the compiled train step (nothing runs)."""
    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.train_throughput import batch_sharding
    from lightning_jax.models import TNL, TNLConfig, Transformer, create_sharded_model
    from lightning_jax.training import optim, step as step_lib
    from lightning_jax.training.config import OptimConfig

    cls = TNL if isinstance(config, TNLConfig) else Transformer
    model = create_sharded_model(lambda: cls(config, rngs=nnx.Rngs(0)), mesh)
    tx = optim.make_optimizer(OptimConfig(), total_steps=1000)
    schedule = optim.learning_rate_schedule(OptimConfig(), 1000)
    with jax.set_mesh(mesh):
        graphdef, state = step_lib.init_train_state(model, tx, seed=0)
        step = step_lib.jit_train_step(step_lib.make_train_step(graphdef, tx, schedule, **options), state)
        tokens = jax.ShapeDtypeStruct((batch, context + 1), np.int32, sharding=batch_sharding(mesh))
        try:
            memory = step.lower(state, tokens).compile().memory_analysis()
        except Exception as e:  # noqa: BLE001: report what XLA said, per cell
            return {"status": "compile error", "error": str(e).splitlines()[0][:300]}
    total = planned_bytes(memory)
    stats = jax.devices()[0].memory_stats() or {}
    return {"status": "compiled", "plan_gib": round(total / 2**30, 2),
            "temp_gib": round(memory.temp_size_in_bytes / 2**30, 2),
            "limit_gib": None if "bytes_limit" not in stats else round(stats["bytes_limit"] / 2**30, 2)}


def table(rows: list[dict]) -> str:
    lines = ["| model | tokens per step | layers | remat | time chunk | tokens/s | step s | peak (plan) GiB | status |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tokens = f"{r['batch']} x {r['context']:,}" + (f" on {r['gpus']} GPUs" if r["gpus"] > 1 else "")
        speed = f"{r['tokens_per_s'] / 1e3:.1f}K" if r.get("tokens_per_s") else "-"
        step = f"{r['step_s']:.2f}" if r.get("step_s") else "-"
        gib = r.get("peak_gib") or (f"({r['plan_gib']})" if r.get("plan_gib") is not None else "-")
        chunk = f"{r['chunk']:,}" if r["chunk"] else "whole"
        layers = "scanned" if r["scan"] else "unrolled"
        lines.append(f"| {r['model']} | {tokens} | {layers} | {r['remat']} | {chunk} | {speed} | {step} | {gib} "
                     f"| {r['status']} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default=None, help="space-separated cells (see the module docstring)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell")
    parser.add_argument("--tiny", action="store_true", help="tiny models and short contexts (CPU smoke run)")
    parser.add_argument("--compile-only", action="store_true", help="XLA's memory plan only; nothing runs")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # run this one cell here
    args = parser.parse_args()

    if args.cell:
        row = one_cell(parse_cell(args.cell), args.steps, args.tiny, args.compile_only)
        print("CELL " + json.dumps(row), flush=True)
        return 0

    texts = args.cells.split() if args.cells else (TINY_CELLS if args.tiny else CELLS)
    cells = [(text, parse_cell(text)) for text in texts]  # parse them all before running any
    rows = []
    for text, cell in cells:
        command = [sys.executable, os.path.abspath(__file__), "--cell", text, "--steps", str(args.steps)]
        command += ["--tiny"] * args.tiny + ["--compile-only"] * args.compile_only
        try:
            env = dict(os.environ)
            if not args.tiny and "CUDA_VISIBLE_DEVICES" not in env:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(cell["gpus"]))
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            row = {**cell, "status": "timeout"}
        else:
            lines = [line for line in proc.stdout.splitlines() if line.startswith("CELL ")]
            if lines:
                row = {**cell, **json.loads(lines[-1][5:])}
            else:
                text_out = proc.stdout + proc.stderr
                oom = any(s in text_out for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
                tail = " | ".join(line.strip() for line in text_out.strip().splitlines()[-3:])[-600:]
                row = {**cell, "status": "OOM" if oom else "error", "returncode": proc.returncode, "tail": tail}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
