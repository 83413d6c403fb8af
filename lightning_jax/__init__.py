"""lightning_jax: Lightning Attention and TransNormerLLM in JAX / Flax NNX."""

from lightning_jax.attention import (
    IMPLEMENTATIONS,
    SCHEDULES,
    MosaicConfig,
    TritonConfig,
    XlaConfig,
    alibi_slopes,
    decode_step,
    default_implementation,
    lightning_attention,
    minimax_rates,
    paper_rates,
    tnl_rates,
)

__version__ = "0.1.0"


def __getattr__(name):
    # `generate` needs flax; import it on first use so the attention op alone stays light.
    if name == "generate":
        from lightning_jax.generation import generate

        return generate
    raise AttributeError(f"module 'lightning_jax' has no attribute {name!r}")

__all__ = [
    "IMPLEMENTATIONS",
    "MosaicConfig",
    "SCHEDULES",
    "TritonConfig",
    "XlaConfig",
    "alibi_slopes",
    "decode_step",
    "default_implementation",
    "generate",
    "lightning_attention",
    "minimax_rates",
    "paper_rates",
    "tnl_rates",
]
