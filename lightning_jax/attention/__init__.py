"""Lightning attention: the op, its implementations (reference, recurrent, xla, pallas) and decay schedules."""

from lightning_jax.attention.api import (
    IMPLEMENTATIONS,
    default_implementation,
    lightning_attention,
)
from lightning_jax.attention.reference import decode_step
from lightning_jax.attention.schedules import (
    SCHEDULES,
    alibi_slopes,
    minimax_rates,
    paper_rates,
    tnl_rates,
)

__all__ = [
    "IMPLEMENTATIONS",
    "SCHEDULES",
    "alibi_slopes",
    "decode_step",
    "default_implementation",
    "lightning_attention",
    "minimax_rates",
    "paper_rates",
    "tnl_rates",
]
