"""benchmarks/compare_models.py end to end in its smoke mode (--tiny: 20 steps, 1 seed): both demo
models trained by the library's loop on the same data, the results, table and plot written; and the
refusal of models that would not be trained on the same data."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# One CPU device, as a user runs it (conftest.py gives the test process 8).
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def run(*args, timeout=240):
    return subprocess.run([sys.executable, "benchmarks/compare_models.py", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_comparison_trains_both_models_and_writes_table_and_plot(tmp_path):
    proc = run("--tiny", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    settings, summary, runs = result["settings"], result["summary"], result["runs"]
    assert list(runs) == ["TNL", "Transformer"] and settings["seeds"] == [0]
    # The demo configs give each model its own learning rate; everything else is the same.
    assert settings["unit"] == "nats per byte" and settings["optim_differs"] == ["lr"]
    tnl, transformer = runs["TNL"][0], runs["Transformer"][0]
    # The same data, order, steps and optimizer but for the learning rate; parameters within 1 %.
    assert tnl["config"]["data"] == transformer["config"]["data"]
    assert {**tnl["config"]["optim"], "lr": None} == {**transformer["config"]["optim"], "lr": None}
    assert (tnl["config"]["optim"]["lr"], transformer["config"]["optim"]["lr"]) == (6e-3, 3e-3)
    assert tnl["config"]["seed"] == transformer["config"]["seed"] == 0
    assert abs(transformer["params"] / tnl["params"] - 1) < 0.01
    steps = settings["steps"]
    for label, r in (("TNL", tnl), ("Transformer", transformer)):
        # Curves read back from the run's own metrics.jsonl; an evaluation at the last step.
        assert (tmp_path / label / "seed0" / "metrics.jsonl").is_file()
        assert r["train"][-1][0] == r["eval"][-1][0] == steps
        assert r["final_eval_loss"] == r["eval"][-1][1] == summary[label]["final_eval_loss"]["mean"]
        assert r["eval_tokens"] == settings["eval_tokens"] > 0
        # It learned something: below the uniform loss over 257 byte values (5.55 nats).
        assert r["train"][-1][1] < r["train"][0][1] and r["final_eval_loss"] < 5.0
        assert r["wall_s"] > 0
    paired = summary["Transformer"]["eval_loss_minus_TNL"]["per_seed"]
    assert paired == [transformer["final_eval_loss"] - tnl["final_eval_loss"]]
    table = (tmp_path / "comparison.md").read_text()
    assert table.splitlines()[0].startswith("| model | parameters | final validation loss")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:4]] == ["TNL", "Transformer"]
    assert f"{tnl['final_eval_loss']:.4f}" in table and f"{transformer['final_eval_loss']:.4f}" in table
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert proc.stdout.strip().splitlines()[0].startswith("TNL seed 0: validation")


def test_models_on_different_data_are_refused_before_training(tmp_path):
    proc = run("--tiny", "--out", str(tmp_path), "--set", "Transformer:data.seq_len=32", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Transformer's data differs from TNL's" in proc.stderr
    assert not (tmp_path / "TNL").exists()  # nothing trained


def test_runs_of_one_model_each_merge_with_reuse_from(tmp_path):
    # As on two GPUs: each model in its own --out, then the table of both from those runs, nothing trained.
    a, b, merged = tmp_path / "a", tmp_path / "b", tmp_path / "ab"
    quick = ("--tiny", "--steps", "4", "--eval-every", "2", "--no-plot")
    for out, model in ((a, "TNL=train/configs/demo.py"), (b, "Transformer=train/configs/demo_transformer.py")):
        proc = run(*quick, "--model", model, "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-3000:]
    both = ("--model", "TNL=train/configs/demo.py", "--model", "Transformer=train/configs/demo_transformer.py")
    proc = run(*quick, *both, "--out", str(merged), "--reuse-from", str(a), "--reuse-from", str(b), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("(reused)") == 2
    runs = json.loads((merged / "results.json").read_text())["runs"]
    for label, out in (("TNL", a), ("Transformer", b)):
        original = json.loads((out / label / "seed0" / "result.json").read_text())
        assert runs[label][0]["final_eval_loss"] == original["final_eval_loss"]
        assert runs[label][0]["wall_s"] == original["wall_s"]
        assert (merged / label / "seed0" / "metrics.jsonl").is_file()
    assert "Transformer minus TNL" in (merged / "comparison.md").read_text()
    # A run of another config (here other steps) is not taken, and nothing is trained instead.
    proc = run("--tiny", "--steps", "6", "--eval-every", "2", "--no-plot", *both, "--out", str(tmp_path / "c"),
               "--reuse-from", str(a), "--reuse-from", str(b), timeout=120)
    assert proc.returncode == 2 and "--reuse-from: no finished run" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "c" / "TNL" / "seed0" / "metrics.jsonl").exists()
