"""What a state hand-off between the programs of a cluster costs on the GPU: the measurement a
forward that reads every token once at few programs (docs/kernels.md, Leads: "Few programs")
is designed around.

Each cluster of P programs (one per SM) stands for one (head, value tile) chain cut into P
segments. In every round each program publishes a [dim_k, 64] fp32 state (32 KB at dim_k 128,
what one segment adds to the chain's state), then takes all P of them back, as a window of the
read-once design would. The ways:

- `global`: each program writes its state to global memory by TMA (it lands in L2), the cluster
  meets at a cluster barrier, each program TMA-loads the P states. Runs in GPU interpret mode.
- `fenced`: as `global`, with `fence.proxy.async.global` and `fence.acq_rel.cluster` after the store
  completes and after the barrier (TMA copies run in the async proxy, the barrier in the generic
  one, and its remote arrive releases at CTA scope only: without the fences another SM may read
  a stale state; interpret mode skips them).
- `none`: the same copies without the barrier (the copies' cost alone; the data read is stale).
- `dsmem`: each program stores its state into the others' shared memory (`async_store_smem`,
  distributed shared memory, arriving on their barriers) and reads its own: no L2. GPU only.

Per round and program: 32 KB out, P x 32 KB in. The kernel's time over `rounds` gives the time
of one round: what a window of the read-once design adds to its critical path if nothing
overlaps it. Prints one line per (way, P) and a table last; --out writes JSON.

    PYTHONPATH=$PWD python3 benchmarks/cluster_exchange.py [--clusters 32] [--sizes 2,4]
        [--rounds 512] [--ways global,fenced,none,dsmem] [--out F.json]
    PYTHONPATH=$PWD python3 benchmarks/cluster_exchange.py --check   # interpret mode, any machine
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import llvm

DIM_K, TILE = 128, 64


def _fence(asm):
    """Inline PTX fences (the GPU only; interpret mode skips them)."""

    @plgpu.inline_mgpu()
    def fence(_):
        llvm.inline_asm(ir.Type.parse("!llvm.void"), [], asm, "", has_side_effects=True)

    fence()


def exchange(x, *, size, rounds, sync=True, fenced=False, interpret=False):
    """x: fp32 [clusters, size, DIM_K, TILE] -> the same after `rounds` rounds of
    s_p <- mean over the cluster of s_q (with sync every program ends with its cluster's mean)."""
    clusters = x.shape[0]

    def kernel(x_ref, out_ref, board_ref, mine, peers, loaded, meet):
        c, p = lax.axis_index("c"), lax.axis_index("p")
        plgpu.copy_gmem_to_smem(x_ref.at[c, p], mine, loaded.at[0])
        plgpu.barrier_wait(loaded.at[0])
        s = mine[...]

        def round_(r, s):
            slot = r % 2  # round r + 2 reuses the slot: every program has read round r by then
            mine[...] = s
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(mine, board_ref.at[c, slot, p])
            plgpu.wait_smem_to_gmem(0)
            # The cluster barrier's remote arrive is a CTA-scope release: it orders nothing for
            # another SM. A cluster-scope fence on each side does, and the proxy fence orders
            # the TMA copies (async proxy) with it.
            if fenced:
                _fence("fence.proxy.async.global; fence.acq_rel.cluster;")
            if sync:
                plgpu.barrier_arrive(meet)
                plgpu.barrier_wait(meet)
            if fenced:
                _fence("fence.acq_rel.cluster; fence.proxy.async.global;")
            for q in range(size):
                plgpu.copy_gmem_to_smem(board_ref.at[c, slot, q], peers.at[q], loaded.at[1 + q])
            for q in range(size):
                plgpu.barrier_wait(loaded.at[1 + q])
            total = peers[0]
            for q in range(1, size):
                total = total + peers[q]
            return total * (1.0 / size)

        s = lax.fori_loop(0, rounds, round_, s)
        mine[...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(mine, out_ref.at[c, p])
        plgpu.wait_smem_to_gmem(0)

    def scoped(x_ref, out_ref, board_ref):
        pl.run_scoped(
            functools.partial(kernel, x_ref, out_ref, board_ref),
            plgpu.SMEM((DIM_K, TILE), jnp.float32),
            plgpu.SMEM((size, DIM_K, TILE), jnp.float32),
            plgpu.Barrier(num_barriers=1 + size),  # x, then one per peer's state
            plgpu.ClusterBarrier(collective_axes=("p",)),
        )

    out, _ = plgpu.kernel(
        scoped,
        out_type=(jax.ShapeDtypeStruct(x.shape, jnp.float32),
                  jax.ShapeDtypeStruct((clusters, 2, size, DIM_K, TILE), jnp.float32)),
        grid=(clusters,), grid_names=("c",), cluster=(size,), cluster_names=("p",),
        interpret=plgpu.InterpretGPUParams(detect_races=True, inline_mgpu="ignore") if interpret else False,
    )(x)
    return out


def exchange_dsmem(x, *, size, rounds):
    """As `exchange`, but each program stores its state straight into the other programs' shared
    memory (`async_store_smem`, distributed shared memory: no L2) and waits on its own barriers.
    GPU only: interpret mode has no rule for it."""
    clusters = x.shape[0]
    wgmma = plgpu.Layout.WGMMA
    others = size - 1

    def kernel(x_ref, out_ref, inbox, recv, loaded, meet):
        c, p = lax.axis_index("c"), lax.axis_index("p")
        # inbox[slot, j]: the state of program (p + 1 + j) % size. x comes in through a slot
        # that round 1 fills first (a peer's round 1 follows our round 0).
        plgpu.copy_gmem_to_smem(x_ref.at[c, p], inbox.at[1, 0], loaded)
        plgpu.barrier_wait(loaded)
        s = plgpu.load(inbox.at[1, 0], layout=wgmma)
        plgpu.barrier_arrive(meet)  # every program's barriers exist before anyone stores into them
        plgpu.barrier_wait(meet)

        def round_(r, s):
            slot = r % 2  # a peer refills the slot two rounds on, after it has this round's state from us
            for d in range(1, size):  # to program q = p + d, into its slot for the sender q + (size - d)
                plgpu.async_store_smem(s, inbox.at[slot, size - d - 1], recv.at[slot * others + size - d - 1],
                                       cluster_idx=(p + d) % size, cluster_dim="p")
            total = s
            for j in range(others):
                plgpu.barrier_wait(recv.at[slot * others + j])
                total = total + plgpu.load(inbox.at[slot, j], layout=wgmma)
            return total * (1.0 / size)

        s = lax.fori_loop(0, rounds, round_, s)
        plgpu.barrier_arrive(meet)  # nobody leaves while a peer may still write into its shared memory
        plgpu.barrier_wait(meet)
        inbox.at[0, 0][...] = s
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(inbox.at[0, 0], out_ref.at[c, p])
        plgpu.wait_smem_to_gmem(0)

    fp32_tiles = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))

    def scoped(x_ref, out_ref):
        pl.run_scoped(
            functools.partial(kernel, x_ref, out_ref),
            plgpu.SMEM((2, others, DIM_K, TILE), jnp.float32, transforms=fp32_tiles),
            plgpu.Barrier(num_barriers=2 * others),  # one arrival per sender (on the H200 a count of 4 or 128 hangs)
            plgpu.Barrier(),
            plgpu.ClusterBarrier(collective_axes=("p",)),
        )

    return plgpu.kernel(scoped, out_type=jax.ShapeDtypeStruct(x.shape, jnp.float32), grid=(clusters,),
                        grid_names=("c",), cluster=(size,), cluster_names=("p",))(x)


