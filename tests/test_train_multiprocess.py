"""Two processes on loopback (gloo collectives, 2 CPU devices each) train together through the CLI."""

import json
import os
import socket
import subprocess
import sys

from test_train import DEMO, ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_together(tmp_path):
    port = free_port()
    procs = []
    for pid in range(2):
        env = {
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2",
            "JAX_PROCESS_ID": str(pid),
        }
        cmd = [
            sys.executable, "train/main.py", "--config", DEMO, f"--config.workdir={tmp_path}",
            "--config.steps=6", "--config.data.seq_len=64", "--config.data.batch_size=8",
            "--config.checkpoint.every_steps=3", "--config.log.every_steps=1", "--config.eval.every_steps=3",
            "--config.eval.max_tokens=2048", "--config.log.progress_bar=False",
            # fsdp across the processes: parameters are split between them, so the step needs
            # cross-process collectives, not just a gradient all-reduce.
            "--config.mesh.data=2", "--config.mesh.fsdp=2",
        ]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=240))
        finally:
            proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    # Process 0 reports and writes; process 1 stays quiet (gloo itself prints connection lines).
    reports = [[l for l in out.splitlines() if l.startswith("step=")] for out, _ in outputs]
    assert len(reports[0]) == 1 and reports[0][0].startswith("step=6 ") and reports[1] == []
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    assert all(r["tokens_per_sec_per_device"] * 4 == r["tokens_per_sec"] for r in rows if "loss" in r)
    # Each process saved its own data-iterator position.
    data_dir = tmp_path / "checkpoints" / "6" / "data"
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data_dir))
