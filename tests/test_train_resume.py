"""Checkpoints: SIGKILL then resume continues the exact loss sequence; SIGTERM saves and exits
cleanly; a checkpoint saved on an 8-device data mesh restores onto a 2x4 (data, tensor) mesh."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lightning_jax.training import checkpoint as ckpt
from lightning_jax.training.evaluation import Evaluator
from lightning_jax.training.loop import load_model, train_and_evaluate
from lightning_jax.training.run import setup_run
from test_train import DEMO, ROOT, demo_config

STEPS = 40
# One CPU device per subprocess: the mesh does not matter here, and 8 fake devices on a 2-core
# machine mostly add overhead.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def cli(workdir, *overrides):
    return [
        sys.executable, "train/main.py", "--config", DEMO, f"--config.workdir={workdir}", f"--config.steps={STEPS}",
        "--config.checkpoint.every_steps=10", "--config.log.every_steps=1", "--config.eval.every_steps=0",
        "--config.eval.max_tokens=2048", "--config.log.progress_bar=False", "--config.data.seq_len=128", *overrides,
    ]


def losses(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def wait_for_step(proc, workdir, step, committed=None, timeout=240):
    """Polls until metrics.jsonl has a row of `step` or later (and checkpoint `committed`, if given,
    is complete on disk); fails if the run ends first."""
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before step {step}"
        if os.path.exists(path):
            done = [json.loads(l)["step"] for l in open(path) if l.endswith("\n")]
            if done and max(done) >= step and (committed is None or committed in committed_steps(workdir)):
                return max(done)
        time.sleep(0.01)
    raise TimeoutError(f"no step {step} in {timeout} s")


def committed_steps(workdir):
    d = ckpt.checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    return sorted(int(s) for s in os.listdir(d) if s.isdigit() and os.path.exists(os.path.join(d, s, "commit_success.txt")))


def test_sigkill_then_resume_continues_the_exact_loss_sequence(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(cli(reference), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    expected = losses(reference)
    assert [s for s, _ in expected] == list(range(1, STEPS + 1))

    proc = subprocess.Popen(cli(killed), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, killed, 25, committed=20)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    reached = max(s for s, _ in losses(killed))
    assert 25 <= reached < STEPS and proc.returncode == -signal.SIGKILL
    assert 20 in committed_steps(killed)

    subprocess.run(cli(killed), cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    # Rows after the restored checkpoint were dropped and recomputed: one row per step, and the
    # resumed steps reproduce the uninterrupted run bit for bit (model, optimizer, data position).
    assert losses(killed) == expected


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(cli(tmp_path), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_step(proc, tmp_path, 5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert "preempted=True" in out
    stopped = max(s for s, _ in losses(tmp_path))
    # The step it stopped at is saved and committed (resuming from a checkpoint is tested above).
    assert stopped < STEPS and committed_steps(tmp_path)[-1] == stopped


def test_restore_onto_a_different_mesh_gives_the_same_eval_loss(tmp_path):
    common = dict(steps=8, data={"seq_len": 64}, eval={"every_steps": 0, "max_tokens": 4096},
                  log={"every_steps": 4, "progress_bar": False})
    saved = train_and_evaluate(demo_config(tmp_path, mesh={"data": 8, "fsdp": 1, "tensor": 1}, **common))
    assert saved["last_checkpoint"] == 8

    run = setup_run(demo_config(tmp_path, mesh={"data": 2, "fsdp": 1, "tensor": 4}, **common))
    manager = ckpt.make_manager(str(tmp_path), run.config.checkpoint, read_only=True)
    state, meta = ckpt.restore(manager, run.state)
    manager.close()
    assert int(state["step"]) == 8 and meta["step"] == 8
    qkvu = state["params"]["groups"][0]["mixer"]["qkvu"]
    assert qkvu.sharding.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 4, "context": 1}
    assert tuple(qkvu.sharding.spec) == (None, None, "tensor")  # heads split 4 ways
    mu = state["opt_state"][1][0].mu["groups"][0]["mixer"]["qkvu"]
    assert tuple(mu.sharding.spec) == (None, None, "tensor")  # Adam moments follow their parameter
    # Not the fresh initialisation it was restored into:
    assert not np.allclose(np.asarray(qkvu), np.asarray(run.state["params"]["groups"][0]["mixer"]["qkvu"]))
    restored = Evaluator(run)(state)
    assert restored["eval_loss"] == pytest.approx(saved["eval_loss"], rel=1e-5)
    # load_model: the same weights, as a module.
    model = load_model(run.config)
    np.testing.assert_array_equal(np.asarray(model.groups[0].mixer.qkvu[...]), np.asarray(qkvu))
