"""`train_and_evaluate(config, workdir)`: the training loop, and `load_model`.

A run: build the mesh and the sharded model (`run.setup_run`), restore the latest checkpoint if
there is one (model, optimizer, step, RNG and data position), then step; log, evaluate
(`evaluation.Evaluator`) and checkpoint on their intervals; save at the end. On SIGTERM (or a JAX
preemption notice in multi-process runs) the current step is saved and the function returns cleanly.

Multi-process: call `jax.distributed.initialize()` first (the CLI does). Every process runs the same
code and feeds its own slice of each batch; only process 0 writes metrics and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import sys
import threading
import time
from typing import Any

import jax
from flax import nnx

from lightning_jax.training import checkpoint as ckpt
from lightning_jax.training import data as data_lib
from lightning_jax.training import metrics as metrics_lib
from lightning_jax.training import step as step_lib
from lightning_jax.training.config import ConfigError, TrainConfig
from lightning_jax.training.evaluation import Evaluator
from lightning_jax.training.run import Run, as_config, global_batch, restore_run, setup_run


# ----------------------------------------------------------------------------------------------
# Checkpoint contents besides the train state


def _meta(run: Run, step: int) -> dict:
    return {
        "step": step,
        "process_count": jax.process_count(),
        "config": run.config.to_dict(),
        "model_config": dataclasses.asdict(run.model_config),
    }


class _IteratorSnapshot:
    """The data position at save time. Orbax may write the checkpoint after training has moved on;
    saving a copy of the state taken now keeps the data position and the model state in step."""

    def __init__(self, iterator):
        # grain's checkpoint handler writes `get_state().decode()` for iterators that are not its
        # own DatasetIterator type: hand it the JSON bytes, taken now.
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


# ----------------------------------------------------------------------------------------------
# Preemption


class _StopSignal:
    """Turns SIGTERM into a flag the loop checks between steps (then it saves and returns).

    Only in the main thread of a single-process run: with jax.distributed, JAX's own preemption
    notifier handles SIGTERM and `CheckpointManager.reached_preemption` reports it on all processes
    at the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------------------------
# Training


