"""A pod in miniature: two processes with one GPU each train like one process driving both GPUs.

    python benchmarks/pod_two_process.py                  # TNL-385M, 20 steps of 16 x 2,048 tokens
    python benchmarks/pod_two_process.py --mesh fsdp      # parameters split over the two processes
    python benchmarks/pod_two_process.py --tiny           # CPU smoke run: tiny TNL, gloo collectives

Runs the same training twice on the two GPUs of one host, from the same initialisation, on the same
global batches (random tokens drawn from `--seed`, each process handing in its own rows through
`run.global_batch`), with the mesh `--mesh` (data: 2-way data parallel; fsdp: parameters and
optimizer state split over the two devices):

1. one process that sees both GPUs;
2. two processes, `jax.distributed` with a local coordinator (what `train/main.py` does when
   `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` are set), each seeing one GPU
   (`CUDA_VISIBLE_DEVICES`).

The second is what a multi-host pod runs (one process per host), on one machine. Prints one JSON line
per run (losses per step, tokens/s per GPU after the first step) and a table of the losses side by
side with their largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(args) -> None:
    """One process of a run: trains `args.steps` steps; process 0 prints its losses as one JSON line."""
    sys.path.insert(0, ROOT)
    if args.tiny:
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if args.processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", args.processes, args.process_id)
    import numpy as np

    from lightning_jax.training.config import TrainConfig
    from lightning_jax.training.run import global_batch, setup_run
    from lightning_jax.training import step as step_lib

    mesh = {"data": 2, "fsdp": 1} if args.mesh == "data" else {"data": 1, "fsdp": 2}
    model = ({"arch": "tnl", "preset": "tiny", "vocab_size": 257} if args.tiny else
             {"arch": "tnl", "preset": "tnl_385m", "vocab_size": 64000, "dtype": "bfloat16",
              "param_dtype": "float32", "scan_layers": True, "remat": "full"})
    config = TrainConfig.from_dict({
        "steps": args.steps, "workdir": os.path.join(args.workdir, f"{args.processes}_processes"),
        "seed": 0, "model": model, "data": {"seq_len": args.seq_len, "batch_size": args.batch},
        "mesh": mesh, "checkpoint": {"enabled": False},
    })
    run = setup_run(config)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.graphdef, run.tx, run.schedule), run.state)
    vocab = model["vocab_size"]
    rows = args.batch // jax.process_count()
    first = jax.process_index() * rows
    state, losses, t0 = run.state, [], None
    with jax.set_mesh(run.mesh):
        for step in range(args.steps):
            tokens = np.random.default_rng([args.seed, step]).integers(
                0, vocab, (args.batch, args.seq_len + 1), dtype=np.int32)
            state, metrics = train_step(state, global_batch(run, tokens[first:first + rows], args.batch))
            losses.append(float(metrics["loss"]))  # waits for the step
            if step == 0:
                t0 = time.perf_counter()
    elapsed = time.perf_counter() - t0
    per_gpu = (args.steps - 1) * args.batch * args.seq_len / elapsed / jax.device_count()
    if jax.process_index() == 0:
        print("RUN " + json.dumps({"processes": args.processes, "devices": jax.device_count(),
                                   "device": jax.devices()[0].device_kind, "mesh": mesh, "losses": losses,
                                   "tokens_per_sec_per_device": per_gpu}), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(args, processes: int) -> dict:
    """Runs `processes` worker processes over the two devices and returns process 0's report."""
    port = free_port()
    procs = []
    for pid in range(processes):
        env = dict(os.environ)
        if args.tiny:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={2 // processes}"
        elif processes > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(pid)
        else:
            env.setdefault("CUDA_VISIBLE_DEVICES", "0,1")
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--processes", str(processes),
                   "--process-id", str(pid), "--port", str(port), "--steps", str(args.steps),
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--seed", str(args.seed),
                   "--mesh", args.mesh, "--workdir", args.workdir] + ["--tiny"] * args.tiny
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=args.timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            outputs.append(proc.communicate())
    for pid, (proc, (_, err)) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise SystemExit(f"{processes}-process run, process {pid} failed (exit {proc.returncode}):\n"
                             + "\n".join(err.strip().splitlines()[-15:]))
    lines = [line for line in outputs[0][0].splitlines() if line.startswith("RUN ")]
    return json.loads(lines[-1][4:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16, help="global sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", choices=("data", "fsdp"), default="data")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny TNL, 2 CPU devices")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--workdir", default="/tmp/pod_two_process")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.steps, args.batch, args.seq_len = min(args.steps, 6), 4, 64
    if args.worker:
        worker(args)
        return 0

    runs = [launch(args, 1), launch(args, 2)]
    for run in runs:
        print(json.dumps(run), flush=True)
    one, two = (run["losses"] for run in runs)
    print("| step | one process, 2 devices | two processes, 1 device each | difference |\n| --- | --- | --- | --- |")
    for step, (a, b) in enumerate(zip(one, two), start=1):
        print(f"| {step} | {a:.6f} | {b:.6f} | {abs(a - b):.2e} |")
    worst = max(abs(a - b) for a, b in zip(one, two))
    print(f"mesh {args.mesh}: largest loss difference {worst:.2e}; tokens/s per device "
          f"{runs[0]['tokens_per_sec_per_device'] / 1e3:.1f}K (one process) vs "
          f"{runs[1]['tokens_per_sec_per_device'] / 1e3:.1f}K (two processes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
