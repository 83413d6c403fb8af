"""Checkpoints: one Orbax CheckpointManager per run, under `workdir/checkpoints/<step>/`.

Each checkpoint holds three items:

    state  the train state (params, rest, opt_state, step, rng): see lightning_jax.training.step
    data   the grain iterator position of every process (one file per process)
    meta   JSON: the step and the run's configuration, for `--mode=eval` and for people

Saves are asynchronous (training goes on while the arrays are written) and atomic (Orbax writes to a
temporary directory and renames it when complete), so a crash at any moment leaves the previous
checkpoints intact. Restoring takes a target whose arrays carry the *new* shardings, so a run saved
on one mesh restores onto another.

When things go wrong (docs/training.md, "When things go wrong"):

- `restore_newest_intact` skips a damaged checkpoint (a file cut short, deleted or garbled) with one
  log line naming its step and what is wrong, and restores the newest intact one; training moves the
  damaged directory to `workdir/damaged_checkpoints/<step>/` (`set_aside`), evaluation leaves it.
  A checkpoint that is intact but does not fit the config (another model size) is a ConfigError,
  never set aside.
- `remove_unfinished` deletes the `*.orbax-checkpoint-tmp*` directories a killed or failed save
  leaves behind.
- `save` and `check_saves` turn a failed write (disk full, a write error), synchronous or
  asynchronous, into `CheckpointSaveError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from lightning_jax.training.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)

# Where training moves damaged checkpoints, next to `checkpoints/` (Orbax never looks there).
DAMAGED_DIR = "damaged_checkpoints"
# Orbax writes a checkpoint under `<step>.orbax-checkpoint-tmp...` and renames it when complete.
TMP_MARKER = ".orbax-checkpoint-tmp"


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


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: named in one line, skipped, set aside.


def _chain(error: BaseException):
    """`error` and the exceptions it was raised from, outermost first."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _one_line(text: str, limit: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# TensorStore's read errors: `OUT_OF_RANGE: Error reading "params.embed.value/0.0" in OCDBT database
# at local file "...": Requested byte range ...` (a file cut short; DATA_LOSS / FAILED_PRECONDITION
# for garbled bytes, NOT_FOUND for a missing file).
_TENSORSTORE_READ = re.compile(
    r'\b(?P<code>OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|NOT_FOUND|UNKNOWN|INTERNAL): '
    r'(?:Error opening "[^"]*" driver: )*(?:Error (?:reading|opening)|Metadata at) "(?P<key>[^"]+)"'
    r'(?: in OCDBT database at [^"]*"[^"]*")?:? ?(?P<detail>.*)'
)
_GRAIN_MISSING = re.compile(r"^File (\S+) does not exist\.?$")
# File errors that mean the checkpoint itself is broken (not, say, too many open files).
_MISSING_OR_UNREADABLE = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EIO)
# Orbax's errors for a checkpoint that is whole but holds another model or optimizer.
_MISMATCH = ("not compatible with the stored shape", "pytree structure", "partial_restore", "Dict key mismatch",
             "different types at key path", "Custom node type mismatch")


def damage_reason(error: BaseException) -> str | None:
    """One line saying what is wrong with the files behind a failed restore, or None when the error
    is not a damaged or missing file (e.g. a checkpoint of another model)."""
    for e in _chain(error):
        if isinstance(e, json.JSONDecodeError):
            return f"a JSON file is cut short or garbled ({e.msg}, character {e.pos})"
        if isinstance(e, OSError) and e.errno in _MISSING_OR_UNREADABLE:
            return _one_line(f"{e.strerror or type(e).__name__}: {e.filename}" if e.filename else str(e))
        missing = _GRAIN_MISSING.search(str(e))
        if missing:  # grain's data-iterator file
            return f"{os.path.join(*missing[1].split(os.sep)[-2:])} is missing"
        match = _TENSORSTORE_READ.search(str(e).split("\n", 1)[0])
        if match:
            key = re.sub(r"(\.value)?(/[0-9.]+|/\.zarray)?$", "", match["key"])
            detail = match["detail"].split(" [tensorstore_spec", 1)[0]
            return _one_line(f"cannot read {key}: {match['code']} {detail}")
    return None


def _missing_file(step_dir: str) -> str | None:
    """What a quick look finds wrong in a checkpoint directory, or None. Orbax reports a missing
    state/_METADATA as a pytree structure error, indistinguishable from a different model."""
    state = os.path.join(step_dir, "state")
    if not os.path.isdir(state):
        return "state/ is missing"
    for relative in ("state/_METADATA", "meta/metadata"):
        path = os.path.join(step_dir, relative)
        if not os.path.isfile(path):
            return f"{relative} is missing"
        try:
            with open(path, "rb") as f:
                json.loads(f.read())
        except (ValueError, UnicodeDecodeError):
            return f"{relative} is cut short or garbled (not valid JSON)"
        except OSError as e:
            return f"{relative} cannot be read ({e.strerror})"
    return None


