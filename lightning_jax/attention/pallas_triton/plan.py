"""The static plan of one call: shapes, the chunk rule, and each phase's tiling.

A `Plan` is everything the kernels need to know at trace time. `make_plan` builds the forward's;
`Plan.for_chunk_states` and `Plan.for_backward` derive the other phases' tilings from it (the
chunks are shared: the backward reuses the forward's per-chunk states).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax.experimental.pallas import triton as plt

from lightning_jax.attention.pallas_triton.config import (
    HUGE_ROW_BYTES,
    MIN_BLOCK,
    WIDE_ROW_BYTES,
    GpuFacts,
    TritonConfig,
)
from lightning_jax.attention.registry import next_power_of_2


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything static about one call: shapes, tiling, and how to compile one phase's kernels."""

    batch: int
    time: int
    heads: int
    dim_k: int
    dim_v: int
    block: int  # C of this phase
    chunk: int  # L (a power-of-two multiple of every phase's C)
    tile: int  # width of the split dim's tiles in this phase
    num_warps: int
    num_stages: int
    scale: float
    itemsize: int
    precise: bool  # fp32 inputs: true fp32 dots (Triton's default for fp32 is TF32)
    interpret: bool
    config: TritonConfig
    facts: GpuFacts

    @property
    def dk_pad(self) -> int:
        return next_power_of_2(self.dim_k)

    @property
    def dv_pad(self) -> int:
        return next_power_of_2(self.dim_v)

    @property
    def num_chunks(self) -> int:
        return -(-self.time // self.chunk)

    @property
    def blocks_per_chunk(self) -> int:
        return self.chunk // self.block

    def num_tiles(self, dim: str) -> int:
        return (self.dk_pad if dim == "k" else self.dv_pad) // self.tile_of(dim)

    def tile_of(self, dim: str) -> int:
        return min(self.tile, self.dk_pad if dim == "k" else self.dv_pad)

    def compiler_params(self):
        return plt.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    @property
    def row_bytes(self) -> int:
        return max(self.dk_pad, self.dv_pad) * self.itemsize

    @property
    def wide(self) -> bool:
        return self.row_bytes >= WIDE_ROW_BYTES

    def chunk_state_smem(self, block: int, tile: int) -> int:
        """Shared memory of the chunk-state kernel: pipelined a and b blocks, the scaled copy of b."""
        stages = self.config.state_num_stages
        return (stages * (self.dk_pad + tile) + tile) * block * self.itemsize

    def for_chunk_states(self) -> "Plan":
        """The chunk-state kernel's own tiling (narrow rows only), its block halved until the
        pipelined operands fit in shared memory."""
        cfg = self.config
        if self.wide:
            return self
        tile = min(cfg.state_tile, self.dv_pad)
        block = min(cfg.state_block, self.chunk)
        while block > MIN_BLOCK and self.chunk_state_smem(block, tile) > self.facts.smem_budget:
            block //= 2
        return dataclasses.replace(
            self, block=block, tile=tile, num_warps=cfg.state_num_warps, num_stages=cfg.state_num_stages
        )

    def for_backward(self) -> "Plan":
        """The same chunks (R^(j) are shared with the forward) with the backward's tiling."""
        cfg = self.config
        block = cfg.bwd_block // (2 if self.wide and self.precise else 1)
        return dataclasses.replace(
            self,
            block=block_for(block, self.row_bytes, self.time),
            tile=cfg.wide_tile if self.wide else cfg.bwd_tile,
            num_warps=cfg.wide_bwd_num_warps if self.wide else cfg.bwd_num_warps,
            num_stages=cfg.bwd_num_stages,
        )


def block_for(block: int, row_bytes: int, time: int) -> int:
    """C: halved for rows of HUGE_ROW_BYTES (shared memory); at least MIN_BLOCK, at most time's
    power of two."""
    block = block if row_bytes < HUGE_ROW_BYTES else block // 2
    return max(MIN_BLOCK, min(block, next_power_of_2(time)))


def make_plan(
    q_shape: tuple[int, ...],
    dim_v: int,
    dtype,
    *,
    scale: float,
    block_size: int | None,
    interpret: bool,
    config: TritonConfig,
    facts: GpuFacts,
) -> Plan:
    """The forward's plan for q of `q_shape` [batch, time, heads, dim_k] and v's `dim_v`.

    `block_size` (if given) overrides `config.block` and is used as given (clipped to
    [MIN_BLOCK, time's power of two]), without the halving for huge rows.
    """
    batch, time, heads, dim_k = q_shape
    dtype = jnp.dtype(dtype)
    dk_pad, dv_pad = next_power_of_2(dim_k), next_power_of_2(dim_v)
    row_bytes = max(dk_pad, dv_pad) * dtype.itemsize
    wide = row_bytes >= WIDE_ROW_BYTES
    if block_size:
        block = max(MIN_BLOCK, min(block_size, next_power_of_2(time)))
    else:
        block = block_for(config.block, row_bytes, time)
    tile = min(config.wide_tile if wide else config.block_v, dv_pad)
    n_v = dv_pad // tile
    # One chunk per sequence when (value tiles, batch, heads) alone fill the GPU: no chunk-state
    # pass, no scans. Else the longest chunk up to `config.chunk` that gives `chunk_programs`.
    # Chunks are multiples of both phases' blocks (all powers of two).
    step = max(block, block_for(config.bwd_block, row_bytes, time))
    whole = step * next_power_of_2(-(-time // step))
    chunk = max(step, config.chunk)
    chunk_programs = config.resolved_chunk_programs(facts)
    while chunk > 2 * step and n_v * batch * heads * -(-time // chunk) < chunk_programs:
        chunk //= 2
    chunk = whole if n_v * batch * heads >= config.resolved_min_programs(facts) else min(chunk, whole)
    return Plan(
        batch=batch,
        time=time,
        heads=heads,
        dim_k=dim_k,
        dim_v=dim_v,
        block=block,
        chunk=chunk,
        tile=tile,
        num_warps=config.wide_num_warps if wide else config.num_warps,
        num_stages=config.num_stages,
        scale=float(scale),
        itemsize=dtype.itemsize,
        precise=dtype == jnp.float32,
        interpret=interpret,
        config=config,
        facts=facts,
    )
