"""Checkpoints: one Orbax CheckpointManager per run, under `workdir/checkpoints/<step>/`.

Each checkpoint holds three items:

    state  the train state (params, rest, opt_state, step, rng): see lightning_jax.training.step
    data   the grain iterator position of every process (one file per process)
    meta   JSON: the step and the run's configuration, for `--mode=eval` and for people

Saves are asynchronous (training goes on while the arrays are written) and atomic (Orbax writes to a
temporary directory and renames it when complete), so a crash at any moment leaves the previous
checkpoints intact. Restoring takes a target whose arrays carry the *new* shardings, so a run saved
on one mesh restores onto another.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from lightning_jax.training.config import CheckpointConfig


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, config: CheckpointConfig, *, read_only: bool = False) -> ocp.CheckpointManager:
    """For training: async saves, keeps `config.keep`. `read_only` (evaluation): never creates,
    saves or deletes anything."""
    if read_only:
        # Not Orbax's read_only flag: it warns about every option it ignores. A manager that is
        # never asked to save changes nothing on disk.
        options = ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)
    else:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep,
            save_interval_steps=config.every_steps,
            enable_async_checkpointing=config.async_save,
        )
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, step: int, state, data_iterator, meta: dict[str, Any], *,
         every_steps: int, force: bool = False) -> bool:
    """Saves at multiples of `every_steps` (or when `force`); returns whether a save started.

    Call on every process (each writes its own shards and its own iterator state). The interval is
    checked here rather than by `manager.should_save`, which also saves the first step of every run."""
    if not force and step % every_steps:
        return False
    import grain  # only here: evaluation-only users never need it

    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def abstract_like(state):
    """ShapeDtypeStructs carrying each array's sharding: the restore target for `state`'s layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def restore(manager: ocp.CheckpointManager, target_state, data_iterator=None, step: int | None = None):
    """Restores checkpoint `step` (default: the latest) into the layout of `target_state` (concrete
    arrays or `abstract_like(...)`); sets `data_iterator`'s position if given.

    Returns (state, meta) or None when there is no checkpoint."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    args = {
        "state": ocp.args.StandardRestore(abstract_like(target_state)),
        "meta": ocp.args.JsonRestore(),
    }
    if data_iterator is not None:
        import grain

        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"], restored["meta"]
