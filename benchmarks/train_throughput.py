"""Training throughput: tokens per second per GPU and MFU, TNL-385M against Transformer-385M, at
context 1K, 4K, 16K and 64K with the same tokens per step (the shape of the Lightning Attention-2
report's Table 1: TNL flat, the Transformer falling with context).

    python benchmarks/train_throughput.py                   # on the GPU machine
    python benchmarks/train_throughput.py --tiny            # tiny models, short contexts, on CPU
    python benchmarks/train_throughput.py --models tnl,tnl_triton --contexts 2048,65536   # attention backends
    OUT=/tmp/out python benchmarks/train_throughput.py --contexts 1024,4096 --steps 5

Each cell times full training steps (forward, backward, AdamW update; bf16 compute, fp32 master
weights) of the library's own train step on synthetic tokens, after a compile step and a warm-up
step. MFU counts each model's `flops_per_token(context)` (TNL's lightning attention at its chunked
cost, the Transformer's causal softmax attention at its T^2 cost) against the device's dense bf16
peak. A cell that runs out of memory is reported as OOM and the sweep goes on. Needs only jax, flax,
optax and this package (no grain, no ml_collections). Prints one line per cell, a table last, and
writes JSON to $OUT/train_throughput.json when OUT is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import jax
import numpy as np
from flax import nnx

from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig, batch_sharding, create_sharded_model, make_mesh
from lightning_jax.training import metrics as metrics_lib, optim, step as step_lib
from lightning_jax.training.config import OptimConfig


def model_configs(tiny: bool, remat: str):
    if tiny:
        return {"tnl": TNLConfig.tiny(), "tnl_triton": TNLConfig.tiny(attention_implementation="pallas_triton"),
                "transformer": TransformerConfig.tiny()}
    common = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=remat)
    return {
        "tnl": TNLConfig.tnl_385m(**common),
        # The same model with the attention pinned to the Pallas-Triton kernels both ways (the
        # default "pallas" runs the Mosaic GPU forward on Hopper where it covers the call).
        "tnl_triton": TNLConfig.tnl_385m(attention_implementation="pallas_triton", **common),
        # The config's default attention, as the main job runs it: cuDNN flash attention on a GPU
        # (transformer.default_softmax_implementation).
        "transformer": TransformerConfig.transformer_385m(**common),
    }


def _is_oom(error: BaseException) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def measure(name: str, config, context: int, tokens_per_step: int, steps: int, mesh, peak,
            step_options: dict | None = None) -> dict:
    """Times `steps` train steps at `context` (after compile + 1 warm-up) -> a result row.
    `step_options`: keywords for `step.make_train_step` (e.g. loss_block_tokens, time_chunk_tokens)."""
    batch = tokens_per_step // context
    row = {"model": name, "context": context, "batch": batch, "tokens_per_step": batch * context,
           "params": config.num_params()}
    cls = TNL if isinstance(config, TNLConfig) else Transformer
    state = tokens = None
    try:
        model = create_sharded_model(lambda: cls(config, rngs=nnx.Rngs(0)), mesh)
        tx = optim.make_optimizer(OptimConfig(warmup_steps=10), total_steps=1000)
        schedule = optim.learning_rate_schedule(OptimConfig(warmup_steps=10), 1000)
        with jax.set_mesh(mesh):
            graphdef, state = step_lib.init_train_state(model, tx, seed=0)
            del model
            train_step = step_lib.jit_train_step(
                step_lib.make_train_step(graphdef, tx, schedule, **(step_options or {})), state)
            rng = np.random.default_rng(0)
            tokens = jax.device_put(
                rng.integers(0, config.vocab_size, (batch, context + 1), dtype=np.int32), batch_sharding(mesh)
            )
            t0 = time.perf_counter()
            state, metrics = train_step(state, tokens)
            jax.block_until_ready(metrics)
            row["compile_s"] = time.perf_counter() - t0
            state, metrics = train_step(state, tokens)  # warm-up
            jax.block_until_ready(metrics)
            t0 = time.perf_counter()
            for _ in range(steps):
                state, metrics = train_step(state, tokens)
            loss = float(metrics["loss"])  # waits for the last step
            elapsed = time.perf_counter() - t0
        per_device = batch * context * steps / elapsed / jax.device_count()
        row.update(
            step_s=elapsed / steps,
            tokens_per_sec_per_device=per_device,
            flops_per_token=config.flops_per_token(context),
            mfu=metrics_lib.mfu(config.flops_per_token(context), per_device, peak),
            loss=loss,
            status="ok",
        )
    except Exception as e:  # noqa: BLE001: one failing cell must not end the sweep
        if not _is_oom(e):
            raise
        row["status"] = "OOM"
    finally:
        del state, tokens
        gc.collect()
        jax.clear_caches()
    return row


def table(rows: list[dict]) -> str:
    contexts = sorted({r["context"] for r in rows})
    names = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["context"]): r for r in rows}

    def fmt(r):
        if r is None:
            return "-"
        if r["status"] != "ok":
            return r["status"]
        mfu = f" ({100 * r['mfu']:.0f}%)" if r.get("mfu") is not None else ""
        return f"{r['tokens_per_sec_per_device'] / 1e3:.1f}K{mfu}"

    header = "| model | " + " | ".join(f"{c // 1024}K" if c >= 1024 else str(c) for c in contexts) + " |"
    lines = ["tokens/s per device (MFU), same tokens per step at every context", header,
             "|" + " --- |" * (len(contexts) + 1)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(fmt(cell.get((n, c))) for c in contexts) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and short contexts (CPU smoke run)")
    parser.add_argument("--contexts", default=None, help="comma-separated, default 1024,4096,16384,65536")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="default 65536 (1024 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per cell (default 10, 3 with --tiny)")
    parser.add_argument("--models", default="tnl,transformer",
                        help="from tnl, tnl_triton (TNL-385M with attention_implementation='pallas_triton'), transformer")
    parser.add_argument("--remat", default="full", help="remat policy of the 385M models (default full)")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak; default by device kind")
    args = parser.parse_args(argv)

    contexts = [int(c) for c in (args.contexts or ("64,128,256,512" if args.tiny else "1024,4096,16384,65536")).split(",")]
    tokens_per_step = args.tokens_per_step or (1024 if args.tiny else 65536)
    steps = args.steps or (3 if args.tiny else 10)
    for c in contexts:
        if tokens_per_step % c:
            parser.error(f"--tokens-per-step: got {tokens_per_step}, expected a multiple of every context ({c})")
    configs = model_configs(args.tiny, args.remat)
    names = args.models.split(",")
    for n in names:
        if n not in configs:
            parser.error(f"--models: got {n!r}, expected names from {sorted(configs)}")

    mesh = make_mesh(-1, 1, 1)
    peak = metrics_lib.peak_flops_per_device(override_tflops=args.peak_tflops)
    device = jax.devices()[0].device_kind
    print(f"{jax.device_count()} x {device}, peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s, "
          f"{tokens_per_step} tokens per step, {steps} timed steps", flush=True)
    rows = []
    for context in contexts:
        for name in names:
            row = measure(name, configs[name], context, tokens_per_step, steps, mesh, peak)
            rows.append(row)
            print(json.dumps(row), flush=True)

    result = {"device": device, "devices": jax.device_count(), "jax": jax.__version__, "peak_flops": peak,
              "tokens_per_step": tokens_per_step, "steps": steps, "tiny": args.tiny, "remat": args.remat, "rows": rows}
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "train_throughput.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
