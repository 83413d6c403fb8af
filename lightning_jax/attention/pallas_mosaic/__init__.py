"""Pallas Mosaic GPU (Hopper) kernels for Lightning Attention. Work in progress: forward only,
not registered as an implementation yet."""

from lightning_jax.attention.pallas_mosaic.forward import decay_tables, forward

__all__ = ["decay_tables", "forward"]
