"""Train or evaluate a model from a config file.

    python train/main.py --config train/configs/demo.py
    python train/main.py --config train/configs/demo.py --config.optim.lr=1e-3 --config.steps=100
    python train/main.py --config train/configs/demo.py --mode=eval

Multi-process: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under SLURM
/ Open MPI, which JAX detects) and start one process per host. A bad config or missing data prints one
line naming the field or path and exits with status 2.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "Config file, e.g. train/configs/demo.py.", lock_config=True)
flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if workdir has checkpoints) or eval.")
FLAGS = flags.FLAGS


def _usage_error(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _config_path(argv) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
    return None


def parse_flags(argv):
    """absl's parser, with its errors (missing file, unknown --config.x, bad type) as one line."""
    path = _config_path(argv)
    if path is not None and not os.path.isfile(path):
        _usage_error(f"--config: {path} does not exist")
    try:
        rest = FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: an override names a field the config lacks
        key = e.args[0] if e.args else e
        text = (key.args[0] if isinstance(key, KeyError) and key.args else str(key)).splitlines()
        name, hint = text[0].strip("'") if text else "?", " ".join(text[1:])
        fields = [a.split("=")[0].lstrip("-") for a in argv if a.startswith("--config.")]
        field = next((f for f in fields if f.split(".")[-1] == name or f".{name}." in f), name)
        _usage_error(f"{field}: unknown config field. {hint}".strip())
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
    initialize_distributed()
    import jax

    from lightning_jax.training import ConfigError, DataError, evaluate, train_and_evaluate

    try:
        if FLAGS.mode == "train":
            result = train_and_evaluate(FLAGS.config)
        else:
            result = evaluate(FLAGS.config)
    except (ConfigError, DataError) as e:
        _usage_error(str(e))
    if jax.process_index() == 0:
        shown = {k: result[k] for k in ("step", "loss", "eval_loss", "eval_perplexity", "preempted") if k in result}
        print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