def check(size=2, rounds=3):
    """Interpret mode: after any round with the barrier, every program holds its cluster's mean."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, size, DIM_K, TILE), jnp.float32)
    out = jax.block_until_ready(exchange(x, size=size, rounds=rounds, fenced=True, interpret=True))
    want = jnp.broadcast_to(x.mean(axis=1, keepdims=True), x.shape)
    err = float(jnp.max(jnp.abs(out - want)))
    print(f"interpret check, clusters of {size}, {rounds} rounds: max error {err:.2e}")
    return err


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clusters", type=int, default=32, help="clusters (chains); 32 x 4 programs fill an H200")
    ap.add_argument("--sizes", default="2,4", help="comma-separated cluster sizes P")
    ap.add_argument("--rounds", type=int, default=512)
    ap.add_argument("--ways", default="global,fenced,none,dsmem", help="comma-separated: global, fenced, none, dsmem")
    ap.add_argument("--check", action="store_true", help="interpret mode only (no GPU needed)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.check:
        err = check()
        sys.exit(0 if err < 1e-5 else 1)
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "clusters": args.clusters,
               "rounds": args.rounds, "rows": []}
    for size in (int(s) for s in args.sizes.split(",")):
        x = jax.random.normal(jax.random.PRNGKey(0), (args.clusters, size, DIM_K, TILE), jnp.float32)
        want = np.broadcast_to(np.asarray(x).mean(axis=1, keepdims=True), x.shape)
        ways = {"global": exchange, "fenced": functools.partial(exchange, fenced=True),
                "none": functools.partial(exchange, sync=False), "dsmem": exchange_dsmem}
        for way in args.ways.split(","):
            if way not in ways:
                raise SystemExit(f"--ways: got {way!r}, expected names from {sorted(ways)}")
            fn = jax.jit(functools.partial(ways[way], size=size, rounds=args.rounds))
            row = {"way": way, "size": size}
            try:
                out = jax.block_until_ready(fn(x))
                row["max_error"] = float(np.max(np.abs(np.asarray(out) - want)))
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(x))
                    times.append(time.perf_counter() - t0)
                row["us_per_round"] = float(np.median(times)) / args.rounds * 1e6
            except Exception as e:  # noqa: BLE001
                row["error"] = repr(e)[:300]
            results["rows"].append(row)
            print(row, flush=True)
            if args.out:
                json.dump(results, open(args.out, "w"), indent=1)
    print(f"\n{args.clusters} clusters, {args.rounds} rounds, 32 KB out and P x 32 KB in per program per round")
    print("way    | P | us per round | max error (0 when every read saw the round's states)")
    for row in results["rows"]:
        print(f"{row['way']:6s} | {row['size']} | {row.get('us_per_round', float('nan')):.3f} | "
              f"{row.get('max_error', row.get('error'))}")


if __name__ == "__main__":
    main()
