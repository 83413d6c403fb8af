"""Run set-up shared by training, evaluation and `load_model`: the config, the mesh, the checks of
the batch sizes against it, the sharded model with its optimizer state (`setup_run`), and the same
restored from a checkpoint (`restore_run`). Also the helpers that turn host batches into global
arrays (`global_batch`, `local_rows`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from lightning_jax.checks import ArgumentError, fail
from lightning_jax.training import checkpoint as ckpt
from lightning_jax.training import data as data_lib
from lightning_jax.training import optim, step as step_lib
from lightning_jax.training.config import ConfigError, ModelSpec, TrainConfig, as_config_error

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """What a run is made of: its config, tokenizer, model config, mesh and the initial (or restored)
    train state (`graphdef` + `state`, see `step.init_train_state`), optimizer and LR schedule."""

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


def as_config(config, workdir: str | None = None) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping or an ml_collections ConfigDict; `workdir`, if
    given, replaces config.workdir."""
    if not isinstance(config, TrainConfig):
        if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ConfigError("config", f"got {type(config).__name__}, expected TrainConfig or a mapping")
        config = dict(config)
        if workdir is not None:
            config["workdir"] = workdir
        config = TrainConfig.from_dict(config)
    elif workdir is not None:
        config = dataclasses.replace(config, workdir=workdir)
    return config


def model_config(spec: ModelSpec):
    """The model config of `spec` (lightning_jax.models.registry), its errors under config.model."""
    from lightning_jax.models.registry import build_model_config

    try:
        return build_model_config(spec)
    except ArgumentError as e:
        raise as_config_error(e, "model") from e


def _make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
    from lightning_jax.models import make_mesh

    m = config.mesh
    try:
        return make_mesh(m.data, m.fsdp, m.tensor, m.context)
    except ValueError as e:
        raise as_config_error(e, "mesh") from e


def _check_batch(name: str, batch: int, mesh, divisor_note: str = "") -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    procs = jax.process_count()
    if batch % shards or batch % procs:
        fail(
            f"config.{name}", batch,
            f"a multiple of the batch shards (data x fsdp = {shards}) and of the {procs} processes{divisor_note}",
            kind=ConfigError,
        )


def _from_checkpoint(train_config: TrainConfig, function: str, /, *args, **kwargs):
    """`lightning_jax.models.hf_tnl.<function>(config.init_from, ...)`, its errors (a missing
    directory or tensor, a config.json field TNL cannot express) as ConfigError on config.init_from."""
    from lightning_jax.models import hf_tnl

    path = train_config.init_from
    try:
        return getattr(hf_tnl, function)(path, *args, **kwargs)
    except ArgumentError as e:
        raise ConfigError("config.init_from", f"{path}: {e}") from e


