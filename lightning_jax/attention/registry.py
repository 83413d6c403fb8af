"""The one list of lightning-attention implementations, and the block-size facts they share.

Every implementation is a function with one signature::

    fn(q, k, v, rates, initial_state, *, scale, block_size, config, interpret[, segment_ids])
        -> (o, final_state)

    q, k:          [batch, time, heads, dim_k]
    v:             [batch, time, heads, dim_v]
    rates:         [heads] float32, already checked and cut off from autodiff
    initial_state: [batch, heads, dim_k, dim_v] float32, or None (zero state)
    scale:         Python float multiplying q
    block_size:    power of two, or None for the implementation's default
    config:        an instance of the implementation's `config_type`, or None for its defaults
    interpret:     Pallas only: True runs the kernels in interpret mode, False lowers them for the
                   GPU, None interprets when the default backend is not a GPU
    segment_ids:   [batch, time] int32, non-decreasing per row (packed documents; the state resets
                   at each boundary); passed only when given, so the default path is unchanged
    o:             [batch, time, heads, dim_v] in q's dtype
    final_state:   [batch, heads, dim_k, dim_v] float32, the state after the last token

Implementations load on first use, so CPU-only users never import the Pallas lowering code.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

import jax

# Tokens per block of the block algorithm when the caller does not choose (the XLA path, the
# Pallas forward, and the FLOP count of a model). 64 fills a tensor-core tile along time.
DEFAULT_BLOCK_SIZE = 64


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One way to compute the op: where its function and (optional) config class live."""

    name: str
    summary: str
    module: str  # the module holding `function` (and `config_type`, if any)
    function: str
    config_type_name: str | None = None

    def load(self) -> Callable[..., tuple[jax.Array, jax.Array]]:
        return getattr(importlib.import_module(self.module), self.function)

    @property
    def config_type(self) -> type | None:
        """The frozen dataclass `lightning_attention(config=...)` takes for this implementation."""
        if self.config_type_name is None:
            return None
        return getattr(importlib.import_module(self.module), self.config_type_name)


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "reference", "the masked quadratic form in fp32: the oracle (O(time^2) memory)",
            "lightning_jax.attention.reference", "quadratic",
        ),
        Implementation(
            "recurrent", "the token recurrence with lax.scan, built from decode_step",
            "lightning_jax.attention.recurrent", "recurrent",
        ),
        Implementation(
            "xla", "the block algorithm in plain JAX, any backend",
            "lightning_jax.attention.xla", "lightning_attention_xla", "XlaConfig",
        ),
        Implementation(
            "pallas", "Pallas GPU kernels, the best backend per call (Mosaic GPU on Hopper, else Triton)",
            "lightning_jax.attention.pallas", "lightning_attention_pallas", "TritonConfig",
        ),
        Implementation(
            "pallas_triton", "Pallas GPU kernels (Triton backend), forward and backward, any NVIDIA GPU",
            "lightning_jax.attention.pallas_triton", "lightning_attention_triton", "TritonConfig",
        ),
        Implementation(
            "pallas_mosaic", "Pallas Mosaic GPU forward (Hopper), gradients by the Mosaic or the Triton backward",
            "lightning_jax.attention.pallas_mosaic", "lightning_attention_mosaic", "MosaicConfig",
        ),
    )
}


def default_implementation() -> str:
    """The implementation `implementation=None` resolves to on this process's default backend."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"
