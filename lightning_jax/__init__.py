"""lightning_jax: Lightning Attention and TransNormerLLM in JAX / Flax NNX."""

from lightning_jax.attention import (
    IMPLEMENTATIONS,
    alibi_slopes,
    decode_step,
    default_implementation,
    lightning_attention,
    minimax_rates,
    paper_rates,
    tnl_rates,
)

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "alibi_slopes",
    "decode_step",
    "default_implementation",
    "lightning_attention",
    "minimax_rates",
    "paper_rates",
    "tnl_rates",
]
