"""The Transformer of the GPU comparison: train/configs/compare_125m_tnl.py's sizes (16 layers, D 768,
6 heads of 128, byte vocab) and parameter count, trained exactly as it (same data, order, steps and
optimizer), with cuDNN flash attention.

SwiGLU width 2368 (`matched_mlp_dim`, a multiple of 64): 125,265,408 parameters against TNL's
125,240,832 (+0.02 %). On a CPU, override the kernel: --config.model.attention_implementation=xla.
"""

import os
import runpy

from ml_collections import ConfigDict

# Config files are loaded by path, not as a package: read the base config the same way.
_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_125m_tnl.py")


def get_config() -> ConfigDict:
    config = runpy.run_path(_BASE)["get_config"]()
    config.workdir = "runs/compare_125m_transformer"
    # Every size given here: the preset's own matching (mlp_dim None) would match TNL-385M's glu_dim
    # 2816, not 2112. mlp_dim = matched_mlp_dim(the TNL of compare_125m_tnl.py, multiple_of=64).
    config.model = ConfigDict(dict(
        arch="transformer", preset="transformer_385m", vocab_size=257, num_layers=16, hidden_dim=768,
        num_heads=6, head_dim=128, mlp_dim=2368, dtype="bfloat16", param_dtype="float32", scan_layers=True,
        remat="dots", attention_implementation="cudnn",
    ))
    return config
