"""The config files under train/configs: every field can be overridden from the command line, and
the baseline's defaults run the fast attention on a GPU."""

from __future__ import annotations

import pathlib
import runpy
import subprocess
import sys

import jax.numpy as jnp
import pytest
from ml_collections import ConfigDict

from lightning_jax.models.transformer import default_softmax_implementation

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "train" / "configs").glob("*.py"))


def _leaves(config: ConfigDict, prefix="config"):
    for key in config.keys():
        value = config[key]
        if isinstance(value, ConfigDict):
            yield from _leaves(value, f"{prefix}.{key}")
        else:
            yield f"{prefix}.{key}", config.get_ref(key)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_none_fields_are_typed_placeholders(path):
    # ml_collections refuses `--config.x=...` when x's default is a plain None ("Type NoneType ...
    # is not supported for overriding"); placeholder(T) keeps None and takes a T.
    config = runpy.run_path(str(path))["get_config"]()
    for name, ref in _leaves(config):
        if ref.get() is None:
            assert ref.get_type() is not type(None), f"{path.name}: {name} is a plain None"


@pytest.mark.parametrize(
    "config, override",
    [("transformer_385m", "--config.model.attention_implementation=xla"),
     ("tnl_385m", "--config.model.block_size=128"),
     ("tnl_385m", "--config.model.attention_implementation=xla")],
)
def test_none_fields_override_from_the_command_line(config, override):
    # The override parses; the run then stops at the bad step count, before any compile.
    proc = subprocess.run(
        [sys.executable, "train/main.py", "--config", f"train/configs/{config}.py", override, "--config.steps=-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.steps"), proc.stderr[-2000:]


def test_default_softmax_is_cudnn_on_a_gpu_for_half_types():
    pick = default_softmax_implementation
    assert pick(jnp.bfloat16, 128, masked=False, backend="gpu") == "cudnn"
    assert pick(jnp.float16, 64, masked=False, backend="gpu") == "cudnn"
    assert pick(jnp.float32, 128, masked=False, backend="gpu") == "xla"  # cuDNN needs bf16 / fp16
    assert pick(jnp.bfloat16, 128, masked=True, backend="gpu") == "xla"  # padded batches
    assert pick(jnp.bfloat16, 100, masked=False, backend="gpu") == "xla"  # not a multiple of 8
    assert pick(jnp.bfloat16, 128, masked=False, backend="cpu") == "xla"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_passes_the_train_config_checks(path):
    from lightning_jax.training.config import TrainConfig

    config = TrainConfig.from_dict(runpy.run_path(str(path))["get_config"]().to_dict())
    if path.stem == "tnl_385m_1m":  # the chunked long-context settings, as docs/benchmarks.md measured them
        assert config.optim.time_chunk_tokens == 32768 and config.data.seq_len == 1048576
        assert config.model.overrides["remat"] == "none" and config.model.overrides["scan_layers"] is False
