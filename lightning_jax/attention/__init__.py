"""Lightning attention: the op, its implementations and decay schedules.

    api.py            lightning_attention: argument checks, dispatch
    registry.py       the one list of implementations, DEFAULT_BLOCK_SIZE
    reference.py      the quadratic oracle
    recurrent.py      the token recurrence: decode_step (generation), recurrent (an oracle)
    xla.py            the block algorithm in plain JAX (XlaConfig)
    pallas.py         "pallas": the best Pallas backend per call (choose_backend)
    pallas_triton/    Pallas GPU kernels, Triton backend (TritonConfig)
    pallas_mosaic/    Pallas GPU kernels, Mosaic GPU backend for Hopper (MosaicConfig)
    schedules.py      decay-rate schedules
"""

from lightning_jax.attention.api import lightning_attention
from lightning_jax.attention.pallas_mosaic.config import MosaicConfig
from lightning_jax.attention.pallas_triton.config import TritonConfig
from lightning_jax.attention.recurrent import decode_step
from lightning_jax.attention.registry import DEFAULT_BLOCK_SIZE, IMPLEMENTATIONS, default_implementation
from lightning_jax.attention.schedules import (
    SCHEDULES,
    alibi_slopes,
    minimax_rates,
    paper_rates,
    tnl_rates,
)
from lightning_jax.attention.xla import XlaConfig

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "IMPLEMENTATIONS",
    "MosaicConfig",
    "SCHEDULES",
    "TritonConfig",
    "XlaConfig",
    "alibi_slopes",
    "decode_step",
    "default_implementation",
    "lightning_attention",
    "minimax_rates",
    "paper_rates",
    "tnl_rates",
]
