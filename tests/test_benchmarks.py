"""The GPU benchmark's own pieces on CPU, so that a device call is never spent on a broken script:
the chunked reference that the GPU check trusts, and one check case end to end (Pallas kernels in
interpret mode)."""

from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import attention as bench  # noqa: E402

from lightning_jax.attention import reference  # noqa: E402


def test_chunked_reference_matches_quadratic():
    # 2 whole chunks of 512 and a tail of 76: the carried state must join them exactly.
    keys = jax.random.split(jax.random.PRNGKey(5), 4)
    shape = (2, 1100, 3, 8)
    q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
    s_in = jax.random.normal(keys[3], (2, 3, 8, 8), jnp.float32)
    rates = jnp.array([0.0, 0.5, 0.01], jnp.float32)
    o, s = bench.chunked_reference(q, k, v, rates, s_in)
    o_ref, s_ref = reference.quadratic(q, k, v, rates, s_in)
    np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-4)


def test_check_case_passes_on_cpu():
    errs, finite = bench.check_one(600, 16, jnp.bfloat16, seed=3)
    assert finite
    assert set(errs) == {"o", "final_state", "dq", "dk", "dv", "d_initial_state"}
    assert max(errs.values()) <= bench.TOLERANCE["bfloat16"], errs
    assert min(errs.values()) > 0  # bf16 inputs against an fp32 reference: never exact


def test_kernels_script_runs_on_cpu(monkeypatch):
    # benchmarks/kernels_pallas.py end to end at a tiny shape with several chunks (interpret mode),
    # each call run once instead of timed: its arrays must fit the kernels' current signatures.
    import kernels_pallas

    monkeypatch.setattr(kernels_pallas, "time_jax", lambda fn, sets: 0.0)
    monkeypatch.setattr(kernels_pallas, "SCANS", dict(list(kernels_pallas.SCANS.items())[:2]))
    monkeypatch.setattr(kernels_pallas, "STATES", dict(list(kernels_pallas.STATES.items())[:2]))
    res = kernels_pallas.time_kernels((1, 512, 2, 16))
    assert len(res) == 2 * 2 + 2, res
    for row in res.values():
        assert np.isfinite(row["rel_err"]) and row["rel_err"] < 1e-5, res


def test_segments_section_runs_on_cpu(monkeypatch, capsys):
    # benchmarks/attention.py's segments section at a tiny shape (interpret mode), each call run
    # once instead of timed: both variants run, the ratios and the table come out.
    calls = []
    monkeypatch.setattr(bench, "time_jax", lambda fn, sets: calls.append(jax.block_until_ready(fn(*sets[0]))) or 1.0)
    entry = bench.time_segments((2, 128, 2, 16), 3)
    assert len(calls) == 4 and entry["documents"] == 3
    assert entry["none"]["finite"] and entry["segments"]["finite"], entry
    assert entry["fwd_ratio"] == entry["fb_ratio"] == 1.0
    # The documents reset the state: the outputs differ after the first boundary only.
    o_none, o_seg = np.asarray(calls[0], np.float32), np.asarray(calls[2], np.float32)
    np.testing.assert_allclose(o_none[:, :43], o_seg[:, :43], rtol=1e-2, atol=1e-2)
    assert not np.allclose(o_none[:, 43:], o_seg[:, 43:])
    bench.print_tables({"segments": [entry]})
    assert "3 documents per row" in capsys.readouterr().out


def test_deadline_stops_new_rows(monkeypatch, capsys):
    # --deadline: once passed, no new shape or check case starts (the machine's time limit would
    # otherwise cut the run before its tables); before it, rows run as usual.
    import time

    monkeypatch.setattr(bench, "SAVE", lambda: None)
    monkeypatch.setattr(bench, "time_shape", lambda shape, bandwidth, peers: {"shape": list(shape)})
    results = {}
    monkeypatch.setattr(bench, "DEADLINE", time.monotonic() + 3600)
    bench.section_family(results, "family_b", [(1, 64, 1, 64), (2, 64, 1, 64)], 1e12, False)
    assert len(results["family_b"]) == 2
    monkeypatch.setattr(bench, "DEADLINE", time.monotonic() - 1)
    bench.section_family(results, "family_b", [(1, 64, 1, 64), (2, 64, 1, 64)], 1e12, False)
    bench.section_check(results, "1x64:float32")
    assert results["family_b"] == [] and "check" not in results
    out = capsys.readouterr().out
    assert "skipping family_b from (1, 64, 1, 64) on" in out and "--check-start 0 resumes" in out


