"""Where a train step's GPU time goes: one TNL-385M (or Transformer-385M) step under `jax.profiler`.

    python benchmarks/profile_step.py                       # TNL-385M, 32 x 2,048 tokens
    python benchmarks/profile_step.py --context 1048576 --batch 1 --time-chunk-tokens 16384 --remat none
    python benchmarks/profile_step.py --tiny                # CPU smoke run (no device kernels: host events)
    python benchmarks/profile_step.py --decode --batch 1    # one decoding step (generation) instead
    python benchmarks/profile_step.py --decode --batch 1 --decode-layout training
    python benchmarks/profile_step.py --decode --batch 1 --decode-implementation xla

Compiles the step, runs two warm-up steps, then traces `--steps` steps (`jax.profiler.trace` with a
Perfetto trace), with XLA's CUDA graphs off. Each GPU kernel event names the HLO instruction it runs (`args.hlo_op`); the
compiled HLO's metadata gives that instruction's op_name: the `jax.named_scope` path (tnl/layers/
.../token_mixer/attention, channel_mixer, lm_head, loss, ...) and whether it belongs to the
backward pass (`transpose(...)`). Kernel time is summed per part of the model and per kind of
kernel (matmul, Pallas attention, fused elementwise, collective, copy) and printed as two tables,
in ms per step and as a share of the step's kernel time. `--trace-dir` keeps the trace for
Perfetto / TensorBoard.

`--decode` profiles the decoding step of generation instead (`--steps` steps of `Sampler.decode`
after a 256-token prompt, bf16 parameters), after timing `--steps` calls back to back and
`--steps` with the token read to the host after each (streaming): the same tables, then one middle
layer's operations in order, each with its kernels, its time and, for a projection, the bandwidth
at which it read its weight. Time it with `--command-buffers` (CUDA graphs on, as generation runs). The
step runs on the model as `generation.decoding_model` lays it out (`--decode-layout training`:
the training layout, projections with their input axes first).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (part, substring of the op_name) in priority order: the first match names the part.
PARTS = (
    ("loss head (logits, cross-entropy)", ("loss", "lm_head", "cross_entropy")),
    ("attention op", ("/attention",)),
    ("token mixer (projections, LRPE, norm, gate)", ("token_mixer",)),
    ("channel mixer (SGLU)", ("channel_mixer",)),
    ("embedding", ("/embed",)),
    ("layer norms, residuals", ("/layers",)),
)


def part_of(op_name: str) -> str:
    for part, keys in PARTS:
        if any(key in op_name for key in keys):
            return part
    if not op_name:
        return "unattributed"
    return "optimizer, clipping, other"


def kind_of(kernel: str, hlo_op: str) -> str:
    text = f"{kernel} {hlo_op}".lower()
    if any(k in text for k in ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "dot")):
        return "matmul"
    if "lightning" in text or "pallas" in text or "triton" in text:
        return "Pallas attention kernels"
    if any(k in text for k in ("all-reduce", "all-gather", "reduce-scatter", "nccl", "collective")):
        return "collective"
    if any(k in text for k in ("copy", "memcpy", "memset", "transpose", "dynamic-update-slice")):
        return "copy, transpose, memset"
    if "fusion" in text or "loop" in text or "reduce" in text or "input" in text:
        return "fused elementwise / reductions"
    return "other"


def op_names(hlo_text: str) -> dict[str, str]:
    """instruction name -> metadata op_name, from compiled HLO text."""
    names = {}
    pattern = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*?op_name="([^"]*)"')
    for line in hlo_text.splitlines():
        match = pattern.match(line)
        if match:
            names.setdefault(match.group(1), match.group(2))
    return names


def device_events(trace_dir: str) -> tuple[list[dict], dict]:
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
    if not files:
        raise SystemExit(f"no *.trace.json.gz under {trace_dir}")
    data = json.load(gzip.open(files[-1]))
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e.get("args", {}).get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in processes.items() if "GPU" in name or "gpu" in name}
    return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu], processes


def summarise(events: list[dict], names: dict[str, str], steps: int) -> str:
    by_part = collections.Counter()
    by_kind = collections.Counter()
    by_part_direction = collections.Counter()
    top = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        hlo_op = str(args.get("hlo_op", ""))
        op_name = names.get(hlo_op, "")
        ms = float(e.get("dur", 0)) / 1e3 / steps
        part = part_of(op_name)
        backward = "transpose(" in op_name
        by_part[part] += ms
        by_part_direction[(part, backward)] += ms
        by_kind[kind_of(e.get("name", ""), hlo_op)] += ms
        top[(e.get("name", "")[:60], hlo_op, part)] += ms
    total = sum(by_part.values()) or 1.0
    lines = [f"GPU kernel time per step: {total:.1f} ms ({len(events) // max(steps, 1)} kernels)", "",
             "| part of the model | ms per step | share | of it backward |", "| --- | --- | --- | --- |"]
    for part, ms in by_part.most_common():
        lines.append(f"| {part} | {ms:.2f} | {100 * ms / total:.1f}% | {by_part_direction[(part, True)]:.2f} |")
    lines += ["", "| kind of kernel | ms per step | share |", "| --- | --- | --- |"]
    for kind, ms in by_kind.most_common():
        lines.append(f"| {kind} | {ms:.2f} | {100 * ms / total:.1f}% |")
    lines += ["", "| top kernels | hlo op | part | ms per step |", "| --- | --- | --- | --- |"]
    for (kernel, hlo_op, part), ms in top.most_common(15):
        lines.append(f"| {kernel} | {hlo_op} | {part} | {ms:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tnl", "transformer"), default="tnl")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--remat", default="full")
    parser.add_argument("--loss-block-tokens", type=int, default=4096)
    parser.add_argument("--time-chunk-tokens", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3, help="traced steps")
    parser.add_argument("--tiny", action="store_true", help="tiny model (CPU smoke run)")
    parser.add_argument("--command-buffers", action="store_true",
                        help="keep XLA's CUDA graphs (kernels inside them cannot be attributed)")
    parser.add_argument("--trace-dir", default=None, help="keep the trace here (default: a temporary folder)")
    parser.add_argument("--decode", action="store_true", help="profile a decoding step (generation)")
    parser.add_argument("--decode-implementation", choices=("default", "xla", "pallas"), default="default",
                        help="TNL's decoding step (TNLConfig.decode_implementation; default: the config's)")
    parser.add_argument("--decode-layout", choices=("decoding", "training"), default="decoding",
                        help="--decode: the weights as generation lays them out, or the training layout")
    args = parser.parse_args()
    # XLA runs a step's kernels as CUDA graphs ("command buffers"), and a kernel inside one is traced
    # under the buffer's name instead of its HLO instruction: turn them off so that every kernel can be
    # attributed (this profile's step time is a little longer than a normal step's). Set here, before
    # JAX starts, not on import: other scripts import this module's helpers.
    if not args.command_buffers:
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer="

    import jax
    import numpy as np
    from flax import nnx

    from benchmarks.train_throughput import batch_sharding
    from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig, create_sharded_model, make_mesh
    from lightning_jax.training import optim, step as step_lib
    from lightning_jax.training.config import OptimConfig

    if args.decode:
        return profile_decode(args)

    common = dict(dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=args.remat)
    config_cls, cls = (TNLConfig, TNL) if args.model == "tnl" else (TransformerConfig, Transformer)
    preset = "tiny" if args.tiny else ("tnl_385m" if args.model == "tnl" else "transformer_385m")
    config = getattr(config_cls, preset)(**common)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    model = create_sharded_model(lambda: cls(config, rngs=nnx.Rngs(0)), mesh)
    tx = optim.make_optimizer(OptimConfig(), total_steps=1000)
    schedule = optim.learning_rate_schedule(OptimConfig(), 1000)
    with jax.set_mesh(mesh):
        graphdef, state = step_lib.init_train_state(model, tx, seed=0)
        del model
        step = step_lib.jit_train_step(step_lib.make_train_step(
            graphdef, tx, schedule, loss_block_tokens=args.loss_block_tokens,
            time_chunk_tokens=args.time_chunk_tokens), state)
        tokens = jax.device_put(np.random.default_rng(0).integers(
            0, config.vocab_size, (args.batch, args.context + 1), dtype=np.int32), batch_sharding(mesh))
        names = op_names(step.lower(state, tokens).compile().as_text())
        for _ in range(2):
            state, metrics = step(state, tokens)
        jax.block_until_ready(metrics)
        trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, metrics = step(state, tokens)
            jax.block_until_ready(metrics)
        wall = (time.perf_counter() - t0) / args.steps
    events, processes = device_events(trace_dir)
    tokens_per_step = args.batch * args.context
    print(f"{args.model} {preset}, {args.batch} x {args.context:,} tokens, remat {args.remat}, "
          f"time chunk {args.time_chunk_tokens or 'whole'}: {wall * 1e3:.1f} ms per step under the profiler "
          f"({tokens_per_step / wall / 1e3:.1f}K tokens/s); trace in {trace_dir}")
    if not events:
        print(f"no device kernel events (processes in the trace: {sorted(set(processes.values()))})")
        return 0
    print(summarise(events, names, args.steps))
    if not any(str((e.get("args") or {}).get("hlo_op", "")) in names for e in events[:200]):
        print("kernel events carry no known hlo_op; first event args:", [e.get("args") for e in events[:3]])
    return 0


def profile_decode(args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from lightning_jax import generation
    from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig

    config_cls, cls = (TNLConfig, TNL) if args.model == "tnl" else (TransformerConfig, Transformer)
    preset = "tiny" if args.tiny else ("tnl_385m" if args.model == "tnl" else "transformer_385m")
    extra = {} if args.model != "tnl" or args.decode_implementation == "default" else {
        "decode_implementation": args.decode_implementation}
    config = getattr(config_cls, preset)(dtype="bfloat16", param_dtype="bfloat16", scan_layers=False, **extra)
    model = cls(config, rngs=nnx.Rngs(0))
    if args.decode_layout == "decoding":
        model = generation.decoding_model(model)
    else:  # Sampler would lay the weights out for decoding: keep the training layout
        generation.decoding_model = lambda model: model
    prompt = np.random.default_rng(0).integers(1, config.vocab_size, (args.batch, 256), dtype=np.int32)
    sampler = generation.Sampler(model, prompt, 8 + 3 * args.steps, temperature=0.0, rng=jax.random.key(0))
    token, cache = sampler.prefill()
    for i in range(1, 8):
        token, cache = sampler.decode(token, cache, i)
    jax.block_until_ready(token)
    names = op_names(sampler._decode.as_text())
    # Streaming speed, before the profiler: calls back to back, then with the token read each step.
    for first, host_read in ((8, False), (8 + args.steps, True)):
        t0 = time.perf_counter()
        for i in range(first, first + args.steps):
            token, cache = sampler.decode(token, cache, i)
            if host_read:
                np.asarray(token)
        jax.block_until_ready(token)
        print(f"Sampler.decode, {'the token read to the host after each call' if host_read else 'back to back'}: "
              f"{(time.perf_counter() - t0) / args.steps * 1e3:.3f} ms per step "
              f"(CUDA graphs {'on' if args.command_buffers else 'off'})")
    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_decode_")
    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for i in range(8 + 2 * args.steps, 8 + 3 * args.steps):
            token, cache = sampler.decode(token, cache, i)
        jax.block_until_ready(token)
    wall = (time.perf_counter() - t0) / args.steps
    print(f"{args.model} {preset} decoding step, batch {args.batch}, {args.decode_layout} layout: "
          f"{wall * 1e3:.3f} ms per step under the profiler (Python dispatch included); trace in {trace_dir}")
    events, processes = device_events(trace_dir)
    if not events:
        print(f"no device kernel events (processes in the trace: {sorted(set(processes.values()))})")
        return 0
    print(summarise(events, names, args.steps))
    # One middle layer's kernels in order; a projection's bandwidth from its weight's bytes.
    layer = config.num_layers // 2
    weights = {}
    block = nnx.state(model.groups[layer], nnx.Param)
    for path, var in nnx.to_flat_state(block):
        weights[path[-1]] = var[...].size * jnp.dtype(var[...].dtype).itemsize
    # (named scope, einsum output) -> weight: the spec's inputs differ between the two layouts.
    projections = {("token_mixer", "->fbthk"): "qkvu" if args.model == "tnl" else "qkv", ("token_mixer", "->btd"): "out",
                   ("channel_mixer", "->fbtm"): "w12", ("channel_mixer", "->btd"): "w3"}
    rows = collections.OrderedDict()  # op -> [kernels, us per step], in the order they first run
    for e in events:
        op = names.get(str((e.get("args") or {}).get("hlo_op", "")), "")
        if f"layer_{layer}/" not in op:
            continue
        row = rows.setdefault(op.split(f"layer_{layer}/")[-1][:70], [0, 0.0])
        row[0] += 1 / args.steps
        row[1] += float(e.get("dur", 0)) / args.steps
    lines = ["", f"| layer {layer}: op | kernels | us per step | weight read at |", "| --- | --- | --- | --- |"]
    for op, (kernels, us) in rows.items():
        weight = next((weights.get(w) for (scope, out), w in projections.items()
                       if scope in op and out in op and "dot_general" in op), None)
        rate = f"{weight / us / 1e6:.2f} TB/s" if weight else ""
        lines.append(f"| {op} | {kernels:.0f} | {us:.2f} | {rate} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
