"""`implementation="pallas"`: the best Pallas backend for this device and call.

Two backends exist: Pallas-Triton (`pallas_triton/`, any NVIDIA GPU, every feature) and Pallas
Mosaic GPU (`pallas_mosaic/`, Hopper only; a faster forward, and a backward that is faster where
no piece-cutting is needed). "pallas" takes the Mosaic kernels where they cover the call (the
backward as `pallas_mosaic.config.choose_backward` says) and Triton everywhere else, so it is the
GPU default; name "pallas_triton" or "pallas_mosaic" to pin one.
"""

from __future__ import annotations

import jax

from lightning_jax.attention.pallas_mosaic.config import FULL_GRID, HALF_GRID, dim_limit, grid_size
from lightning_jax.attention.pallas_triton.config import TritonConfig, gpu_facts

# The Mosaic forward's limits: Hopper's wgmma and TMA, 16-bit operands, dim_k that fits two stages
# of the three-warpgroup kernel in shared memory (docs/kernels.md, "Pallas Mosaic GPU").
MOSAIC_CAPABILITIES = ("9.0",)
MOSAIC_MAX_DIM_K = dim_limit(stages=2)
# Below half the SMs the Mosaic forward cuts pieces (reading k and v twice); it still beats Triton's
# forward with about a quarter of the SMs (4 pieces a row) and long rows (measured on an H200,
# docs/kernels.md; 2 pieces lost at 16,384 tokens, 8 at 65,536).
QUARTER_GRID = 0.24
LONG_BLOCKS = 1024  # 65,536 tokens


def choose_backend(q_shape, dim_v: int, dtype, *, segments: bool = False, block_size: int | None = None,
                   interpret: bool | None = None, capability: str | None = None, sm_count: int | None = None) -> str:
    """"mosaic" or "triton": the backend "pallas" runs a call with.

    `capability` is the GPU's compute capability ("9.0" for an H100/H200) and `sm_count` its number
    of SMs; None reads them from the first device when the default backend is a GPU. Triton runs:
    in interpret mode (the Mosaic interpreter is far slower), a block size other than the Mosaic
    forward's 64, 32-bit operands, dim_k > 128, and calls with fewer (batch x head x 64-wide value
    tile) programs than about half the SMs (`HALF_GRID`), unless there are about a quarter
    (`QUARTER_GRID` up to a quarter: 32 or 33 on 132 SMs, which cut 4 pieces a row) and rows of
    65,536 tokens or more (`LONG_BLOCKS`). Below half the SMs the Mosaic forward cuts
    sequences into pieces and reads k and v twice: measured on an H200 (docs/kernels.md) it loses
    at 1 x 16,384 x 16 heads (32 programs; 0.169 ms against Triton's 0.161) and 1 x 65,536 x 8
    (16; 0.313 against 0.286), ties at 1 x 32,768 x 16, and wins at 1 x 65,536 x 16 (0.506-0.514
    against 0.542-0.545) and 1 x 131,072 x 16 (1.003 against 1.064). From half the SMs it runs
    whole sequences, or two pieces for rows of 8,192 tokens or more (`launch_plan`), and wins the
    forward (64 programs: 0.233 against 0.282 ms at 2 x 16,384 x 16, 0.045 against 0.062 at
    2 x 2,048); `pallas_mosaic.config.choose_backward` picks the backward.
    Packed documents (`segments`) run Mosaic both ways, so they take it with dim_v <= 128 and a
    full grid (`FULL_GRID`, about one program per SM) only."""
    if interpret or (interpret is None and jax.default_backend() != "gpu"):
        return "triton"
    if capability is None or sm_count is None:
        if jax.default_backend() != "gpu":
            return "triton"  # lowering for a GPU from a CPU-only process: no device to ask
        facts = gpu_facts()
        capability = facts.capability if capability is None else capability
        sm_count = facts.sm_count if sm_count is None else sm_count
    batch, time, heads, dim_k = q_shape
    programs, blocks = grid_size(batch, time, heads, dim_v)
    long_rows = QUARTER_GRID * sm_count <= programs <= sm_count // 4 and blocks >= LONG_BLOCKS
    covered = (
        capability in MOSAIC_CAPABILITIES
        and jax.numpy.dtype(dtype).itemsize == 2
        and dim_k <= MOSAIC_MAX_DIM_K
        and (not segments or (dim_v <= MOSAIC_MAX_DIM_K and programs >= FULL_GRID * sm_count))
        and block_size in (None, 64)
        and (programs >= HALF_GRID * sm_count or long_rows)
    )
    return "mosaic" if covered else "triton"


def lightning_attention_pallas(
    q,
    k,
    v,
    rates,
    initial_state,
    *,
    scale: float = 1.0,
    block_size: int | None = None,
    config: TritonConfig | None = None,
    interpret: bool | None = None,
    segment_ids=None,
):
    """Shapes as in `lightning_jax.attention.registry`. `config` tunes the Triton kernels; given, it
    also pins the Triton backward where the Mosaic forward runs (the forward stays Mosaic there),
    and sends packed documents to Triton both ways (the Mosaic kernels run them with their own
    backward only)."""
    segments = segment_ids is not None
    backend = choose_backend(q.shape, v.shape[-1], q.dtype, segments=segments, block_size=block_size,
                             interpret=interpret)
    if backend == "mosaic" and not (segments and config is not None):
        from lightning_jax.attention.pallas_mosaic import MosaicConfig, lightning_attention_mosaic

        mosaic_config = MosaicConfig() if segments else MosaicConfig(gradients=config)
        return lightning_attention_mosaic(q, k, v, rates, initial_state, scale=scale, config=mosaic_config,
                                          interpret=False, segment_ids=segment_ids)
    from lightning_jax.attention.pallas_triton.op import lightning_attention_triton

    extra = {} if segment_ids is None else {"segment_ids": segment_ids}
    return lightning_attention_triton(q, k, v, rates, initial_state, scale=scale, block_size=block_size, config=config,
                                      interpret=interpret, **extra)
