"""When things go wrong: damaged checkpoints are named, set aside and skipped; Ctrl-C saves (twice:
stops at once); a failed save stops the run with one line and its leftovers go at the next start; an
unwritable workdir is one line before any compile; traced bad rates and float16 overflow are caught
by the op's checked mode; the small API cases name their argument; the demo evaluates its whole
held-out split; an unsplittable vocab is said once at start (docs/training.md, "When things go
wrong")."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from test_train import DEMO, ROOT, demo_config

import lightning_jax as lj
from lightning_jax.training import checkpoint as ckpt
from lightning_jax.training import data as data_lib
from lightning_jax.training import evaluation
from lightning_jax.training import loop as loop_lib
from lightning_jax.training.config import ConfigError, EvalConfig
from lightning_jax.training.loop import train_and_evaluate
from lightning_jax.training.run import setup_run

# In-process runs: the 8 CPU devices of conftest.py, a one-layer demo model, 8 rows of 32 tokens.
TINY = {
    "model": {"num_layers": 1}, "data": {"seq_len": 32, "batch_size": 8},
    "checkpoint": {"every_steps": 2, "keep": 3}, "eval": {"every_steps": 0, "max_tokens": 256},
    "log": {"every_steps": 1, "progress_bar": False},
}
# Subprocess runs: one CPU device each.
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}


def tiny(workdir, steps, **sections):
    return demo_config(workdir, steps=steps, **{**TINY, **sections})


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def cli(workdir, *overrides):
    return [
        sys.executable, "train/main.py", "--config", DEMO, f"--config.workdir={workdir}",
        "--config.model.num_layers=1", "--config.data.seq_len=32", "--config.data.batch_size=2",
        "--config.eval.every_steps=0", "--config.eval.max_tokens=256", "--config.log.progress_bar=False",
        "--config.log.every_steps=1", "--config.checkpoint.every_steps=100", *overrides,
    ]


def warnings(caplog, text):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def committed(workdir):
    d = ckpt.checkpoint_dir(workdir)
    return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def wait_for(predicate, proc, timeout=180, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {what}"
        time.sleep(0.02)
    raise TimeoutError(what)


def last_step(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return max([json.loads(line)["step"] for line in f if line.endswith("\n")] or [0])


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 8-step run with checkpoints 4, 6, 8 and its losses (the uninterrupted reference)."""
    workdir = tmp_path_factory.mktemp("trained")
    train_and_evaluate(tiny(workdir, 8))
    assert committed(workdir) == [4, 6, 8]
    return str(workdir), losses(workdir)


def _largest_array_file(step_dir):
    d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
    return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _delete_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def _garble(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).integers(0, 256, os.path.getsize(path), np.uint8).tobytes())


@pytest.fixture(scope="module")
def target(trained):
    """A fresh train state of the same config: the restore target (its arrays' shardings)."""
    return setup_run(tiny(trained[0], 8)).state


def _damaged_copy(trained, tmp_path, damage=_truncate):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained[0], workdir)
    damage(os.path.join(ckpt.checkpoint_dir(workdir), "8"))
    return workdir


@pytest.mark.parametrize("damage, said", [
    (_truncate, "OUT_OF_RANGE"),                     # a data file cut to half
    (_delete_metadata, "state/_METADATA is missing"),
    (_garble, "cannot read"),                        # an array file overwritten with noise
])
def test_damaged_newest_checkpoint_is_named_and_skipped(trained, target, tmp_path, caplog, damage, said):
    workdir = _damaged_copy(trained, tmp_path, damage)
    config = tiny(workdir, 8).checkpoint

    # As --mode=eval restores: one line, the newest intact checkpoint, nothing moved.
    manager = ckpt.make_manager(workdir, config, read_only=True)
    with caplog.at_level(logging.WARNING):
        state, meta = ckpt.restore_newest_intact(manager, workdir, target)
    manager.close()
    lines = warnings(caplog, "damaged")
    assert len(lines) == 1 and lines[0].startswith("checkpoint 8 is damaged (") and said in lines[0], lines
    assert lines[0].endswith("using checkpoint 6")
    assert int(state["step"]) == meta["step"] == 6 and committed(workdir) == [4, 6, 8]
    caplog.clear()

    # As training restores: the same line says where the checkpoint went.
    manager = ckpt.make_manager(workdir, config)
    with caplog.at_level(logging.WARNING):
        state, _ = ckpt.restore_newest_intact(manager, workdir, target, move_damaged=True)
    lines = warnings(caplog, "damaged")
    moved = os.path.join(workdir, ckpt.DAMAGED_DIR, "8")
    assert len(lines) == 1 and said in lines[0] and f"moved to {moved}; resuming from checkpoint 6" in lines[0], lines
    assert int(state["step"]) == 6 and os.path.isdir(moved) and committed(workdir) == [4, 6]
    assert manager.all_steps() == [4, 6]
    manager.close()


