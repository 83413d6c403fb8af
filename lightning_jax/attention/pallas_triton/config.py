"""The Triton kernels' public tuning knobs (`TritonConfig`) and the GPU facts the tiling reads.

Pass a config through the op: ``lightning_attention(..., implementation="pallas",
config=TritonConfig(chunk=4096))``. Every field is static (part of the compiled program); the
defaults come from sweeps on an H200 in bf16 (`benchmarks/sweep_pallas.py`, docs/kernels.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from lightning_jax import checks
from lightning_jax.attention.registry import DEFAULT_BLOCK_SIZE

# A row of q, k, v or dO (its padded dim x itemsize) this wide or wider is "wide": bf16 dim 256,
# fp32 dim 128. With the narrow-row tiles such rows overflow Hopper's shared memory, so wide rows
# get their own tile width and warps (TritonConfig.wide_*), the chunk-state kernel runs with the
# forward's tiling, and the fp32 backward halves its block.
WIDE_ROW_BYTES = 512
# Rows this wide (fp32 dim 256) halve every block: one block of them fills a quarter of shared memory.
HUGE_ROW_BYTES = 1024
# Shared memory Triton itself needs beside our pipelined tiles (layout conversions, reductions);
# the tiling heuristics budget `smem_per_block - TRITON_SCRATCH_BYTES` (192 KiB on Hopper).
TRITON_SCRATCH_BYTES = 35 * 1024
# Smallest block along time: Triton's dots need M, N, K >= 16.
MIN_BLOCK = 16


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """What the tiling needs to know about the GPU it compiles for."""

    name: str
    sm_count: int  # streaming multiprocessors: programs in flight = programs per SM x this
    smem_per_block: int  # bytes of shared memory one program may use (the opt-in maximum)
    capability: str = ""  # CUDA compute capability, "9.0" for Hopper; "" when the device did not say

    @property
    def smem_budget(self) -> int:
        """Bytes of shared memory our pipelined tiles may take (Triton's scratch left aside)."""
        return self.smem_per_block - TRITON_SCRATCH_BYTES


# The default when no GPU is attached (interpret mode, or lowering for an abstract device on a
# CPU): an H100 / H200 SXM, the GPUs the defaults were tuned on.
HOPPER = GpuFacts("H100/H200 (sm_90)", sm_count=132, smem_per_block=227 * 1024, capability="9.0")

# Opt-in shared memory per block by compute capability (CUDA programming guide, "Technical
# Specifications per Compute Capability"). JAX exposes the SM count but not this.
_SMEM_PER_BLOCK = {
    "7.0": 96 * 1024,
    "7.5": 64 * 1024,
    "8.0": 163 * 1024,
    "8.6": 99 * 1024,
    "8.7": 163 * 1024,
    "8.9": 99 * 1024,
    "9.0": 227 * 1024,
    "10.0": 227 * 1024,
    "10.3": 227 * 1024,
    "12.0": 99 * 1024,
}


def gpu_facts(device: jax.Device | None = None) -> GpuFacts:
    """Facts of `device` (default: the first device of the default backend when it is a GPU,
    else `HOPPER`). An unknown compute capability keeps Hopper's shared memory."""
    if device is None:
        if jax.default_backend() != "gpu":
            return HOPPER
        device = jax.devices()[0]
    return _facts_of(device)


@functools.cache
def _facts_of(device: jax.Device) -> GpuFacts:
    sm_count = getattr(device, "core_count", None)
    capability = str(getattr(device, "compute_capability", ""))
    if not isinstance(sm_count, int) or sm_count < 1:
        return dataclasses.replace(HOPPER, capability=capability)  # the plan's facts, the device's capability
    smem = _SMEM_PER_BLOCK.get(capability, HOPPER.smem_per_block)
    return GpuFacts(f"{device.device_kind} (sm_{capability.replace('.', '')})", sm_count, smem, capability)


@dataclasses.dataclass(frozen=True)
class TritonConfig:
    """Tuning knobs of the Pallas-Triton kernels (static; hashable).

    Time is cut into chunks of `chunk` tokens (one program per chunk, value tile and batch x
    head), each chunk into blocks along time (the tensor-core tile). Program counts are stated per
    streaming multiprocessor (SM) and scaled by the GPU's SM count (`GpuFacts`).
    """

    # Forward (chunk states, outputs): tokens per intra-block quadratic, value tile width, warps,
    # pipeline depth.
    block: int = DEFAULT_BLOCK_SIZE
    block_v: int = 64
    num_warps: int = 4
    num_stages: int = 2
    # Backward: its block, the tile width of the split dim (key dim for dQ and dK, value dim for
    # dV), warps, pipeline depth.
    bwd_block: int = DEFAULT_BLOCK_SIZE
    bwd_tile: int = 64
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2
    # dQ, dK and dV programs in one launch (they share a chunk's inputs in L2), else three launches.
    fuse_backward: bool = True
    # Chunks: the most tokens per program when a sequence needs several (see `plan.make_plan`).
    chunk: int = 8192
    # Programs one SM runs at once (registers allow 2 with these tiles). A sequence stays one
    # chunk when (value tiles x batch x heads) alone reach one wave, programs_per_sm x SMs, unless
    # `min_programs` says otherwise.
    programs_per_sm: int = 2
    min_programs: int | None = None  # None: one wave on this GPU (264 on 132 SMs)
    # Several chunks: the longest chunk that still gives the forward this many programs. Longer
    # chunks re-read less of k, v (q, dO) for the chunk states, an (N - 1) / N share, and scan
    # fewer rows; below two waves the backward's three program kinds balance worse. None: two
    # waves rounded down to a power of two (512 on 132 SMs; grids at power-of-two shapes come in
    # powers of two, and 512 is within 3% of two waves).
    chunk_programs: int | None = None
    # Chunk-state kernel (narrow rows; wide rows use the forward's settings). It carries no decay
    # from block to block (each row's factor runs to the chunk's end), so its block is free. It is
    # a stream with little math: the whole value dim in one tile (k read once), a deeper pipeline.
    state_block: int = DEFAULT_BLOCK_SIZE
    state_tile: int = 128
    state_num_warps: int = 4
    state_num_stages: int = 3
    # Scan over chunks: state elements per program, chunks per step (their rows loaded together).
    scan_tile: int = 512
    scan_group: int = 16
    # Wide rows (see WIDE_ROW_BYTES): tile width and warps. A 32-token backward block cost 1.8x at
    # bf16 dim 256 (M = 32 dots cannot use wgmma). At bf16 dim 256 the forward is faster with 4
    # warps (1.08 vs 1.21 ms) and the backward with 8 (3.5 vs 4.0 ms).
    wide_tile: int = 64
    wide_num_warps: int = 4
    wide_bwd_num_warps: int = 8

    def __post_init__(self):
        for name in ("block", "bwd_block", "state_block"):
            value = checks.check_power_of_two(f"config.{name}", getattr(self, name))
            if value < MIN_BLOCK:
                checks.fail(f"config.{name}", value, f"a power of two >= {MIN_BLOCK} (Triton dots)")
        for name in ("block_v", "bwd_tile", "state_tile", "wide_tile", "chunk", "scan_tile"):
            checks.check_power_of_two(f"config.{name}", getattr(self, name))
        for name in ("num_warps", "bwd_num_warps", "state_num_warps", "wide_num_warps", "wide_bwd_num_warps"):
            checks.check_power_of_two(f"config.{name}", getattr(self, name))
        for name in ("num_stages", "bwd_num_stages", "state_num_stages", "scan_group", "programs_per_sm"):
            checks.check_int(f"config.{name}", getattr(self, name), minimum=1)
        for name in ("min_programs", "chunk_programs"):
            if getattr(self, name) is not None:
                checks.check_int(f"config.{name}", getattr(self, name), minimum=1)
        checks.check_bool("config.fuse_backward", self.fuse_backward)

    def wave(self, facts: GpuFacts) -> int:
        """Programs in flight at once on this GPU."""
        return self.programs_per_sm * facts.sm_count

    def resolved_min_programs(self, facts: GpuFacts) -> int:
        return self.min_programs if self.min_programs is not None else self.wave(facts)

    def resolved_chunk_programs(self, facts: GpuFacts) -> int:
        if self.chunk_programs is not None:
            return self.chunk_programs
        return 1 << (2 * self.wave(facts)).bit_length() - 1  # two waves, down to a power of two


DEFAULT_CONFIG = TritonConfig()
