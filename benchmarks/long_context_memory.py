"""One TNL-385M train step at long contexts on one GPU: tokens/s, compile seconds, peak memory.

    python benchmarks/long_context_memory.py                                   # blocked loss (the default 4096)
    python benchmarks/long_context_memory.py --loss-block-tokens 0,4096        # the full-logits loss too
    python benchmarks/long_context_memory.py --tiny                            # CPU smoke run (tiny model)

TNLConfig.tnl_385m(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full"),
contexts 262144 and 1048576 at batch 1 and 2048 at batch 32, through benchmarks/train_throughput.py's
`measure` (compile step, warm-up step, timed steps). Each (loss block, context) cell runs in its own
process, so `peak_bytes_in_use` is that cell's peak and an OOM (or a crash) ends only that cell.
Prints one JSON line per cell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = ((262144, 1), (1048576, 1), (2048, 32))
TINY_CELLS = ((4096, 1), (16384, 1), (256, 8))


def one_cell(context: int, batch: int, block_tokens: int, steps: int, tiny: bool) -> dict:
    sys.path.insert(0, ROOT)
    import functools

    import jax

    from benchmarks import train_throughput as bench
    from lightning_jax.models import TNLConfig, make_mesh
    from lightning_jax.training import metrics as metrics_lib, step as step_lib

    # measure() calls step_lib.make_train_step(graphdef, tx, schedule): give it this cell's loss block.
    step_lib.make_train_step = functools.partial(step_lib.make_train_step, loss_block_tokens=block_tokens)
    common = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="full")
    config = TNLConfig.tiny(**common) if tiny else TNLConfig.tnl_385m(**common)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    row = bench.measure("tnl", config, context, batch * context, steps, mesh, metrics_lib.peak_flops_per_device())
    stats = jax.devices()[0].memory_stats() or {}
    row.update(loss_block_tokens=block_tokens, device=jax.devices()[0].device_kind,
               peak_bytes_in_use=stats.get("peak_bytes_in_use"),
               peak_gib=None if "peak_bytes_in_use" not in stats else round(stats["peak_bytes_in_use"] / 2**30, 2))
    if row.get("status") == "ok":
        row["tokens_per_s"] = row["tokens_per_sec_per_device"]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss-block-tokens", default="4096", help="comma-separated; 0 = full logits")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per cell")
    parser.add_argument("--tiny", action="store_true", help="tiny model and short contexts (CPU smoke run)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # context,batch,block: run one cell here
    args = parser.parse_args()

    if args.cell:
        context, batch, block = map(int, args.cell.split(","))
        print("CELL " + json.dumps(one_cell(context, batch, block, args.steps, args.tiny)), flush=True)
        return 0

    for block in (int(b) for b in args.loss_block_tokens.split(",")):
        for context, batch in TINY_CELLS if args.tiny else CELLS:
            base = {"model": "tnl_385m" if not args.tiny else "tnl_tiny", "context": context, "batch": batch,
                    "loss_block_tokens": block}
            command = [sys.executable, os.path.abspath(__file__), "--cell", f"{context},{batch},{block}",
                       "--steps", str(args.steps)] + (["--tiny"] if args.tiny else [])
            try:
                proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(json.dumps({**base, "status": "timeout"}), flush=True)
                continue
            lines = [l for l in proc.stdout.splitlines() if l.startswith("CELL ")]
            if lines:
                print(json.dumps({**base, **json.loads(lines[-1][5:])}), flush=True)
                continue
            text = proc.stdout + proc.stderr
            oom = any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory"))
            tail = " | ".join(l.strip() for l in text.strip().splitlines()[-3:])[-600:]
            print(json.dumps({**base, "status": "OOM" if oom else "error", "returncode": proc.returncode,
                              "tail": tail}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
