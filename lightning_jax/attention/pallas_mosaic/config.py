"""The Mosaic GPU backend's public knobs (`MosaicConfig`) and its launch plan; light to import.

Pass a config through the op: ``lightning_attention(..., implementation="pallas_mosaic",
config=MosaicConfig(pieces=4))``.
"""

from __future__ import annotations

import dataclasses

from lightning_jax import checks
from lightning_jax.attention.pallas_triton.config import TritonConfig

# Tokens per block: wgmma's M. Larger blocks need more shared memory than the three-warpgroup kernel has.
MOSAIC_BLOCK = 64
# Programs (batch x heads x 64-wide value tiles) per SM: from FULL_GRID the grid counts as full (128
# programs on 132 SMs); below HALF_GRID the forward cuts sequences into pieces, from it up it runs
# whole sequences, or two pieces for rows of PIECE_BLOCKS blocks while that fits (launch_plan).
# SHORT_BLOCKS: rows of at most this many blocks take the Mosaic backward on a grid that is not full
# (choose_backward). Measured on an H200, docs/kernels.md.
FULL_GRID = 0.9
HALF_GRID = 0.45
SHORT_BLOCKS = 32
# From half the SMs up to where one program per row fills them, rows of at least PIECE_BLOCKS blocks
# are cut into two pieces too (launch_plan); shorter rows run whole there.
PIECE_BLOCKS = 128
# A last wave of whole rows that leaves most SMs idle runs its heads in pieces instead (tail_plan),
# for rows of at least TAIL_BLOCKS blocks, in at most MAX_TAIL_PIECES pieces.
TAIL_BLOCKS = 64
MAX_TAIL_PIECES = 4
# The fused dK/dV sweep runs batch x heads programs, half the two sweeps' at dim_v 128: it wins
# from 96 programs on 132 SMs and ties at 64 (choose_fused_dkdv).
DKDV_GRID = 0.7


