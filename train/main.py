"""Train or evaluate a model from a config file.

    python train/main.py --config train/configs/demo.py
    python train/main.py --config train/configs/demo.py --config.optim.lr=1e-3 --config.steps=100
    python train/main.py --config train/configs/demo.py --mode=eval

Multi-process: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM
/ Open MPI, which JAX detects) and start one process per host. A bad config, missing data or an
unwritable workdir prints one line naming the field or path and exits with status 2; a checkpoint
that cannot be written (disk full) stops the run with one line and status 1; Ctrl-C saves the
current step and exits with status 130 (a second Ctrl-C stops at once, unsaved, also 130); SIGTERM
saves and exits with status 0. docs/training.md, "When things go wrong", has the details.
"""

import importlib.util
import os
import sys
from collections.abc import Mapping

from absl import app, flags, logging
from ml_collections import ConfigDict, config_flags

from lightning_jax.checks import ArgumentError

config_flags.DEFINE_config_file("config", None, "Config file, e.g. train/configs/demo.py.", lock_config=True)
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if workdir has checkpoints) or eval.")
FLAGS = flags.FLAGS
# Exit status after Ctrl-C (128 + SIGINT), whether the step was saved (one Ctrl-C) or not (two).
INTERRUPTED = 130


def _interrupted():
    """A second Ctrl-C (or one before training began): no saving, no waiting for Orbax's threads."""
    print("error: interrupted; stopped at once without saving (a rerun resumes from the newest checkpoint)",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(INTERRUPTED)


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_spec(argv) -> str | None:
    """The value of --config (``path`` or ``path:argument``), or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _load_config(spec: str):
    """`get_config()` of the file, as ml_collections' --config does (``path:arg`` passes arg)."""
    path, colon, argument = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("_train_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(argument) if colon else module.get_config()


def _override_names(argv) -> list[str]:
    """The dotted names of the --config.a.b[=value] overrides (also --noconfig.a.b for booleans)."""
    names = []
    for arg in argv[1:]:
        if arg == "--":
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name.startswith("noconfig."):
            name = name[len("no"):]
        if arg.startswith("-") and name.startswith("config."):
            names.append(name)
    return names


def _unknown_override(config, name: str) -> ArgumentError | None:
    """ArgumentError on the first part of `name` (``config.optim.lrr``) that `config` lacks."""
    node = config
    parts = name.split(".")
    for depth, part in enumerate(parts[1:], 1):
        if not isinstance(node, (ConfigDict, Mapping)):
            return ArgumentError(".".join(parts[: depth + 1]), f"unknown config field ({'.'.join(parts[:depth])} has no fields)")
        if part not in node:
            return ArgumentError(".".join(parts[: depth + 1]), f"unknown config field, expected one of {sorted(node.keys())}")
        node = node[part]
    return None


def parse_flags(argv):
    """absl's parser, with its errors (missing file, unknown --config.x, bad type) as one line.

    The config file is loaded once here first, so an override naming a field the config lacks is
    reported by its dotted name before absl parses anything."""
    spec = _config_spec(argv)
    if spec is not None:
        path = spec.split(":")[0]
        if not os.path.isfile(path):
            _usage_error(f"--config: {path} does not exist")
        try:
            config = _load_config(spec)
        except Exception as e:  # noqa: BLE001: any failure to run the config file is a usage error
            _usage_error(f"--config: {path}: " + (" ".join(str(e).split()) or type(e).__name__))
        for name in _override_names(argv):
            unknown = _unknown_override(config, name)
            if unknown is not None:
                _usage_error(str(unknown))
    try:
        rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001: any failure to read the flags or the file is a usage error
        _usage_error(" ".join(line.strip() for line in str(e).splitlines()) or type(e).__name__)
    if FLAGS.config is None:
        _usage_error("--config: missing, e.g. --config train/configs/demo.py")
    return rest


def initialize_distributed():
    """jax.distributed.initialize() when the environment describes more than one process."""
    import jax

    env = os.environ
    explicit = "JAX_COORDINATOR_ADDRESS" in env
    cluster = any(int(env.get(v, "1")) > 1 for v in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if not (explicit or cluster):
        return
    # CPU processes need gloo for cross-process collectives; GPUs use NCCL regardless of this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        )
    else:
        jax.distributed.initialize()


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    try:
        initialize_distributed()
        import jax

        from lightning_jax.training import (
            CheckpointSaveError,
            ConfigError,
            DataError,
            evaluate,
            train_and_evaluate,
        )
    except KeyboardInterrupt:
        _interrupted()

    try:
        if FLAGS.mode == "train":
            result = train_and_evaluate(FLAGS.config)
        else:
            result = evaluate(FLAGS.config)
    except (ConfigError, DataError) as e:
        _usage_error(str(e))
    except CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Orbax's other writer threads of the failed save may still run; an ordinary exit would wait
        # for them and print their tracebacks at interpreter shutdown.
        os._exit(1)
    except KeyboardInterrupt:
        _interrupted()
    if jax.process_index() == 0:
        shown = {k: result[k] for k in ("step", "loss", "eval_loss", "eval_perplexity", "preempted") if k in result}
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))
    if result.get("stop_signal") == "SIGINT":
        sys.exit(INTERRUPTED)  # saved and stopped by Ctrl-C: the shell's convention, so `a && b` stops


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