def set_aside(workdir: str, step: int) -> str:
    """Moves checkpoint `step` to `workdir/damaged_checkpoints/<step>` (`<step>.1`, ... if taken);
    returns the new path. Orbax no longer sees it; nothing is deleted."""
    root = os.path.join(os.path.abspath(workdir), DAMAGED_DIR)
    os.makedirs(root, exist_ok=True)
    dest, n = os.path.join(root, str(step)), 0
    while os.path.exists(dest):
        n += 1
        dest = os.path.join(root, f"{step}.{n}")
    os.replace(os.path.join(checkpoint_dir(workdir), str(step)), dest)
    return dest


def _all_processes_agree(ok: bool) -> bool:
    """True when `ok` holds on every process (a checkpoint is used only if every process read it)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def restore_newest_intact(manager: ocp.CheckpointManager, workdir: str, target_state, data_iterator=None, *,
                          step: int | None = None, move_damaged: bool = False,
                          check_meta: Callable[[int, dict], None] | None = None):
    """Restores the newest checkpoint that reads back whole (or only `step`, when given).

    A damaged one (a file missing, cut short or garbled) is reported in one log line naming its step
    and what is wrong, then skipped; with `move_damaged` (training) it is also moved to
    `workdir/damaged_checkpoints/<step>/` so that later runs do not meet it again. An intact
    checkpoint that does not fit `target_state` (another model or optimizer) raises ConfigError and
    is left alone, as are the errors of `check_meta(step, meta)`. A damaged `step` asked for by
    number raises ConfigError.

    Returns (state, meta) or None when no checkpoint is left (data_iterator then keeps its position).
    """
    with one_line_orbax_errors():
        return _restore_newest_intact(manager, workdir, target_state, data_iterator, step, move_damaged, check_meta)


def _restore_newest_intact(manager, workdir, target_state, data_iterator, step, move_damaged, check_meta):
    start = data_iterator.get_state() if data_iterator is not None else None
    steps = [step] if step is not None else sorted(manager.all_steps(), reverse=True)
    damaged: list[str] = []
    restored = None
    for candidate in steps:
        step_dir = os.path.join(checkpoint_dir(workdir), str(candidate))
        reason = _missing_file(step_dir)
        if reason is None:
            reason, restored = _try_restore(manager, candidate, target_state, data_iterator, check_meta, step_dir)
        if _all_processes_agree(reason is None):
            break
        restored = None
        reason = reason or "another process could not read it"
        if step is not None:
            raise ConfigError("config.workdir", f"checkpoint {candidate} in {checkpoint_dir(workdir)} is damaged ({reason})")
        if move_damaged:
            where = set_aside(workdir, candidate) if jax.process_index() == 0 else DAMAGED_DIR
            _sync(f"lightning_jax_set_aside_{candidate}")
            damaged.append(f"checkpoint {candidate} is damaged ({reason}): moved to {where}")
        else:
            damaged.append(f"checkpoint {candidate} is damaged ({reason}): skipped, left in place "
                           f"(the next training run moves it to {DAMAGED_DIR}/)")
    if damaged and move_damaged:
        manager.reload()
    if damaged and jax.process_index() == 0:
        if restored is not None:
            then = f"{'resuming from' if move_damaged else 'using'} checkpoint {int(restored[1]['step'])}"
        else:
            then = "no intact checkpoint left" + (", training starts from step 0" if move_damaged else "")
        for line in damaged[:-1]:
            log.warning(line)
        log.warning(f"{damaged[-1]}; {then}")
    if restored is None and data_iterator is not None:
        data_iterator.set_state(start)  # a failed attempt may have moved it
    return restored


def _try_restore(manager, step, target_state, data_iterator, check_meta, step_dir):
    """(None, (state, meta)) or (what is damaged, None). Other errors propagate."""
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # classified below; anything else is re-raised
        reason = damage_reason(e)
        if reason is None:
            raise
        return f"meta: {reason}", None
    if check_meta is not None:
        check_meta(step, meta)
    try:
        return None, restore(manager, target_state, data_iterator, step)
    except Exception as e:  # classified below; anything else is re-raised
        reason = damage_reason(e)
        if reason is not None:
            return reason, None
        first = next((str(x) for x in _chain(e) if any(m in str(x) for m in _MISMATCH)), None)
        if first is None:
            raise
        raise ConfigError(
            "config.workdir",
            f"checkpoint {step} in {os.path.dirname(step_dir)} does not fit this config's model or optimizer "
            f"({_mismatch_summary(first)}); resume with the config it was written with (its meta/metadata "
            "holds it) or use another workdir",
        ) from None


def _mismatch_summary(message: str) -> str:
    """Orbax's long mismatch message, shortened to its first fact."""
    message = " ".join(message.split())
    where = re.search(r"do not match: (\S+?):", message)
    if where:
        return f"its arrays differ from this model's at {where[1]}"
    return _one_line(message.split(". ", 1)[0], 160)


