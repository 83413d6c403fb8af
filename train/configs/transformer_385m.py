"""The LLaMA-style baseline at TNL-385M's sizes, trained exactly as train/configs/tnl_385m.py.

model.mlp_dim None: the preset's width, 3136, at which the baseline has TNL-385M's parameter count
(0.4 % fewer); --config.model.mlp_dim=2816 gives it TNL's SGLU width instead (6 % fewer parameters).
"""

import os
import runpy

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

# Config files are loaded by path, not as a package: read the base config the same way.
_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tnl_385m.py")


def get_config() -> ConfigDict:
    config = runpy.run_path(_BASE)["get_config"]()
    config.workdir = "runs/transformer_385m"
    config.model = ConfigDict(dict(
        arch="transformer", preset="transformer_385m", vocab_size=64000, dtype="bfloat16",
        param_dtype="float32", scan_layers=True, remat="dots", attention_implementation=placeholder(str),
        mlp_dim=placeholder(int),
    ))
    return config
