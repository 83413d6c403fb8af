"""`train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`: the training run.

A run: build the mesh and the sharded model, restore the latest checkpoint if there is one (model,
optimizer, step, RNG and data position), then step; log, evaluate and checkpoint on their intervals;
save at the end. On SIGTERM (or a JAX preemption notice in multi-process runs) the current step is
saved and the function returns cleanly.

Multi-process: call `jax.distributed.initialize()` first (the CLI does). Every process runs the same
code and feeds its own slice of each batch; only process 0 writes metrics and shows progress.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lightning_jax.training import checkpoint as ckpt
from lightning_jax.training import data as data_lib
from lightning_jax.training import metrics as metrics_lib
from lightning_jax.training import optim, step as step_lib
from lightning_jax.training.config import ConfigError, ModelSpec, TrainConfig


# ----------------------------------------------------------------------------------------------
# Model from config


def build_model_config(spec: ModelSpec):
    """The frozen model config: `spec.preset` of TNLConfig / TransformerConfig with `spec.overrides`."""
    from lightning_jax import models

    cls = {"tnl": models.TNLConfig, "transformer": models.TransformerConfig}[spec.arch]
    preset = getattr(cls, spec.preset, None)
    presets = sorted(n for n, v in vars(cls).items() if isinstance(v, classmethod))
    if spec.preset not in presets:
        raise ConfigError(f"config.model.preset: got {spec.preset!r}, expected one of {presets} for {spec.arch}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in spec.overrides:
        if name not in fields:
            raise ConfigError(f"config.model.{name}: unknown field of {cls.__name__}, expected one of {sorted(fields)}")
    try:
        return preset(**spec.overrides)
    except (TypeError, ValueError) as e:
        # The model configs' messages start with the field name.
        raise ConfigError(f"config.model.{e}") from e


def model_class(arch: str):
    from lightning_jax import models

    name = {"tnl": "TNL", "transformer": "Transformer"}[arch]
    cls = getattr(models, name, None)
    if cls is None:
        raise ConfigError(f"config.model.arch: {arch!r} needs lightning_jax.models.{name}, which this version lacks")
    return cls


# ----------------------------------------------------------------------------------------------
# Set-up shared by training and evaluation


@dataclasses.dataclass
class _Run:
    config: TrainConfig
    workdir: str
    tokenizer: Any
    model_config: Any
    mesh: jax.sharding.Mesh
    batch_sharding: NamedSharding
    graphdef: Any
    state: dict
    tx: Any
    schedule: Any


def _as_config(config, workdir: str | None) -> TrainConfig:
    if not isinstance(config, TrainConfig):
        if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ConfigError(f"config: got {type(config).__name__}, expected TrainConfig or a mapping")
        config = dict(config)
        if workdir is not None:
            config["workdir"] = workdir
        config = TrainConfig.from_dict(config)
    elif workdir is not None:
        config = dataclasses.replace(config, workdir=workdir)
    return config


def _make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    from lightning_jax.models import make_mesh

    m = config.mesh
    try:
        return make_mesh(m.data, m.fsdp, m.tensor)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from e


def _check_batch(name: str, batch: int, mesh, divisor_note: str = "") -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    procs = jax.process_count()
    if batch % shards or batch % procs:
        raise ConfigError(
            f"config.{name}: got {batch}, expected a multiple of the batch shards (data x fsdp = {shards}) "
            f"and of the {procs} processes{divisor_note}"
        )


def _setup(config: TrainConfig, tokenizer=None) -> _Run:
    data_lib.check_corpus(config.data.corpus)
    tokenizer = tokenizer or data_lib.make_tokenizer(config.data.tokenizer)
    model_config = build_model_config(config.model)
    needed = data_lib.corpus_vocab_size(config.data.corpus, tokenizer)
    if model_config.vocab_size < needed:
        raise ConfigError(f"config.model.vocab_size: got {model_config.vocab_size}, expected >= {needed} (the tokenizer's)")
    mesh = _make_mesh(config)
    _check_batch("data.batch_size", config.data.batch_size // config.optim.grad_accum_steps, mesh,
                 " (per microbatch: data.batch_size / optim.grad_accum_steps)")
    if config.eval.batch_size:
        _check_batch("eval.batch_size", config.eval.batch_size, mesh)

    from lightning_jax.models import batch_sharding, create_sharded_model

    cls = model_class(config.model.arch)
    model = create_sharded_model(lambda: cls(model_config, rngs=nnx.Rngs(config.seed)), mesh)
    schedule = optim.learning_rate_schedule(config.optim, config.steps)
    tx = optim.make_optimizer(config.optim, config.steps)
    with jax.set_mesh(mesh):
        graphdef, state = step_lib.init_train_state(model, tx, config.seed)
    return _Run(config, config.workdir, tokenizer, model_config, mesh, batch_sharding(mesh), graphdef, state, tx, schedule)


def _global_batch(run: _Run, local: np.ndarray, global_rows: int) -> jax.Array:
    """This process's rows -> one global array sharded over the batch axes."""
    return jax.make_array_from_process_local_data(run.batch_sharding, local, (global_rows, *local.shape[1:]))


