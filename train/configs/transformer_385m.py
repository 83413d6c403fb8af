"""The LLaMA-style baseline at TNL-385M's sizes, trained exactly as train/configs/tnl_385m.py."""

import importlib.util
import os

from ml_collections import ConfigDict


def tnl_config() -> ConfigDict:
    """train/configs/tnl_385m.py's config (config files are loaded by path, not as a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tnl_385m.py")
    spec = importlib.util.spec_from_file_location("tnl_385m_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ConfigDict:
    config = tnl_config()
    config.workdir = "runs/transformer_385m"
    config.model = ConfigDict(dict(
        arch="transformer", preset="transformer_385m", vocab_size=64000, dtype="bfloat16",
        param_dtype="float32", scan_layers=True, remat="dots", attention_implementation=None,
    ))
    return config
