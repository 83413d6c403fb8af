"""Models: TransNormerLLM (`TNL`) and the LLaMA-style `Transformer` baseline, with configs and
sharding helpers, the registry of the two families by name (`registry`), and published
TransNormerLLM checkpoints in and out (`load_hf_tnl`, `save_hf_tnl`: models/hf_tnl.py); `relayout`
converts a model between scanned and per-layer layer groups (models/stack.py)."""

from lightning_jax.models.config import TNLConfig, TransformerConfig
from lightning_jax.models.hf_tnl import load_hf_tnl, save_hf_tnl
from lightning_jax.models.registry import ARCHITECTURES, Architecture, build_model_config, model_class
from lightning_jax.models.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    create_sharded_model,
    make_mesh,
)
from lightning_jax.models.stack import relayout
from lightning_jax.models.tnl import TNL, TNLCache
from lightning_jax.models.transformer import Transformer, TransformerCache

__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "DEFAULT_RULES",
    "TNL",
    "TNLCache",
    "TNLConfig",
    "Transformer",
    "TransformerCache",
    "TransformerConfig",
    "batch_sharding",
    "build_model_config",
    "create_sharded_model",
    "load_hf_tnl",
    "make_mesh",
    "model_class",
    "relayout",
    "save_hf_tnl",
]