def test_few_programs_script_runs_on_cpu(monkeypatch, capsys):
    # benchmarks/few_programs.py at a tiny shape (interpret mode), each call run once instead of
    # timed: the Mosaic variants (whole sequences and the op's own plan) and Triton, both ways.
    import few_programs

    ran = []
    monkeypatch.setattr(few_programs, "time_jax",
                        lambda fn, sets: ran.append(jax.block_until_ready(fn(*sets[0]))) or 1e-3)
    monkeypatch.setattr(sys, "argv", ["few_programs.py", "--shapes", "1x128x2x64",
                                      "--variants", "pallas_triton,mosaic_whole,mosaic_pieces,mosaic_no_tail"])
    few_programs.main()
    assert len(ran) == 8  # four variants, forward and forward + backward
    o = [np.asarray(r if not isinstance(r, tuple) else r[0], np.float32) for r in ran[::2]]
    for other in o[1:]:  # the Mosaic variants against Triton: bf16 outputs (and a bf16 state in Mosaic's)
        assert np.linalg.norm(other - o[0]) / np.linalg.norm(o[0]) < 1e-2
    assert "1x128x2x64 | 2 | 1.0000 / 1.0000 | 1.0000 / 1.0000 | 1.0000 / 1.0000 | 1.0000 / 1.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--variants: got 'nope'"):
        monkeypatch.setattr(sys, "argv", ["few_programs.py", "--variants", "nope"])
        few_programs.main()


def test_fused_dkdv_check_runs_on_cpu(monkeypatch):
    """benchmarks/fused_dkdv.py's GPU check, interpreted at a tiny case (the fused sweep in 2
    pieces): both backwards within bf16 error of the oracle; unknown variants are refused."""
    import fused_dkdv

    row = fused_dkdv.check((1, 200, 2, 64, 64, 2, True), interpret=True)
    assert len(row["fused"]) == len(row["three_sweeps"]) == 4
    assert max(row["fused"]) < 2e-2 and max(row["three_sweeps"]) < 2e-2
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["fused_dkdv.py", "--variants", "nope"])
        fused_dkdv.main()


def test_few_programs_times_packed_documents(monkeypatch):
    # --document-length L: every variant gets segment ids t // L (checked against the oracle on the
    # timed inputs), and jla, which has no documents, is skipped.
    import few_programs

    errors = []

    def run_once(fn, sets):
        q, k, v, _ = sets[0]
        out = jax.block_until_ready(fn(*sets[0]))
        if not isinstance(out, tuple):  # the forward (the other call is forward + backward)
            rates = jnp.asarray(few_programs.alibi_slopes(q.shape[2]), jnp.float32)
            ids = jnp.broadcast_to(jnp.arange(q.shape[1]) // 64, q.shape[:2])
            want, _ = reference.quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), rates, None, segment_ids=ids)
            errors.append(float(jnp.linalg.norm(out.astype(jnp.float32) - want) / jnp.linalg.norm(want)))
        return 1e-3

    monkeypatch.setattr(few_programs, "time_jax", run_once)
    monkeypatch.setattr(sys, "argv", ["few_programs.py", "--shapes", "1x200x2x64", "--document-length", "64",
                                      "--variants", "pallas_triton,jla"])
    few_programs.main()
    assert len(errors) == 1 and errors[0] < 1e-2
    with pytest.raises(SystemExit, match="--document-length: got 0"):
        monkeypatch.setattr(sys, "argv", ["few_programs.py", "--document-length", "0"])
        few_programs.main()


def test_cluster_exchange_meets_and_lowers():
    # benchmarks/cluster_exchange.py: in interpret mode every program of a cluster ends with its
    # cluster's mean (the barrier orders the rounds), and the fenced kernel lowers for sm_90.
    import cluster_exchange

    assert cluster_exchange.check(size=2, rounds=3) < 1e-6
    x = jax.ShapeDtypeStruct((4, 4, cluster_exchange.DIM_K, cluster_exchange.TILE), jnp.float32)
    lowered = jax.jit(lambda x: cluster_exchange.exchange(x, size=4, rounds=2, fenced=True)).trace(x)
    assert lowered.lower(lowering_platforms=("cuda",)).as_text().count("mosaic_gpu") >= 1


@pytest.mark.parametrize("time,segments,window,races", [(300, 2, 2, True), (1000, 2, 4, True), (600, 4, 2, False)])
def test_read_once_forward_matches_the_oracle(time, segments, window, races):
    # benchmarks/read_once.py's kernel in GPU interpret mode: ragged lengths (300 and 1,000 tokens
    # pad to whole windows), an initial state, a head without decay, one to four windows. At
    # P = 4 the race detector flags each program's third U load of a boundary, which reuses the
    # slot of its first after that one was read and released (u_free); the outputs match here and
    # on the GPU, so that case runs without the detector.
    import read_once
    from jax.experimental.pallas import mosaic_gpu as plgpu

    keys = jax.random.split(jax.random.PRNGKey(7), 4)
    q, k = (jax.random.normal(keys[i], (1, time, 2, 64), jnp.bfloat16) for i in range(2))
    v = jax.random.normal(keys[2], (1, time, 2, 64), jnp.bfloat16)
    s_in = jax.random.normal(keys[3], (1, 2, 64, 64), jnp.float32)
    rates = jnp.array([0.0, 0.05], jnp.float32)
    params = plgpu.InterpretGPUParams(detect_races=races, inline_mgpu="ignore")
    o, final = jax.block_until_ready(
        read_once.forward_windows(q, k, v, rates, s_in, segments=segments, window=window, interpret=params))
    want_o, want_final = reference.quadratic(*(x.astype(jnp.float32) for x in (q, k, v)), rates, s_in)
    assert float(jnp.linalg.norm(o.astype(jnp.float32) - want_o) / jnp.linalg.norm(want_o)) < 1e-2
    assert float(jnp.linalg.norm(final - want_final) / jnp.linalg.norm(want_final)) < 1e-3