def grid_size(batch: int, time: int, heads: int, dim_v: int) -> tuple[int, int]:
    """(programs, blocks): the forward's programs without pieces (batch x heads x 64-wide value
    tiles) and the blocks of MOSAIC_BLOCK tokens in each row."""
    return batch * heads * -(-dim_v // 64), -(-time // MOSAIC_BLOCK)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
    """Knobs of the Mosaic GPU forward (static; hashable). None means "choose from the shape"
    (`launch_plan`).

    stages: q, k, v blocks in flight (1, 2 or 3) in the forward and the Mosaic backward's sweeps;
      2 and 3 need dim_k <= 128 (3: warp specialisation, compiled for the GPU, where the operands
      from registers free the staging buffers). None: `choose_stages`, for each direction.
    warp_specialized: three warpgroups (memory, state, output) instead of one.
    pieces: programs per sequence (the sequence cut into pieces whose start states a first kernel
      and a scan provide), for grids that do not fill the GPU.
    rows_per_program: rows (pieces of sequences) one program sweeps in turn, for grids of many
      short programs.
    state_split: with pieces, the first kernel (which reads k and v only) cuts each piece into up
      to this many sub-pieces, so it runs more programs than the output pass. None:
      `choose_state_split`.
    gradients: the `TritonConfig` of the Triton backward (None: its defaults); setting it with
      `backward=None` runs the Triton backward.
    backward: "triton" (the Pallas-Triton backward, reading chunk states the Mosaic forward writes),
      "mosaic" (`kernels.backward`: sweeps of the Mosaic kernels, no saved states; dK and dV in one
      fused sweep where `fused_dkdv` says so), or None: `choose_backward`. Interpret mode always
      runs the Triton backward.
    tail_pieces: where whole rows leave a last wave of programs that fills few SMs, the heads of
      that wave run after the others, each sequence in this many pieces (`tail_plan`); 1 turns it
      off, None chooses.
    fused_dkdv: the Mosaic backward computes dK and dV in one reverse sweep (`dkdv.py`: q, k, v and
      dO read once; its own pieces, `dkdv_plan`; packed documents too) instead of two; it needs
      dims <= 128. None: `choose_fused_dkdv`.
    """

    stages: int | None = None
    warp_specialized: bool = True
    pieces: int | None = None
    rows_per_program: int | None = None
    state_split: int | None = None
    gradients: TritonConfig | None = None
    backward: str | None = None
    tail_pieces: int | None = None
    fused_dkdv: bool | None = None

    def __post_init__(self):
        checks.check_choice("MosaicConfig.stages", self.stages, (None, 1, 2, 3))
        checks.check_choice("MosaicConfig.backward", self.backward, (None, "triton", "mosaic"))
        checks.check_bool("MosaicConfig.warp_specialized", self.warp_specialized)
        if self.fused_dkdv is not None:
            checks.check_bool("MosaicConfig.fused_dkdv", self.fused_dkdv)
        if self.stages == 3 and not self.warp_specialized:
            raise checks.ArgumentError(
                "MosaicConfig.stages", "got 3 with warp_specialized=False, expected 1 or 2 (one warpgroup loads one "
                "block ahead) or warp_specialized=True"
            )
        for name in ("pieces", "rows_per_program", "state_split", "tail_pieces"):
            if getattr(self, name) is not None:
                checks.check_int(f"MosaicConfig.{name}", getattr(self, name), minimum=1)
        if self.gradients is not None and not isinstance(self.gradients, TritonConfig):
            raise checks.ArgumentTypeError(
                "MosaicConfig.gradients", f"got {type(self.gradients).__name__}, expected None or a TritonConfig"
            )


def dim_limit(stages: int) -> int:
    """The largest dim_k (and, for the Mosaic backward, dim_v) the three-warpgroup kernel's shared
    memory holds: one stage of q, k, v at 192; two at 128; three at 128 with the operands from
    registers (which drop the staged scores and decayed v)."""
    return 192 if stages == 1 else 128


def choose_stages(pieces: int, dim: int, compiled: bool, warp_specialized: bool) -> int:
    """Stages for the forward, or for the Mosaic backward's sweeps, when `MosaicConfig.stages` is
    None: 3 where the three-warpgroup kernels run whole sequences compiled (their operands from
    registers leave room for a third q, k, v block), 2 otherwise. `dim` is the largest dim the
    kernels stage: dim_k for the forward, max(dim_k, dim_v) for the backward (its dQ sweep reads
    dO and v in the roles of q and k).

    Measured on an H200 (docs/kernels.md), 3 stages against 2: the forward 0.349 against 0.371 ms at
    4 x 16,384 x 16 x 128, 0.354 against 0.366 at 16 x 4,096 (4 rows a program), 0.361 against
    0.374 at 64 x 1,024 (16 rows; within that run's spread); with pieces mixed (1 x 65,536 x 16:
    0.557 against 0.514), so pieces keep 2. The backward's three sweeps 0.979 against 1.031 ms at
    4 x 16,384, 1.017 against 1.061 at 64 x 1,024 (16 rows), 0.904 against 0.934 at
    1 x 8,192 x 96."""
    return 3 if pieces == 1 and dim <= dim_limit(3) and compiled and warp_specialized else 2


def launch_plan(batch: int, time: int, heads: int, dim_v: int, sm_count: int) -> tuple[int, int]:
    """(pieces, rows_per_program) for a call: about one program per SM (one fits at a time).

    Measured on an H200 (132 SMs; docs/kernels.md): with fewer programs than half the SMs, cutting
    each sequence into pieces wins (1 x 65,536 x 16 heads: 32 programs; 4 pieces 0.56 ms, 8 pieces
    0.62, none 1.24); with half the SMs (64 programs) two pieces win for rows of PIECE_BLOCKS
    blocks or more (2 x 16,384 x 16: 0.232 against 0.275 ms whole, 2 x 32,768: 0.455 against
    0.611) and whole rows for shorter ones (0.045 against 0.058 at 2 x 2,048); with many programs
    of short sequences, one program sweeping several rows wins (64 x 1,024 x 16: 2,048 programs;
    16 rows each 0.38 ms, one 0.47)."""
    programs, blocks = grid_size(batch, time, heads, dim_v)
    full = FULL_GRID * sm_count
    pieces = 1
    if programs < HALF_GRID * sm_count or (sm_count // programs >= 2 and blocks >= PIECE_BLOCKS):
        pieces = 1 << ((sm_count // programs).bit_length() - 1)  # a power of two <= the ratio
        pieces = max(1, min(pieces, blocks // 4))  # at least 4 blocks per piece
    rows = batch * pieces
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    per_program = max(d for d in divisors if d == 1 or programs * pieces // d >= full)
    return pieces, per_program


def choose_state_split(batch: int, heads: int, dim_v: int, pieces: int, sm_count: int) -> int:
    """`MosaicConfig.state_split` when None: with pieces, sub-pieces enough for the first kernel
    (which reads only k and v) to run about two programs per SM; 1 without pieces.

    Measured on an H200 (forward, docs/kernels.md): 0.514 against 0.539 ms with 4 pieces at
    1 x 65,536 x 16 x 128, 0.303-0.308 against 0.340 with 2 pieces at 2 x 16,384 x 16; about four
    programs per SM was slower than two at both and at 1 x 65,536 x 8."""
    programs = batch * heads * -(-dim_v // 64) * pieces
    return max(1, 2 * sm_count // programs) if pieces > 1 else 1


def choose_backward(batch: int, time: int, heads: int, dim_v: int, pieces: int, stages: int, sm_count: int, *,
                    dim_k: int | None = None, fused: bool = True) -> str:
    """The backward a call runs when `MosaicConfig.backward` is None: the Mosaic one where the
    forward runs whole sequences (no pieces), dim_v fits its sweeps, and either the grid is full
    (`FULL_GRID`) or the rows are short (`SHORT_BLOCKS`); also wherever its fused dK/dV sweep runs
    in pieces (`dkdv_plan`; `fused`: unless `MosaicConfig.fused_dkdv` is False; dim_k None means
    dim_v); Triton otherwise (the Mosaic forward then writes the chunk states the Triton backward
    reads).

    Measured on an H200 (forward + backward, docs/kernels.md "The Mosaic backward" and "The fused
    dK/dV sweep"): on a full grid the Mosaic backward (as three sweeps) is 1.03-1.21x faster at
    four of six shapes (4 x 16,384 x 16 x 128: 1.52 against 1.69 ms) and 0.99x at the other two;
    with pieces and three sweeps it loses (1 x 65,536 x 16 x 128: 2.26 against 1.89 ms
    all-Triton), its reverse sweeps reading k, v, q and dO twice, but with the fused sweep it wins
    (1.62 against 1.81 ms there, 0.76 against 0.90 at 2 x 16,384). On a half-filled grid (64
    programs) three sweeps win with rows of 16-32 blocks (2 x 2,048 x 16 x 128: 0.160 against 0.173
    ms all-Triton) and lose with longer ones (2 x 4,096: 0.295 against 0.283)."""
    programs, blocks = grid_size(batch, time, heads, dim_v)
    grid_ok = programs >= FULL_GRID * sm_count or blocks <= SHORT_BLOCKS
    if dim_v > dim_limit(stages):
        return "triton"
    if pieces == 1 and grid_ok:
        return "mosaic"
    plan = dkdv_plan(batch, time, heads, dim_v if dim_k is None else dim_k, dim_v, sm_count) if fused else None
    return "mosaic" if plan is not None and plan[0] > 1 else "triton"


def tail_plan(batch: int, time: int, heads: int, dim_v: int, pieces: int, rows_per_program: int,
              sm_count: int) -> tuple[int, int]:
    """(tail_heads, tail_pieces) for `kernels.forward`: (0, 1) for one launch, or the heads of a
    last, mostly idle wave of whole rows and the pieces to cut their sequences into.

    One program fits an SM, so a grid of whole rows runs in waves of sm_count programs. Where the
    last wave is less than half full, its heads go to a second launch after the others, their rows
    cut into the largest power of two of pieces that still fits one wave (at most MAX_TAIL_PIECES,
    at least 4 blocks each): 1 x 8,192 x 96 x 128 is 192 programs on 132 SMs, 66 heads whole (132
    programs) and then 30 in halves (120), so the second wave takes half a row's time instead of a
    whole one. Only for rows of TAIL_BLOCKS blocks or more (shorter ones gain less than the pieces'
    first kernel and scan cost) and launches without pieces or grouped rows."""
    programs, blocks = grid_size(batch, time, heads, dim_v)
    if pieces > 1 or rows_per_program > 1 or blocks < TAIL_BLOCKS or programs <= sm_count:
        return 0, 1
    per_head = programs // heads
    tail_heads = heads - (programs // sm_count) * sm_count // per_head
    tail_programs = tail_heads * per_head
    if not tail_heads or 2 * tail_programs > sm_count:
        return 0, 1
    tail_pieces = min(1 << ((sm_count // tail_programs).bit_length() - 1), MAX_TAIL_PIECES, blocks // 4)
    return tail_heads, tail_pieces


def dkdv_plan(batch: int, time: int, heads: int, dim_k: int, dim_v: int, sm_count: int) -> tuple[int, int, int] | None:
    """(pieces, rows_per_program, state_split) for the fused dK/dV sweep (`dkdv.py`), or None
    where it cannot run (a dim over 128). Its programs are batch x heads x pieces, one fitting an
    SM: below DKDV_GRID of the SMs, rows of PIECE_BLOCKS blocks or more are cut into the largest
    power of two of pieces that fits (at least 4 blocks each); with many programs, each takes the
    largest divisor of its rows that leaves FULL_GRID x sm_count programs. `state_split` as
    `choose_state_split` gives it for the pieces' first kernel."""
    if max(dim_k, dim_v) > 128:
        return None
    programs, blocks = batch * heads, -(-time // MOSAIC_BLOCK)
    pieces = 1
    if programs < DKDV_GRID * sm_count and blocks >= PIECE_BLOCKS and sm_count // programs >= 2:
        pieces = min(1 << ((sm_count // programs).bit_length() - 1), blocks // 4)
    rows = batch * pieces
    per_program = max(d for d in range(1, rows + 1)
                      if rows % d == 0 and (d == 1 or programs * pieces // d >= FULL_GRID * sm_count))
    return pieces, per_program, choose_state_split(batch, heads, dim_v, pieces, sm_count)


def choose_fused_dkdv(batch: int, heads: int, dim_v: int, pieces: int, sweep_pieces: int, sm_count: int) -> bool:
    """`MosaicConfig.fused_dkdv` when None (where `dkdv_plan` allows it, `pieces` its pieces): fused
    where `dkdv_plan` cuts pieces, where its grid (batch x heads x pieces programs) fills DKDV_GRID
    of the SMs, or at dim_v <= 64 when the two sweeps run whole rows too (`sweep_pieces`, the
    forward's pieces, is 1), their grid (batch x heads x 64-wide value tiles) then being no larger.

    Measured on an H200 (the op's backward, docs/kernels.md "The fused dK/dV sweep"): fused
    against two sweeps 1.34x faster at 64 x 1,024 x 16 x 128 (0.83 against 1.11 ms), 1.28x at
    1 x 8,192 x 96 (96 programs), 1.10x at 8 x 1,024 x 8 x 64 (64 programs); a tie at
    4 x 16,384 x 16 x 128 run whole (64 programs of 256 blocks) and 0.96x at 4 x 2,048 x 16 x 128
    (64 of 32)."""
    if pieces > 1 or batch * heads * pieces >= DKDV_GRID * sm_count:
        return True
    return dim_v <= 64 and sweep_pieces == 1