def _log_unsplit(model, mesh) -> None:
    """One log line per logical axis (vocab, heads, ...) that the sharding rules would split but that
    stays whole on every device because the mesh axes do not divide it (sharding.unsplit_axes)."""
    from lightning_jax.models.sharding import unsplit_axes

    seen: dict[tuple, list[str]] = {}
    for path, name, size, axes in unsplit_axes(model, mesh):
        seen.setdefault((name, size, axes), []).append(path)
    for (name, size, axes), paths in seen.items():
        ways = math.prod(mesh.shape[a] for a in axes)
        fields = " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        hint = f"config.model.vocab_size={-(-size // ways) * ways}" if name == "vocab" else f"a multiple of {ways}"
        log.warning(f"the {name} axis (size {size}) of {', '.join(paths)} is replicated, not split over {fields}: "
                    f"{size} is not a multiple of {ways}; use {hint} to shard it")


def setup_run(config: TrainConfig, tokenizer=None) -> Run:
    """Checks the corpus, the vocabulary and the batch sizes against the mesh (ConfigError /
    DataError before anything compiles), then builds the sharded model and a fresh train state."""
    data_lib.check_corpus(config.data.corpus)
    tokenizer = tokenizer or data_lib.make_tokenizer(config.data.tokenizer)
    model_cfg = model_config(config.model)
    if config.init_from:  # the checkpoint's architecture, the run's dtype / scan / remat choices
        model_cfg = _from_checkpoint(config, "hf_tnl_config", model_cfg)
    needed = data_lib.corpus_vocab_size(config.data.corpus, tokenizer)
    if model_cfg.vocab_size < needed:
        fail("config.model.vocab_size", model_cfg.vocab_size, f">= {needed} (the tokenizer's)", kind=ConfigError)
    mesh = _make_mesh(config)
    _check_batch("data.batch_size", config.data.batch_size // config.optim.grad_accum_steps, mesh,
                 " (per microbatch: data.batch_size / optim.grad_accum_steps)")
    if config.eval.batch_size:
        _check_batch("eval.batch_size", config.eval.batch_size, mesh)

    from lightning_jax.models import batch_sharding, create_sharded_model
    from lightning_jax.models.registry import model_class

    cls = model_class(config.model.arch)
    if config.init_from:  # the checkpoint's weights, each read straight into its sharding
        model = _from_checkpoint(config, "load_hf_tnl", mesh=mesh, config=model_cfg)
    else:
        model = create_sharded_model(lambda: cls(model_cfg, rngs=nnx.Rngs(config.seed)), mesh)
    _log_unsplit(model, mesh)
    schedule = optim.learning_rate_schedule(config.optim, config.steps)
    tx = optim.make_optimizer(config.optim, config.steps)
    with jax.set_mesh(mesh):
        graphdef, state = step_lib.init_train_state(model, tx, config.seed)
    return Run(config, config.workdir, tokenizer, model_cfg, mesh, batch_sharding(mesh), graphdef, state, tx, schedule)


def restore_run(config: TrainConfig, tokenizer=None, step: int | None = None) -> tuple[Run, dict]:
    """(run, restored train state) of checkpoint `step` (default: the newest intact one: damaged
    ones are named in one log line and skipped, left in place) of config.workdir, on this config's
    mesh. DataError when there is no (intact) checkpoint; ConfigError when `step` is damaged."""
    missing = data_lib.DataError(f"config.workdir: no checkpoints in {ckpt.checkpoint_dir(config.workdir)}")
    if not os.path.isdir(ckpt.checkpoint_dir(config.workdir)):
        raise missing
    run = setup_run(config, tokenizer)
    manager = ckpt.make_manager(config.workdir, config.checkpoint, read_only=True)
    try:
        if not manager.all_steps():
            raise missing
        if step is not None and step not in manager.all_steps():
            raise data_lib.DataError(f"config.workdir: no checkpoint {step} in {ckpt.checkpoint_dir(config.workdir)} "
                                     f"(there are {sorted(manager.all_steps())})")
        restored = ckpt.restore_newest_intact(manager, config.workdir, run.state, step=step)
    finally:
        manager.close()
    if restored is None:
        raise data_lib.DataError(f"config.workdir: no intact checkpoint in {ckpt.checkpoint_dir(config.workdir)} "
                                 "(each is named in a line above)")
    return run, restored[0]


def check_workdir(workdir: str) -> None:
    """ConfigError naming config.workdir unless this process can create it and write files in it
    (and in its checkpoints/, if there): said in one line before anything compiles, not as a
    traceback at the first write."""
    try:
        os.makedirs(workdir, exist_ok=True)
        for directory in (workdir, ckpt.checkpoint_dir(workdir)):
            if directory == workdir or os.path.isdir(directory):
                with tempfile.TemporaryFile(dir=directory):
                    pass
    except OSError as e:
        raise ConfigError("config.workdir", f"got {workdir!r}, expected a directory this process can write to "
                                            f"({e.strerror or type(e).__name__}: {e.filename or directory})") from None


def global_batch(run: Run, local: np.ndarray, global_rows: int) -> jax.Array:
    """This process's rows -> one global array sharded over the batch axes."""
    return jax.make_array_from_process_local_data(run.batch_sharding, local, (global_rows, *local.shape[1:]))


def local_rows(x: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch that every process holds whole."""
    rows = x.shape[0] // jax.process_count()
    return x[jax.process_index() * rows : (jax.process_index() + 1) * rows]
