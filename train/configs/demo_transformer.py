"""The demo's Transformer: the LLaMA-style baseline with the demo TNL's sizes and parameter count,
trained as train/configs/demo.py (same data, order, steps and optimizer) except for the learning rate:
3e-3, its best of 1.5e-3, 3e-3 and 6e-3 (TNL's is 6e-3; docs/comparison.md).

    python train/main.py --config train/configs/demo_transformer.py

3 layers, D 64, 4 heads of 16 (RoPE softmax attention), SwiGLU width 149: 151,872 parameters against
the demo TNL's 151,680 (+0.13 %). benchmarks/compare_models.py trains the two side by side over
several seeds (docs/comparison.md).
"""

import os
import runpy

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

# Config files are loaded by path, not as a package: read the base config the same way.
_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")


def get_config() -> ConfigDict:
    config = runpy.run_path(_BASE)["get_config"]()
    config.workdir = "runs/demo_transformer"
    # TransformerConfig.tiny() with these fields replaced. mlp_dim None: the preset's width for TNL's
    # parameter count (149 here); set it to override.
    config.model = ConfigDict(dict(
        arch="transformer", preset="tiny", vocab_size=257, num_layers=3, hidden_dim=64, num_heads=4,
        mlp_dim=placeholder(int), dtype="float32", param_dtype="float32", scan_layers=False, remat="none",
    ))
    config.optim.lr = 3e-3
    return config