def _local_rows(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch that every process holds whole."""
    rows = x.shape[0] // jax.process_count()
    return x[jax.process_index() * rows : (jax.process_index() + 1) * rows]


def _meta(run: _Run, step: int) -> dict:
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
# Evaluation


class Evaluator:
    """Validation loss over the held-out rows: `evaluator(state) -> {"eval_loss", ...}`.

    Both paths compute sum(loss * weight) and sum(weight) per global batch and add the batches in
    float64 on the host: "jit" as one sharded program over the mesh (the same layout as training);
    "pmap" with `jax.pmap` over this process's devices and a psum over all devices.
    """

    def __init__(self, run: _Run, *, pmap: bool | None = None):
        self.run = run
        cfg = run.config
        self.pmap = cfg.eval.pmap if pmap is None else pmap
        self.batch_size = cfg.eval.batch_size or cfg.data.batch_size
        if self.pmap and self.batch_size % jax.device_count():
            raise ConfigError(
                f"config.eval.batch_size: got {self.batch_size}, expected a multiple of the "
                f"{jax.device_count()} devices for eval.pmap"
            )
        self.tokens, self.weights = data_lib.validation_rows(
            cfg.data.corpus, run.tokenizer, seq_len=cfg.data.seq_len, max_tokens=cfg.eval.max_tokens or None
        )
        self._jit = step_lib.make_eval_sums(run.graphdef)
        self._pmap = step_lib.make_pmap_eval_sums(run.graphdef) if self.pmap else None

    def __call__(self, state) -> dict[str, float]:
        total = count = 0.0
        if self.pmap:
            params, rest = self._local_replicas(state)
            devices = jax.local_device_count()
        for tokens, weights in data_lib.validation_batches(self.tokens, self.weights, self.batch_size):
            tokens, weights = _local_rows(tokens), _local_rows(weights)
            if self.pmap:
                s, n = self._pmap(
                    params, rest,
                    tokens.reshape(devices, -1, tokens.shape[-1]),
                    weights.reshape(devices, -1, weights.shape[-1]),
                )
                s, n = s[0], n[0]
            else:
                with jax.set_mesh(self.run.mesh):
                    s, n = self._jit(
                        state["params"], state["rest"],
                        _global_batch(self.run, tokens, self.batch_size),
                        _global_batch(self.run, weights, self.batch_size),
                    )
            total += float(s)
            count += float(n)
        loss = total / count
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}

    def _local_replicas(self, state):
        """Whole copies of params and rest on this process (pmap broadcasts them to its devices)."""
        replicated = NamedSharding(self.run.mesh, P())
        tree = (state["params"], state["rest"])
        with jax.set_mesh(self.run.mesh):
            tree = jax.jit(lambda t: t, out_shardings=replicated)(tree)
        return jax.tree.map(lambda x: x.addressable_data(0), tree)


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
    config = _as_config(config, workdir)
    run = _setup(config, tokenizer)
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
                f"config.workdir: {ckpt.checkpoint_dir(cfg.workdir)} was written by {meta['process_count']} "
                f"processes; the data iterator resumes only with the same number (got {jax.process_count()})"
            )
        state, _ = ckpt.restore(manager, state, data_iterator)
        start_step = int(state["step"])
    run.state = None  # the loop owns the state from here (it is donated each step)

    writer = metrics_lib.MetricsWriter(cfg.workdir, tensorboard=cfg.log.tensorboard)
    if start_step:
        writer.truncate_after(start_step)
    evaluator = Evaluator(run)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(run.graphdef, run.tx, run.schedule, cfg.optim.grad_accum_steps), state
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
                state, step_metrics = train_step(state, _global_batch(run, local, cfg.data.batch_size))
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
# Evaluation only


def _restore_run(config, tokenizer, step: int | None):
    """(run, restored train state) of checkpoint `step` (default: newest) of config.workdir."""
    missing = data_lib.DataError(f"config.workdir: no checkpoints in {ckpt.checkpoint_dir(config.workdir)}")
    if not os.path.isdir(ckpt.checkpoint_dir(config.workdir)):
        raise missing
    run = _setup(config, tokenizer)
    manager = ckpt.make_manager(config.workdir, config.checkpoint, read_only=True)
    try:
        restored = ckpt.restore(manager, run.state, step=step)
    finally:
        manager.close()
    if restored is None:
        raise missing
    return run, restored[0]


def evaluate(config, workdir: str | None = None, *, step: int | None = None, pmap: bool | None = None,
             tokenizer=None, write_metrics: bool = True) -> dict[str, Any]:
    """Restores checkpoint `step` (default: latest) of `workdir` onto this config's mesh and returns
    {"step", "eval_loss", "eval_perplexity", "eval_tokens"}; also appends the row to metrics.jsonl
    (marked "mode": "eval") unless `write_metrics` is False."""
    config = _as_config(config, workdir)
    run, state = _restore_run(config, tokenizer, step)
    run.state = None
    row = {"step": int(state["step"]), **Evaluator(run, pmap=pmap)(state)}
    if write_metrics:
        writer = metrics_lib.MetricsWriter(config.workdir)
        writer.write({**row, "mode": "eval"})
        writer.close()
    return row


def load_model(config, workdir: str | None = None, *, step: int | None = None, tokenizer=None) -> nnx.Module:
    """The model of checkpoint `step` (default: newest) of `workdir` as an nnx module, its parameters
    sharded on this config's mesh (e.g. for `lightning_jax.generate`). Restores the whole train state
    (Orbax restores by structure) and keeps the model part."""
    run, state = _restore_run(_as_config(config, workdir), tokenizer, step)
    return nnx.merge(run.graphdef, state["params"], state["rest"])