def train_and_evaluate(config, workdir: str | None = None, *, tokenizer=None) -> dict[str, Any]:
    """Trains for `config.steps` steps (resuming from `workdir/checkpoints` if there are any).

    Args:
      config: a TrainConfig, or a mapping / ml_collections ConfigDict of the same fields.
      workdir: overrides config.workdir.
      tokenizer: a `data.Tokenizer` to use instead of config.data.tokenizer.

    Returns the last logged metrics plus `step` and `preempted`.
    """
    config = as_config(config, workdir)
    run = setup_run(config, tokenizer)
    cfg = run.config
    is_main = jax.process_index() == 0

    local_batch = cfg.data.batch_size // jax.process_count()
    dataset = data_lib.train_dataset(
        cfg.data.corpus, run.tokenizer, seq_len=cfg.data.seq_len, local_batch_size=local_batch,
        seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
    )
    data_iterator = iter(dataset)

    manager = ckpt.make_manager(cfg.workdir, cfg.checkpoint) if cfg.checkpoint.enabled else None
    state = run.state
    start_step = 0
    if manager is not None and manager.latest_step() is not None:
        meta = manager.restore(manager.latest_step(), args=_meta_only())["meta"]
        if meta.get("process_count", 1) != jax.process_count():
            raise ConfigError(
                "config.workdir",
                f"{ckpt.checkpoint_dir(cfg.workdir)} was written by {meta['process_count']} processes; "
                f"the data iterator resumes only with the same number (got {jax.process_count()})",
            )
        state, _ = ckpt.restore(manager, state, data_iterator)
        start_step = int(state["step"])
    run.state = None  # the loop owns the state from here (it is donated each step)

    writer = metrics_lib.MetricsWriter(cfg.workdir, tensorboard=cfg.log.tensorboard)
    if start_step:
        writer.truncate_after(start_step)
    evaluator = Evaluator(run)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.graphdef, run.tx, run.schedule, cfg.optim.grad_accum_steps,
                                 loss_block_tokens=cfg.optim.loss_block_tokens),
        state,
    )

    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    flops_per_token = run.model_config.flops_per_token(cfg.data.seq_len)
    peak = metrics_lib.peak_flops_per_device(override_tflops=cfg.log.peak_tflops_per_device)
    progress = _progress_bar(cfg, start_step, enabled=is_main and cfg.log.progress_bar)

    last_row: dict[str, Any] = {}
    last_saved = start_step if start_step else None
    preempted = False
    step = start_step
    interval_start, interval_steps, excluded = time.perf_counter(), 0, 0.0
    with _StopSignal() as stop, progress:
        while step < cfg.steps:
            local = next(data_iterator)["tokens"]
            with jax.set_mesh(run.mesh):
                state, step_metrics = train_step(state, global_batch(run, local, cfg.data.batch_size))
            step += 1
            interval_steps += 1
            progress.update(1)

            if step % cfg.log.every_steps == 0 or step == cfg.steps:
                values = jax.device_get(step_metrics)  # waits for the step: the timing is honest
                elapsed = time.perf_counter() - interval_start - excluded
                tokens_per_sec = interval_steps * tokens_per_step / elapsed
                per_device = tokens_per_sec / jax.device_count()
                last_row = {
                    "step": step,
                    "loss": float(values["loss"]),
                    "lr": float(values["lr"]),
                    "grad_norm": float(values["grad_norm"]),
                    "tokens_per_sec": tokens_per_sec,
                    "tokens_per_sec_per_device": per_device,
                    "mfu": metrics_lib.mfu(flops_per_token, per_device, peak),
                }
                writer.write(last_row)
                progress.set_postfix(loss=f"{last_row['loss']:.4f}", refresh=False)
                interval_start, interval_steps, excluded = time.perf_counter(), 0, 0.0

            if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == cfg.steps:
                t0 = time.perf_counter()
                row = {"step": step, **evaluator(state)}
                writer.write(row)
                last_row = {**last_row, **row}
                excluded += time.perf_counter() - t0

            stop_now = stop.requested or (manager is not None and manager.reached_preemption(step))
            if manager is not None:
                t0 = time.perf_counter()
                force = stop_now or step == cfg.steps
                if ckpt.save(manager, step, state, _IteratorSnapshot(data_iterator), _meta(run, step),
                             every_steps=cfg.checkpoint.every_steps, force=force):
                    last_saved = step
                excluded += time.perf_counter() - t0
            if stop_now:
                preempted = True
                break

    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    writer.close()
    return {**last_row, "step": step, "preempted": preempted, "last_checkpoint": last_saved}


def _meta_only():
    import orbax.checkpoint as ocp

    return ocp.args.Composite(meta=ocp.args.JsonRestore())


def _progress_bar(cfg: TrainConfig, start_step: int, *, enabled: bool):
    if not enabled:
        return _NoProgress()
    from tqdm.auto import tqdm

    # Not a terminal (a batch job's log): a line every 30 s instead of a redraw per step.
    interactive = sys.stderr.isatty()
    return tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step",
                mininterval=0.1 if interactive else 30.0, dynamic_ncols=True)


class _NoProgress(contextlib.nullcontext):
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass


# ----------------------------------------------------------------------------------------------
# A trained model


def load_model(config, workdir: str | None = None, *, step: int | None = None, tokenizer=None) -> nnx.Module:
    """The model of checkpoint `step` (default: newest) of `workdir` as an nnx module, its parameters
    sharded on this config's mesh (e.g. for `lightning_jax.generate`). Restores the whole train state
    (Orbax restores by structure) and keeps the model part."""
    run, state = restore_run(as_config(config, workdir), tokenizer, step)
    return nnx.merge(run.graphdef, state["params"], state["rest"])
