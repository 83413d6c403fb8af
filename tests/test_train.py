"""Training library: data pipeline, optimizer pieces, the demo run, pmap vs jit evaluation, the CLI's
config errors. Runs on the 8 fake CPU devices of conftest.py."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lightning_jax.training import data, metrics as metrics_lib, optim, step as step_lib
from lightning_jax.training.config import TrainConfig
from lightning_jax.training.evaluation import Evaluator
from lightning_jax.training.loop import train_and_evaluate
from lightning_jax.training.run import setup_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "train", "configs", "demo.py")


def demo_config(workdir, **sections) -> TrainConfig:
    """train/configs/demo.py as a TrainConfig, with `sections` ({"data": {...}, ...}) merged in."""
    spec = importlib.util.spec_from_file_location("demo_config", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    d = module.get_config().to_dict()
    d["workdir"] = str(workdir)
    for key, value in sections.items():
        if isinstance(value, dict):
            d[key] = {**d[key], **value}
        else:
            d[key] = value
    return TrainConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------
# Data


def test_shakespeare_validation_is_held_out_whole_plays():
    train, validation = data.shakespeare_documents("train"), data.shakespeare_documents("validation")
    assert len(train) == 40 and len(validation) == 2
    assert sum(map(len, train)) > 4_000_000
    assert not set(train) & set(validation)
    assert any("Macbeth" in t[:200].title() for t in validation)


def test_byte_tokenizer_round_trips_utf8():
    tok = data.ByteTokenizer()
    text = "To be, or not to be — that is the question"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.max() < 256 and tok.eos_id == 256
    assert tok.decode(list(ids) + [tok.eos_id]) == text


def test_train_pipeline_packs_shards_and_resumes_exactly():
    kwargs = dict(seq_len=64, local_batch_size=4, seed=1)
    tok = data.ByteTokenizer()
    it = iter(data.train_dataset("shakespeare", tok, **kwargs))
    first = next(it)["tokens"]
    assert first.shape == (4, 65) and first.dtype == np.int32
    state = it.get_state()
    expected = [next(it)["tokens"] for _ in range(3)]
    resumed = iter(data.train_dataset("shakespeare", tok, **kwargs))
    resumed.set_state(state)
    for batch in expected:
        np.testing.assert_array_equal(next(resumed)["tokens"], batch)
    # Two processes read different documents.
    p0 = iter(data.train_dataset("shakespeare", tok, process_index=0, process_count=2, **kwargs))
    p1 = iter(data.train_dataset("shakespeare", tok, process_index=1, process_count=2, **kwargs))
    assert not np.array_equal(next(p0)["tokens"], next(p1)["tokens"])


def test_validation_rows_cover_every_target_once():
    tok = data.ByteTokenizer()
    tokens, weights = data.validation_rows("shakespeare", tok, seq_len=100, max_tokens=1234)
    assert tokens.shape == (13, 101) and weights.sum() == 1234
    # Row r's last token is row r+1's first: consecutive rows continue the stream.
    np.testing.assert_array_equal(tokens[:-1, -1], tokens[1:, 0])
    batches = list(data.validation_batches(8, tokens, weights))
    assert [b[0].shape[0] for b in batches] == [8, 8] and sum(b[1].sum() for b in batches) == 1234


def test_token_directory_corpus(tmp_path):
    stream = np.arange(5000, dtype=np.uint16) % 1000
    stream.tofile(tmp_path / "train.bin")
    stream[:700].tofile(tmp_path / "validation.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 1000}))
    corpus = str(tmp_path)
    data.check_corpus(corpus)
    assert data.corpus_vocab_size(corpus, data.ByteTokenizer()) == 1000
    batch = next(iter(data.train_dataset(corpus, None, seq_len=32, local_batch_size=2, seed=0)))["tokens"]
    assert batch.shape == (2, 33)
    assert np.all(np.diff(batch, axis=1) % 1000 == 1)  # contiguous windows of the stream
    tokens, weights = data.validation_rows(corpus, None, seq_len=32)
    assert weights.sum() == 699


def test_missing_corpus_names_the_path(tmp_path):
    with pytest.raises(data.DataError, match=f"config.data.corpus: .*{tmp_path / 'nope'}"):
        data.check_corpus(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------------------------
# Optimizer


def test_no_weight_decay_on_embeddings_norms_and_vectors():
    from flax import nnx

    from lightning_jax.models import TNL, TNLConfig

    model = TNL(TNLConfig.tiny(), rngs=nnx.Rngs(0))
    mask = optim.weight_decay_mask(nnx.state(model, nnx.Param))
    flat = {optim.path_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat and all(not v for k, v in flat.items() if "embed" in k or "theta" in k)
    decayed = [k for k, v in flat.items() if v]
    assert any("qkvu" in k for k in decayed) and any("w3" in k for k in decayed)


def test_no_weight_decay_on_stacked_norm_weights():
    # Scanned layers stack each norm's [D] weight into [layers, D]: the rank alone would decay it.
    from flax import nnx

    from lightning_jax.models import Transformer, TransformerConfig

    params = nnx.state(Transformer(TransformerConfig.tiny(scan_layers=True), rngs=nnx.Rngs(0)), nnx.Param)
    mask = optim.weight_decay_mask(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    decay = dict((optim.path_name(p), v) for p, v in jax.tree_util.tree_leaves_with_path(mask))
    stacked_norms = [optim.path_name(p) for p, x in leaves if "norm" in optim.path_name(p) and x.ndim == 2]
    assert stacked_norms and not any(decay[k] for k in stacked_norms)
    assert decay["groups/0/attention/qkv/value"]


def test_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig.from_dict({"steps": 100, "workdir": "x", "optim": {"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1}}).optim
    schedule = optim.learning_rate_schedule(cfg, 100)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.1) and float(schedule(5)) == pytest.approx(0.5)


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    cfg = demo_config(tmp_path, data={"seq_len": 32, "batch_size": 8}, mesh={"data": 8},
                      model={"dtype": "bfloat16", "param_dtype": "float32"})
    run = setup_run(cfg)
    fn = step_lib.jit_train_step(step_lib.make_train_step(run.graphdef, run.tx, run.schedule), run.state)
    before = jax.device_get(run.state["params"])
    batch = np.random.default_rng(0).integers(0, 256, (8, 33), dtype=np.int32)
    with jax.set_mesh(run.mesh):
        state, metrics = fn(run.state, jax.device_put(batch, run.batch_sharding))
        state, metrics = fn(state, jax.device_put(batch, run.batch_sharding))
    after = jax.device_get(state["params"])
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(after))
    assert np.isfinite(float(metrics["loss"]))
    # Every parameter moved (step 0 has lr 0 in warm-up; step 1 has lr / warmup_steps = 1e-4).
    changes = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
    assert all(c > 0 for c in changes)


def test_gradient_accumulation_gives_the_full_batch_update(tmp_path):
    results = []
    for accum in (1, 4):
        cfg = demo_config(tmp_path, data={"seq_len": 32, "batch_size": 32}, optim={"grad_accum_steps": accum},
                          mesh={"data": 8})
        run = setup_run(cfg)
        batch = np.random.default_rng(0).integers(0, 256, (32, 33), dtype=np.int32)
        fn = step_lib.jit_train_step(step_lib.make_train_step(run.graphdef, run.tx, run.schedule, accum), run.state)
        with jax.set_mesh(run.mesh):
            tokens = jax.device_put(batch, run.batch_sharding)
            state, metrics = fn(run.state, tokens)
        results.append((jax.device_get(state["params"]), float(metrics["loss"])))
    (p1, l1), (p4, l4) = results
    assert l1 == pytest.approx(l4, rel=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Runs


def test_demo_config_trains_and_loss_falls(tmp_path):
    cfg = demo_config(
        tmp_path,
        steps=40,
        data={"seq_len": 128},
        checkpoint={"enabled": False},
        eval={"every_steps": 0, "max_tokens": 8192},
        log={"every_steps": 5, "progress_bar": False},
    )
    result = train_and_evaluate(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(5, 41, 5))
    for key in ("loss", "lr", "grad_norm", "tokens_per_sec", "tokens_per_sec_per_device", "mfu", "peak_memory_gib"):
        assert key in train_rows[0]
    first, last = train_rows[0]["loss"], train_rows[-1]["loss"]
    # Uniform over 257 bytes is 5.55 nats; 40 steps take a tiny model to ~3 (unigram ~3.3).
    assert last < first - 1.0 and last < 3.6, (first, last)
    eval_rows = [r for r in rows if "eval_loss" in r]
    assert len(eval_rows) == 1 and eval_rows[0]["eval_loss"] < math.log(257) - 1.5
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]))


def test_pmap_eval_equals_jit_eval(tmp_path):
    cfg = demo_config(tmp_path, data={"seq_len": 64}, eval={"max_tokens": 3000, "batch_size": 16}, mesh={"data": 8})
    run = setup_run(cfg)
    state = run.state
    jitted = Evaluator(run, pmap=False)(state)
    pmapped = Evaluator(run, pmap=True)(state)
    assert jitted["eval_tokens"] == pmapped["eval_tokens"] == 3000
    assert pmapped["eval_loss"] == pytest.approx(jitted["eval_loss"], rel=1e-6, abs=0)
    assert 4.0 < jitted["eval_loss"] < 7.0  # an untrained model: near log(257)


# ----------------------------------------------------------------------------------------------
# CLI errors


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.optim.lr=-1", "config.optim.lr"),
        ("--config.optim.lrr=1", "config.optim.lrr"),
        ("--config.model.num_heads=5", "config.model.num_heads"),
        ("--config.data.corpus=/no/such/corpus", "/no/such/corpus"),
        ("--config.data.batch_size=12", "config.data.batch_size"),  # not a multiple of 8 devices
        ("--config.mesh.tensor=3", "config.mesh"),
    ],
)
def test_bad_config_exits_2_with_one_line(tmp_path, override, expected):
    proc = subprocess.run(
        [sys.executable, "train/main.py", "--config", DEMO, f"--config.workdir={tmp_path}", override],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-2000:]


def test_write_token_split_round_trips_documents(tmp_path):
    tok = data.ByteTokenizer()
    docs = ["first document", "second, longer document", "third"]
    count = data.write_token_split(iter(docs), tok, str(tmp_path), "validation")
    assert count == sum(len(d) + 1 for d in docs)
    stream = np.fromfile(tmp_path / "validation.bin", dtype=np.uint16)
    pieces = np.split(stream, np.where(stream == tok.eos_id)[0] + 1)[:-1]
    assert [tok.decode(p) for p in pieces] == docs
    assert json.loads((tmp_path / "meta.json").read_text())["vocab_size"] == 257


def test_throughput_benchmark_runs_tiny(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/train_throughput.py", "--tiny", "--contexts", "128", "--steps", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OUT": str(tmp_path), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("| transformer |")
    result = json.loads((tmp_path / "train_throughput.json").read_text())
    rows = result["rows"]
    assert {(r["model"], r["context"]) for r in rows} == {("tnl", 128), ("transformer", 128)}
    assert all(r["status"] == "ok" and r["tokens_per_sec_per_device"] > 0 for r in rows)
    # Same tokens per step at every context.
    assert {r["tokens_per_step"] for r in rows} == {1024}


def test_peak_memory_is_the_max_over_devices_in_gib():
    class Device:
        def __init__(self, stats):
            self.stats = stats

        def memory_stats(self):
            return self.stats

    gib = 2**30
    assert metrics_lib.peak_memory_gib([Device({"peak_bytes_in_use": 3 * gib}), Device({"peak_bytes_in_use": gib // 2})]) == 3.0
    assert metrics_lib.peak_memory_gib([Device(None), Device({})]) is None  # CPU: no stats
    assert metrics_lib.peak_memory_gib() is None or metrics_lib.peak_memory_gib() > 0
