"""Models: TransNormerLLM (`TNL`) and the LLaMA-style `Transformer` baseline, with configs and
sharding helpers."""

from lightning_jax.models.config import TNLConfig, TransformerConfig
from lightning_jax.models.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    create_sharded_model,
    make_mesh,
)
from lightning_jax.models.tnl import TNL, TNLCache
from lightning_jax.models.transformer import Transformer, TransformerCache

__all__ = [
    "DEFAULT_RULES",
    "TNL",
    "TNLCache",
    "TNLConfig",
    "Transformer",
    "TransformerCache",
    "TransformerConfig",
    "batch_sharding",
    "create_sharded_model",
    "make_mesh",
]