@pytest.mark.parametrize("segments,window,registers", [(4, 8, None), (2, 8, False)])
def test_read_once_forward_lowers_for_sm90(segments, window, registers):
    import read_once

    q = jax.ShapeDtypeStruct((1, 4099, 2, 128), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((1, 4099, 2, 64), jnp.bfloat16)
    rates = jax.ShapeDtypeStruct((2,), jnp.float32)
    s_in = jax.ShapeDtypeStruct((1, 2, 128, 64), jnp.float32)
    fn = lambda q, k, v, r, s: read_once.forward_windows(q, k, v, r, s, segments=segments, window=window,  # noqa: E731
                                                         update_in_registers=registers)
    assert "mosaic_gpu" in jax.jit(fn).trace(q, q, v, rates, s_in).lower(lowering_platforms=("cuda",)).as_text()


def test_generation_speed_tiny_runs_every_cell(tmp_path):
    # benchmarks/generation_speed.py --tiny end to end (both models, TNL's chunked prefill, the
    # fp32-parameter and unscanned variants; generate() checked against the timed programs), in
    # its own process with one CPU device, as it is run.
    import json
    import os
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, "benchmarks/generation_speed.py", "--tiny"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert rows == json.loads((tmp_path / "generation_speed.json").read_text())["rows"]
    assert {r["status"] for r in rows} == {"ok"}, [(r["label"], r.get("error")) for r in rows]
    cells = {(r["label"], r["prompt"], r["batch"]) for r in rows}
    for model in ("tnl:params=bf16:scan=1", "transformer:params=bf16:scan=1:attn=default"):
        assert {(model, p, b) for p in (16, 64) for b in (1, 2)} <= cells
    assert {("tnl:params=fp32:scan=1", 16, 1), ("tnl:params=bf16:scan=0", 16, 1)} <= cells
    assert len(rows) == 10
    assert any(r["prefill_chunk"] for r in rows if r["model"] == "tnl")
    for r in rows:
        assert r["steps"] == 4 and r["compile_s"] > 0 and r["plan_gib"] > 0 and r["first_tokens_agree"]
        assert r["prefill_ms"] > 0 and r["t2_ms"] > 0 and r["floor_ms"] > 0 and r["weights_gb"] > 0
        # On a loaded CPU the difference of two tiny timings could come out negative: only its sign
        # matters for the tokens/s, which is None then.
        assert r["decode_tokens_per_s"] is None or r["decode_tokens_per_s"] > 0
    assert "| cell | prompt | batch |" in proc.stdout


def test_generation_speed_times_either_decoding_step(tmp_path):
    # --variants tnl:decode=...: TNL's decoding step pinned to the fused kernels (interpreted on
    # CPU) or to XLA, both checked against generate(); a bad value names the flag.
    import json
    import os
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "OUT": str(tmp_path)}
    command = [sys.executable, "benchmarks/generation_speed.py", "--tiny", "--models", "tnl", "--prompts", "16",
               "--batches", "1", "--variants"]
    proc = subprocess.run(command + ["tnl:decode=pallas,tnl:decode=xla:batch=2", "--compare-xla"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "generation_speed.json").read_text())["rows"]
    assert {(r["label"], r["batch"], r["status"]) for r in rows} == {
        ("tnl:params=bf16:scan=1", 1, "ok"), ("tnl:params=bf16:scan=1:decode=pallas", 1, "ok"),
        ("tnl:params=bf16:scan=1:decode=xla", 2, "ok")}
    for r in rows:  # greedy tokens of the fused kernels against XLA's step, same weights: all 1 + 4 agree
        assert r.get("same_tokens_as_xla") == (None if r["decode"] == "xla" else 5), r["label"]
    proc = subprocess.run(command + ["tnl:decode=cuda"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0 and "--variants: decode='cuda'" in proc.stderr


@pytest.mark.parametrize("layout", ["decoding", "training"])
def test_profile_step_decode_tiny_runs(layout):
    # benchmarks/profile_step.py --decode on CPU: the Sampler timings and the profile run (a CPU
    # trace has no device kernels, so the tables are GPU-only).
    import os
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--decode", "--tiny", "--batch", "2",
                           "--steps", "2", "--decode-layout", layout], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Sampler.decode, ") == 2
    assert f"decoding step, batch 2, {layout} layout" in proc.stdout
