"""`train_and_evaluate(config, workdir)`: the training loop, `load_model` and `saved_config`.

A run: check that the workdir is writable, build the mesh and the sharded model (`run.setup_run`),
restore the newest intact checkpoint if there is one (model, optimizer, step, RNG and data
position; damaged ones are named and moved to `workdir/damaged_checkpoints/`), then step; log,
evaluate (`evaluation.Evaluator`) and checkpoint on their intervals; save at the end. On SIGTERM or
Ctrl-C (SIGINT; or a JAX preemption notice in multi-process runs) the current step is saved and the
function returns cleanly (a second Ctrl-C raises KeyboardInterrupt at once). A checkpoint that
cannot be written stops the run with `checkpoint.CheckpointSaveError`.

Multi-process: call `jax.distributed.initialize()` first (the CLI does). Every process runs the same
code and feeds its own slice of each batch; only process 0 writes metrics and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
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
from lightning_jax.training.run import (
    Run,
    as_config,
    check_workdir,
    global_batch,
    restore_run,
    setup_run,
)

log = logging.getLogger(__name__)


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
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks between steps (then it saves
    and returns). A second Ctrl-C raises KeyboardInterrupt at once: nothing more is saved.

    Only in the main thread of a single-process run: with jax.distributed, JAX's own preemption
    notifier handles SIGTERM and `CheckpointManager.reached_preemption` reports it on all processes
    at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.name: str | None = None  # "SIGTERM" or "SIGINT" once requested
        self._previous: dict = {}

    def __enter__(self):
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, unsaved
        if not self.requested:
            self.requested, self.name = True, signal.Signals(signum).name
            again = " (Ctrl-C again stops at once, unsaved)" if signum == signal.SIGINT else ""
            log.warning(f"{self.name}: finishing this step, saving it and stopping{again}")

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


@contextlib.contextmanager
def _close_on_error(manager):
    """On an error other than KeyboardInterrupt, closes `manager` (finishing a save in flight, so
    no Orbax thread outlives the run); a KeyboardInterrupt (second Ctrl-C) waits for nothing."""
    try:
        yield
    except Exception:
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        raise


def _check_processes(step: int, meta: dict) -> None:
    """The data iterator resumes only with the process count the checkpoint was written by."""
    if meta.get("process_count", 1) != jax.process_count():
        raise ConfigError(
            "config.workdir",
            f"checkpoint {step} was written by {meta['process_count']} processes; "
            f"the data iterator resumes only with the same number (got {jax.process_count()})",
        )


# ----------------------------------------------------------------------------------------------
# Training


def train_and_evaluate(config, workdir: str | None = None, *, tokenizer=None) -> dict[str, Any]:
    """Trains for `config.steps` steps (resuming from `workdir/checkpoints` if there are any).

    Args:
      config: a TrainConfig, or a mapping / ml_collections ConfigDict of the same fields.
      workdir: overrides config.workdir.
      tokenizer: a `data.Tokenizer` to use instead of config.data.tokenizer.

    Returns the last logged metrics plus `step`, `preempted` (stopped early after saving),
    `stop_signal` ("SIGTERM", "SIGINT" or None) and `last_checkpoint`. Raises ConfigError for an
    unwritable workdir (before anything compiles) and `checkpoint.CheckpointSaveError` when a
    checkpoint cannot be written.
    """
    config = as_config(config, workdir)
    check_workdir(config.workdir)  # before anything compiles
    run = setup_run(config, tokenizer)
    cfg = run.config
    is_main = jax.process_index() == 0

    local_batch = cfg.data.batch_size // jax.process_count()
    dataset = data_lib.train_dataset(
        cfg.data.corpus, run.tokenizer, seq_len=cfg.data.seq_len, local_batch_size=local_batch,
        seed=cfg.seed, process_index=jax.process_index(), process_count=jax.process_count(),
        document_ids=cfg.data.document_mask,
    )
    data_iterator = iter(dataset)

    if cfg.checkpoint.enabled:
        ckpt.remove_unfinished(cfg.workdir)
    manager = ckpt.make_manager(cfg.workdir, cfg.checkpoint) if cfg.checkpoint.enabled else None
    state = run.state
    start_step = 0
    had_checkpoints = manager is not None and manager.latest_step() is not None
    if had_checkpoints:
        # Damaged checkpoints are named, moved to workdir/damaged_checkpoints/ and skipped.
        restored = ckpt.restore_newest_intact(manager, cfg.workdir, state, data_iterator, move_damaged=True,
                                              check_meta=_check_processes)
        if restored is not None:
            state = restored[0]
            start_step = int(state["step"])
    saves = ckpt.SaveWatch(manager, cfg.workdir, committed=start_step or None) if manager is not None else None
    # Failed asynchronous saves are seen after each step here; with several processes at the next save.
    watch_every_step = jax.process_count() == 1
    run.state = None  # the loop owns the state from here (it is donated each step)

    writer = metrics_lib.MetricsWriter(cfg.workdir, tensorboard=cfg.log.tensorboard)
    if had_checkpoints:  # also when every checkpoint was damaged: the run starts over from 0
        writer.truncate_after(start_step)
    evaluator = Evaluator(run)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.graphdef, run.tx, run.schedule, cfg.optim.grad_accum_steps,
                                 loss_block_tokens=cfg.optim.loss_block_tokens,
                                 time_chunk_tokens=cfg.optim.time_chunk_tokens),
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
    with _StopSignal() as stop, progress, ckpt.one_line_orbax_errors(), _close_on_error(manager):
        while step < cfg.steps:
            local = next(data_iterator)
            with jax.set_mesh(run.mesh):
                batch = {k: global_batch(run, v, cfg.data.batch_size) for k, v in local.items()}
                state, step_metrics = train_step(state, batch["tokens"], batch.get("segment_ids"))
            step += 1
            interval_steps += 1
            progress.update(1)
            if saves is not None and watch_every_step:
                saves.check(step)  # CheckpointSaveError as soon as a save in flight has failed

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
                    "peak_memory_gib": metrics_lib.peak_memory_gib(),
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
                if saves.save(step, state, _IteratorSnapshot(data_iterator), _meta(run, step),
                              every_steps=cfg.checkpoint.every_steps, force=force):
                    last_saved = step
                excluded += time.perf_counter() - t0
            if stop_now:
                preempted = True
                break

        if saves is not None:
            saves.check(step, blocking=True)  # the last save, written
            manager.close()
    writer.close()
    if preempted and is_main:
        saved = f"checkpoint {last_saved} saved" if last_saved == step else "checkpointing is off, nothing saved"
        log.warning(f"stopped by {stop.name or 'a preemption notice'} after step {step}; {saved}; "
                    "run the same command to resume")
    return {**last_row, "step": step, "preempted": preempted, "stop_signal": stop.name,
            "last_checkpoint": last_saved}


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


def saved_config(workdir: str, *, step: int | None = None) -> TrainConfig:
    """The TrainConfig a run saved with checkpoint `step` of `workdir` (default: the newest whose
    record reads back), its `workdir` field set to `workdir`. Every checkpoint's `meta` item holds
    the run's configuration, so `load_model(saved_config(workdir))` needs no config file.

    DataError naming config.workdir when there is no checkpoint (or none with a readable config)."""
    directory = ckpt.checkpoint_dir(workdir)
    steps = sorted((int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else []) if n.isdigit()),
                   reverse=True)
    if step is not None:
        steps = [s for s in steps if s == step]
    for candidate in steps:
        try:
            with open(os.path.join(directory, str(candidate), "meta", "metadata"), encoding="utf-8") as f:
                saved = json.load(f)["config"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged checkpoint: try the one before (restoring skips it too)
        return as_config(saved, workdir)
    which = "no checkpoint" if step is None else f"no checkpoint {step}"
    raise data_lib.DataError(f"config.workdir: {which} with a readable saved config in {directory}")


def load_model(config, workdir: str | None = None, *, step: int | None = None, tokenizer=None) -> nnx.Module:
    """The model of checkpoint `step` (default: newest) of `workdir` as an nnx module, its parameters
    sharded on this config's mesh (e.g. for `lightning_jax.generate`). Restores the whole train state
    (Orbax restores by structure) and keeps the model part."""
    run, state = restore_run(as_config(config, workdir), tokenizer, step)
    return nnx.merge(run.graphdef, state["params"], state["rest"])