# ----------------------------------------------------------------------------------------------
# Unfinished and failed saves


def remove_unfinished(workdir: str) -> list[str]:
    """Deletes the `<step>.orbax-checkpoint-tmp*` directories that a killed or failed save left in
    `workdir/checkpoints` (process 0; every process waits for it) and says so in one log line.
    Returns their names. Call before making the training manager."""
    directory = checkpoint_dir(workdir)
    names = []
    if jax.process_index() == 0 and os.path.isdir(directory):
        names = sorted(n for n in os.listdir(directory) if TMP_MARKER in n)
        for name in names:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
        if names:
            log.warning(f"removed {len(names)} unfinished checkpoint(s) left by an earlier run in {directory}: "
                        f"{', '.join(names)}")
    _sync("lightning_jax_remove_unfinished")
    return names


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, a write error). The message is one line: the
    step, the cause, where the run stopped and the newest complete checkpoint."""


class SaveWatch:
    """Starts saves (`save`) and watches the one in flight: `check(step)` after every training step
    raises CheckpointSaveError as soon as an asynchronous save has failed (it returns at once while
    the save is still being written), instead of at the next save."""

    def __init__(self, manager: ocp.CheckpointManager, workdir: str, committed: int | None = None):
        self.manager, self.workdir = manager, workdir
        self.pending: int | None = None
        self.committed = committed  # the newest checkpoint known to be complete

    def save(self, step: int, state, data_iterator, meta: dict[str, Any], *, every_steps: int,
             force: bool = False) -> bool:
        """`save(...)` (module level); returns whether a save started."""
        if self.pending is not None and (force or step % every_steps == 0):
            self.check(step, blocking=True)  # Orbax would wait for it anyway: name its failure
        try:
            started = save(self.manager, step, state, data_iterator, meta, every_steps=every_steps, force=force)
        except Exception as e:  # any failure to write is reported the same way
            raise self._failed(step, step, e) from e
        if started:
            self.pending = step
        return started

    def check(self, step: int, *, blocking: bool = False) -> None:
        """Raises CheckpointSaveError if the save in flight has failed; `blocking` waits for it."""
        if self.pending is None or (not blocking and self.manager.is_saving_in_progress()):
            return
        pending, self.pending = self.pending, None
        try:
            self.manager.wait_until_finished()  # at once: the save is done (or failed)
        except Exception as e:
            raise self._failed(pending, step, e) from e
        if jax.process_count() == 1 and not os.path.isdir(os.path.join(checkpoint_dir(self.workdir), str(pending))):
            raise self._failed(pending, step, "it was not completed (see Orbax's log line above)")
        self.committed = pending

    def _failed(self, failed: int, step: int, error) -> CheckpointSaveError:
        cause = error if isinstance(error, str) else (damage_reason(error) or _one_line(f"{type(error).__name__}: {error}"))
        newest = f"checkpoint {self.committed} is the newest complete one" if self.committed else "no checkpoint is complete"
        return CheckpointSaveError(
            f"checkpoint {failed} could not be written ({cause}); training stopped after step {step}; {newest}. "
            "Fix the cause (e.g. free disk space) and run the same command to resume"
        )


class _OneLineOrbaxErrors(logging.Filter):
    """Drops the tracebacks of Orbax's error log records (each failed save logs two or three, from
    background threads); their message lines stay, and `CheckpointSaveError` says what happened."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and "orbax" in record.pathname and record.exc_info:
            record.exc_info, record.exc_text = None, None
        return True


class _NoAsyncioShutdownNoise(logging.Filter):
    """Drops asyncio's "unhandled exception during asyncio.run() shutdown" records: after one array
    of a restore or save fails, Orbax's other read or write tasks are cancelled and asyncio logs each
    with its TensorStore spec (thousands of lines for one damaged file). The failure itself is
    reported in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("unhandled exception during asyncio.run() shutdown")


@contextlib.contextmanager
def one_line_orbax_errors():
    """While active, Orbax's error records print without their tracebacks and asyncio's shutdown
    noise is dropped (unless logging is at DEBUG, e.g. `--verbosity=1`)."""
    filters = []
    if not logging.getLogger("absl").isEnabledFor(logging.DEBUG):
        filters = [(logging.getLogger("absl"), _OneLineOrbaxErrors()),
                   (logging.getLogger("asyncio"), _NoAsyncioShutdownNoise())]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)