def test_training_resumes_from_the_newest_intact_checkpoint_with_the_same_losses(trained, tmp_path, caplog):
    workdir = _damaged_copy(trained, tmp_path)
    with caplog.at_level(logging.WARNING):
        result = train_and_evaluate(tiny(workdir, 8))
    assert len(warnings(caplog, "checkpoint 8 is damaged")) == 1
    assert result["step"] == 8 and committed(workdir) == [4, 6, 8]
    assert os.path.isdir(os.path.join(workdir, ckpt.DAMAGED_DIR, "8"))
    assert losses(workdir) == trained[1]  # steps 7 and 8 recomputed from checkpoint 6, bit for bit


def test_damaged_checkpoint_from_the_cli_is_one_line(trained, tmp_path):
    workdir = _damaged_copy(trained, tmp_path)
    done = subprocess.run(cli(workdir, "--config.steps=8", "--mode=eval"), check=False, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint 8 is damaged (cannot read " in lines[0], done.stderr[-3000:]
    assert "step=6" in done.stdout


def test_a_checkpoint_of_another_model_is_a_config_error_not_damage(trained, tmp_path):
    source, _ = trained
    workdir = str(tmp_path / "run")
    shutil.copytree(source, workdir)
    with pytest.raises(ConfigError, match=r"^config\.workdir: checkpoint 8 in .* does not fit this config's model"):
        train_and_evaluate(tiny(workdir, 10, model={"num_layers": 1, "glu_dim": 64}))
    assert committed(workdir) == [4, 6, 8] and not os.path.exists(os.path.join(workdir, ckpt.DAMAGED_DIR))


# ----------------------------------------------------------------------------------------------
# Failed saves, leftovers, unwritable workdir


def test_failed_async_save_stops_the_run_and_its_leftovers_go_at_the_next_start(tmp_path, monkeypatch, caplog):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

    original, calls = json_handler.JsonCheckpointHandler._save_fn, []

    async def disk_full_from_the_second_save(self, item, directory):
        calls.append(directory)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / self._filename))
        return await original(self, item, directory)

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", disk_full_from_the_second_save)
    workdir = str(tmp_path)
    every = {"every_steps": 5, "keep": 3}
    with pytest.raises(ckpt.CheckpointSaveError) as info:
        train_and_evaluate(tiny(workdir, 40, checkpoint=every))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("checkpoint 10 could not be written (") and "No space left on device" in message
    # Reported as soon as the background write failed, before the next save (step 15).
    stopped = int(message.split("training stopped after step ")[1].split(";")[0])
    assert 10 <= stopped < 15 and last_step(workdir) <= stopped
    assert "checkpoint 5 is the newest complete one" in message
    leftovers = [n for n in os.listdir(ckpt.checkpoint_dir(workdir)) if ckpt.TMP_MARKER in n]
    assert leftovers and committed(workdir) == [5]

    monkeypatch.setattr(json_handler.JsonCheckpointHandler, "_save_fn", original)
    with caplog.at_level(logging.WARNING):
        result = train_and_evaluate(tiny(workdir, 10, checkpoint=every))
    lines = warnings(caplog, "unfinished checkpoint")
    assert len(lines) == 1 and lines[0].startswith("removed 1 unfinished checkpoint(s) left by an earlier run")
    assert leftovers[0] in lines[0]
    assert result["step"] == 10 and committed(workdir) == [5, 10]
    assert not [n for n in os.listdir(ckpt.checkpoint_dir(workdir)) if ckpt.TMP_MARKER in n]


DISK_FULL_CLI = """
import errno, runpy, sys
from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler

original, calls = json_handler.JsonCheckpointHandler._save_fn, []

async def disk_full_from_the_second_save(self, item, directory):
    calls.append(directory)
    if len(calls) >= 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(directory / self._filename))
    return await original(self, item, directory)

json_handler.JsonCheckpointHandler._save_fn = disk_full_from_the_second_save
sys.argv = ["train/main.py", *sys.argv[1:]]
runpy.run_path("train/main.py", run_name="__main__")
"""


