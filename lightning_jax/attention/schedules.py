"""Decay-rate schedules: rates[h] >= 0 for one layer, decay lambda_h = exp(-rates[h]).

Each returns a float32 numpy array of shape [heads], a constant (no device work on call). See
docs/lightning-math.md: ALiBi slopes, TransNormerLLM's per-layer rates (the released checkpoints),
MiniMax-Text-01's, and the formula printed in the ICML paper (which the checkpoints do not use).
"""

from __future__ import annotations

import math

import numpy as np

from lightning_jax import checks


def _check_layer(layer, num_layers) -> tuple[int, int]:
    num_layers = checks.check_int("num_layers", num_layers, minimum=1)
    return checks.check_int("layer", layer, minimum=0, maximum=num_layers - 1), num_layers


def alibi_slopes(heads: int) -> np.ndarray:
    """ALiBi slopes for any head count: 2^(-8(h+1)/H) for H a power of two; otherwise the list for
    P = 2^floor(log2 H) followed by every other slope of the list for 2P (the first H - P of them)."""
    heads = checks.check_int("heads", heads, minimum=1)

    def power_of_2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 2 ** int(math.floor(math.log2(heads)))
    slopes = power_of_2(p)
    if p != heads:
        slopes += power_of_2(2 * p)[0::2][: heads - p]
    return np.asarray(slopes, np.float32)


def tnl_rates(heads: int, layer: int, num_layers: int) -> np.ndarray:
    """TransNormerLLM (released code and checkpoints): slope_h * (1 - l / (L - 1) + 1e-5).

    With one layer the formula divides by zero; we define its layer factor as 1."""
    layer, num_layers = _check_layer(layer, num_layers)
    factor = 1.0 if num_layers == 1 else 1.0 - layer / (num_layers - 1) + 1e-5
    return (alibi_slopes(heads) * np.float32(factor)).astype(np.float32)


def minimax_rates(heads: int, layer: int, num_layers: int) -> np.ndarray:
    """MiniMax-Text-01: slope_h * (1 - l / (L - 1 + 1e-5) + 1e-5), l and L counting all layers."""
    layer, num_layers = _check_layer(layer, num_layers)
    factor = 1.0 - layer / (num_layers - 1 + 1e-5) + 1e-5
    return (alibi_slopes(heads) * np.float32(factor)).astype(np.float32)


def paper_rates(heads: int, layer: int, num_layers: int) -> np.ndarray:
    """The formula printed in the ICML 2024 paper, lambda = exp(-(8h/H)(1 - l/L)), h = 0..H-1.

    flash-linear-attention implements this literal form; it does NOT match the released TNL
    checkpoints (use `tnl_rates` for those). Head 0 gets rate 0 (no decay)."""
    heads = checks.check_int("heads", heads, minimum=1)
    layer, num_layers = _check_layer(layer, num_layers)
    h = np.arange(heads, dtype=np.float64)
    return (8.0 * h / heads * (1.0 - layer / num_layers)).astype(np.float32)


SCHEDULES = {"tnl": tnl_rates, "minimax": minimax_rates, "paper": paper_rates}
