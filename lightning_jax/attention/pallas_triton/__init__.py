"""Lightning attention as Pallas kernels for the Triton backend (NVIDIA GPUs), forward and backward.

The math is convention A of docs/lightning-math.md with the "end exponent" of `xla.py`, organised
for parallelism at every shape. Time is cut into chunks of L tokens (many blocks of C tokens each),
and every kernel runs one program per (column tile, chunk, batch x head), so even batch 1, heads 16,
time 65,536 gives hundreds of programs:

  forward   1. states.chunk_states   U_j = sum_a k_a^T lambda^(E_j - a) v_a, chunk j < N - 1 alone
            2. states.scan           R^(j+1) = lambda^(E_j) R^(j) + U_j, a short scan over chunks
            3. forward.forward       per chunk, from R^(j): blocks of C tokens in order,
                                     O_i = ((Q_i K_i^T) * D) V_i + (diag(lambda^a) Q_i) R_i
  backward  1. states.chunk_states   Y_j = sum_a lambda^a q_a^T dO_a, chunk j > 0 alone
            2. states.scan           reversed: G^(j-1) = lambda^(E_j) G^(j) + Y_j, G^(N-1) = dL/dS_final
            3. backward.backward     per chunk, one launch of three program kinds side by side:
                                     dQ by a forward sweep from R^(j) (saved by the forward);
                                     dK, and dV with dL/dR^(0), by reverse sweeps from G^(j)

E is the clipped end exponent: block g (global start gC) decays the state by lambda^E_g with
E_g = clip(time - 1 - gC, 0, C), i.e. C for full blocks, m - 1 for the ragged last block (m its real
length) and 0 for the padding blocks after it. With it the state after the last block is exactly the
final state (no division by lambda), padding blocks pass states through unchanged, and a chunk's E is
the sum of its blocks' E: clip(time - 1 - jL, 0, L). Every decay is exp(-rate * delta) with
delta >= 0, built in fp32 from the rate inside the kernels; nothing per token is stored besides
q, k, v and the outputs; the only residual beyond the inputs is R^(j), one fp32 state per chunk.

Registers are the scarce resource: each program carries a dim_k x dim_v fp32 state through its
chunk. Every kernel therefore carries only a tile of it, split along the dim its output is tiled in,
so no output needs a sum over programs: o, dV and dL/dR^(0) are tiled along the value dim (state
columns), dQ and dK along the key dim (state rows). Decays scale the rows of a product
(diag(lambda^a) (Q R)) or, in state updates, one operand (K^T diag(w) V), so q and k are only ever
read raw and every output tile has a single accumulator.

Packed documents (`segment_ids`): the same kernels, compiled separately with one more input tiled like
time, each token's segment start position; every decay above gets a 0/1 gate from comparisons inside
the block (`tiles.Gates`), and both scans over chunks a per-chunk gate (docs/lightning-math.md,
"Packed documents"). Without segment ids the kernels are exactly those without the feature.

dim_k and dim_v are padded to powers of two inside the kernels (masked loads and stores, no padded
copies in HBM). Without a GPU the same kernels run in Pallas interpret mode (slow, for tests).

Modules: `config` (the public `TritonConfig`, GPU facts), `plan` (the chunk rule and each phase's
tiling), `tiles` (what kernel bodies share), `states`, `forward`, `backward`, `op` (the custom_vjp
and the entry point). Importing this package is light: the Pallas lowering code loads with `op`.
"""

from lightning_jax.attention.pallas_triton.config import GpuFacts, TritonConfig, gpu_facts


def __getattr__(name):
    # The entry point pulls in Pallas' Triton lowering; load it on first use only.
    if name in ("lightning_attention_triton", "plan_for"):
        from lightning_jax.attention.pallas_triton import op

        return getattr(op, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["GpuFacts", "TritonConfig", "gpu_facts", "lightning_attention_triton", "plan_for"]