def test_failed_save_from_the_cli_is_one_error_line_and_status_1(tmp_path):
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_CLI)
    workdir = str(tmp_path / "run")
    command = [sys.executable, str(script), *cli(workdir, "--config.steps=100", "--config.checkpoint.every_steps=10")[2:]]
    done = subprocess.run(command, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: checkpoint 20 could not be written (OSError: [Errno 28]")
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 5, done.stderr[-3000:]


def test_unwritable_workdir_is_one_line_before_any_compile(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(loop_lib, "setup_run", lambda *a, **k: pytest.fail("set-up ran before the workdir check"))
    with pytest.raises(ConfigError, match=r"^config\.workdir: got '.*a_file/run', expected a directory this process can"):
        train_and_evaluate(tiny(str(blocker / "run"), 4))

    started = time.perf_counter()
    done = subprocess.run(cli("/proc/lightning_jax_unwritable", "--config.steps=4"), check=False, cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("error: config.workdir: got '/proc/lightning_jax_unwritable', expected a directory")
    assert time.perf_counter() - started < 60


# ----------------------------------------------------------------------------------------------
# Ctrl-C


def test_ctrl_c_saves_the_step_and_exits_130(tmp_path):
    workdir = str(tmp_path)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cli(workdir, "--config.steps=100000"), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                stderr=err, text=True)
        try:
            wait_for(lambda: last_step(workdir) >= 3, proc, what="step 3")
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == 130, stderr[-3000:]
    stopped = last_step(workdir)
    assert "preempted=True" in out and committed(workdir) == [stopped]
    assert f"stopped by SIGINT after step {stopped}; checkpoint {stopped} saved" in stderr
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr and len(stderr.splitlines()) == 2


def _two_ctrl_c(workdir, err_path):
    """Runs training, sends Ctrl-C once a step is logged and again once the first is acknowledged:
    -> (return code, stdout, stderr)."""
    # Every step evaluates the whole held-out split (seconds here): the second Ctrl-C lands inside it.
    overrides = ("--config.steps=100000", "--config.eval.every_steps=1", "--config.eval.max_tokens=-1",
                 "--config.eval.batch_size=1")
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cli(workdir, *overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=err,
                                text=True)
        try:
            wait_for(lambda: last_step(workdir) >= 1, proc, what="step 1")
            proc.send_signal(signal.SIGINT)
            wait_for(lambda: "SIGINT: finishing this step" in err_path.read_text(), proc, what="the first Ctrl-C")
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=60)
        finally:
            proc.kill()
    return proc.returncode, out, err_path.read_text()


def test_second_ctrl_c_stops_at_once_unsaved(tmp_path):
    # The first Ctrl-C can land between two steps, where finishing is only the save: the run may
    # then be done before the second arrives. That attempt proves nothing; try again (a new run).
    for attempt in range(3):
        workdir = str(tmp_path / f"run{attempt}")
        rc, out, stderr = _two_ctrl_c(workdir, tmp_path / f"stderr{attempt}.txt")
        if "stopped at once without saving" in stderr or "checkpoint" not in stderr:
            break
    assert rc == 130, stderr[-3000:]
    assert "stopped at once without saving" in stderr and "preempted" not in out, (out, stderr[-3000:])
    assert "Traceback" not in stderr and "Fatal Python error" not in stderr
    assert committed(workdir) == []


def test_stop_signal_first_flags_then_interrupts():
    before = signal.getsignal(signal.SIGINT)
    with loop_lib._StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


# ----------------------------------------------------------------------------------------------
# The op's checked mode


def _qkv(shape=(1, 64, 2, 8), dtype=jnp.float32):
    return [jax.random.normal(k, shape, dtype) for k in jax.random.split(jax.random.key(0), 3)]


def _checked(**kwargs):
    return checkify.checkify(jax.jit(
        lambda q, k, v, r: lj.lightning_attention(q, k, v, r, checked=True, implementation="xla", **kwargs)))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_checked_mode_reports_traced_bad_rates_under_jit(bad):
    q, k, v = _qkv()
    rates = jnp.array([bad, 0.5])
    # Unchecked, traced rates are trusted: no error, whatever comes out.
    jax.jit(lambda q, k, v, r: lj.lightning_attention(q, k, v, r, implementation="xla"))(q, k, v, rates)
    err, _ = _checked()(q, k, v, rates)
    with pytest.raises(Exception, match=r"^rates: got \[.*\], expected finite values >= 0"):
        err.throw()
    err, _ = _checked()(q, k, v, jnp.array([0.1, 0.5]))
    assert err.get() is None


def test_checked_mode_reports_float16_overflow_and_non_finite_inputs():
    ones = jnp.ones((1, 4096, 1, 32), jnp.float16)  # same-sign inputs, no decay: o_t = 32 (t + 1) > 65504
    err, _ = _checked()(ones, ones, ones, jnp.array([0.0]))
    with pytest.raises(Exception, match=r"^lightning_attention output o: \d+ of 131072 values are inf or NaN \(float16"):
        err.throw()
    q, k, v = _qkv()
    err, _ = _checked(return_final_state=True)(q.at[0, 3, 0, 0].set(jnp.nan), k, v, jnp.array([0.1, 0.5]))
    with pytest.raises(Exception, match=r"^q: got 1 inf or NaN values of 1024, expected finite values"):
        err.throw()
    # Eager calls raise at once; `checked` itself is checked.
    with pytest.raises(Exception, match="lightning_attention output o"):
        lj.lightning_attention(ones, ones, ones, jnp.array([0.0]), checked=True, implementation="xla")
    with pytest.raises(TypeError, match=r"^checked: got 'yes', expected True or False"):
        lj.lightning_attention(q, k, v, jnp.array([0.1, 0.5]), checked="yes")


# ----------------------------------------------------------------------------------------------
# Small API cases


def test_small_api_cases_name_their_argument():
    """Regression guard: these already named their argument when issue 18 was worked on."""
    q, k, v = _qkv((1, 4, 2, 8))
    with pytest.raises(TypeError, match=r"^return_final_state: got 'yes', expected True or False"):
        lj.lightning_attention(q, k, v, jnp.array([0.1, 0.5]), return_final_state="yes")
    with pytest.raises(ValueError, match=r"^state: got shape \(1, 2, 8, 4\) dtype float32, expected shape \(1, 2, 8, 8\)"):
        lj.decode_step(q[:, 0], k[:, 0], v[:, 0], jnp.array([0.1, 0.5]), jnp.zeros((1, 2, 8, 4)))
    from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig

    for model in (TNL(TNLConfig.tiny(), rngs=nnx.Rngs(0)), Transformer(TransformerConfig.tiny(), rngs=nnx.Rngs(0))):
        for empty in (jnp.zeros((1, 0), jnp.int32), jnp.zeros((0, 4), jnp.int32)):
            with pytest.raises(ValueError, match=r"^tokens: got shape"):
                model(empty)


# ----------------------------------------------------------------------------------------------
# Evaluation default, unsplit vocab


def test_default_eval_reads_the_whole_small_split_and_caps_a_large_one(tmp_path, caplog):
    assert EvalConfig().max_tokens == 0 and demo_config(tmp_path).eval.max_tokens == 0
    _, weights = evaluation.eval_rows(demo_config(tmp_path), data_lib.ByteTokenizer())
    whole = data_lib.validation_rows("shakespeare", data_lib.ByteTokenizer(), seq_len=256)[1]
    assert weights.sum() == whole.sum() > 200_000  # both plays, every byte

    corpus = tmp_path / "big"
    tok = data_lib.ByteTokenizer()
    for split in ("train", "validation"):
        data_lib.write_token_split(["x" * (evaluation.AUTO_MAX_TOKENS + 5000)], tok, str(corpus), split)
    cfg = demo_config(tmp_path, data={"corpus": str(corpus), "seq_len": 256})
    with caplog.at_level(logging.WARNING):
        _, weights = evaluation.eval_rows(cfg, tok)
    assert weights.sum() == evaluation.AUTO_MAX_TOKENS
    assert len(warnings(caplog, "held-out split is larger than")) == 1
    _, weights = evaluation.eval_rows(demo_config(tmp_path, data={"corpus": str(corpus)}, eval={"max_tokens": -1}), tok)
    assert weights.sum() == evaluation.AUTO_MAX_TOKENS + 5000


def test_unsplit_vocab_is_said_once_at_start(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        run = setup_run(demo_config(tmp_path, mesh={"data": 4, "fsdp": 1, "tensor": 2}, model={"num_layers": 1}))
    lines = warnings(caplog, "replicated")
    expected = ("the vocab axis (size 257) of embed is replicated, not split over mesh.tensor=2: 257 is not "
                "a multiple of 2; use config.model.vocab_size=258 to shard it")
    assert lines == [expected]
    assert tuple(run.state["params"]["embed"].sharding.spec) in ((), (None, None))
