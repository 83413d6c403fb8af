"""Training and evaluation of the models in lightning_jax.models.

    from lightning_jax.training import TrainConfig, train_and_evaluate
    train_and_evaluate(TrainConfig(steps=300, workdir="/tmp/run"))

Modules: `config` (TrainConfig and its sections), `data` (corpora, tokenizers, grain pipeline),
`optim` (AdamW + schedule), `loss` (cross-entropy in blocks of tokens, from hidden states),
`step` (train state, loss, compiled step, eval sums), `checkpoint`
(Orbax), `metrics` (metrics.jsonl, MFU), `run` (run set-up: mesh, sharded model, train state),
`evaluation` (Evaluator, evaluate), `loop` (train_and_evaluate, load_model, saved_config). The model built from
a config's `model` section comes from `lightning_jax.models.registry`.

Names are imported on first use, so `import lightning_jax.training.step` (e.g. in a benchmark on an
image without grain) pulls in neither grain nor Orbax.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "config",
    "ConfigError": "config",
    "CheckpointSaveError": "checkpoint",
    "DataError": "data",
    "ByteTokenizer": "data",
    "train_and_evaluate": "loop",
    "evaluate": "evaluation",
    "load_model": "loop",
    "saved_config": "loop",
    "make_optimizer": "optim",
    "read_metrics": "metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_jax.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_jax.training' has no attribute {name!r}")
