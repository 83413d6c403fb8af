"""TNL-385M's forward (no gradient: evaluation, prefill) with several implementations of the op:
tokens/s, and how far each one's final hidden states are from the first's (same weights, tokens).
By default "pallas_triton" and "pallas" (the Mosaic GPU forward where it covers the call).

    PYTHONPATH=$PWD python3 benchmarks/model_forward.py [--shapes 16x2048,4x16384]
        [--implementations pallas_triton,pallas,xla] [--out F.json]

Timing as in attention.py (back-to-back calls, one sync per batch of calls, median of 9).
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, "benchmarks")
from attention import log, time_jax  # noqa: E402

from lightning_jax.models import TNL, TNLConfig  # noqa: E402

TINY = False  # --tiny: a CPU smoke test (Triton interpret mode)
IMPLEMENTATIONS = ("pallas_triton", "pallas")


def run(batch: int, time: int) -> dict:
    vocab = 256 if TINY else 64000
    tokens = [jax.random.randint(jax.random.PRNGKey(s), (batch, time), 0, vocab) for s in range(2)]
    row, hidden = {}, {}
    for impl in IMPLEMENTATIONS:
        model = TNL((TNLConfig.tiny if TINY else TNLConfig.tnl_385m)(attention_implementation=impl), rngs=nnx.Rngs(0))
        graph, state = nnx.split(model)
        fn = jax.jit(lambda state, t, graph=graph: nnx.merge(graph, state).hidden_states(t))
        hidden[impl] = fn(state, tokens[0]).astype(jnp.float32)
        seconds = time_jax(fn, [(state, t) for t in tokens])
        row[impl] = dict(ms=seconds * 1e3, tokens_per_s=batch * time / seconds)
        log(f"  {batch}x{time} {impl}: {seconds * 1e3:.2f} ms, {batch * time / seconds / 1e6:.3f}M tokens/s")
        del model, state
    base = hidden[IMPLEMENTATIONS[0]]
    for impl in IMPLEMENTATIONS[1:]:
        diff = jnp.linalg.norm((hidden[impl] - base).ravel()) / jnp.linalg.norm(base.ravel())
        row[impl]["rel_diff_to_first"] = float(diff)
    return row


def main():
    global TINY, IMPLEMENTATIONS
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="16x2048,4x16384", help="comma-separated BATCHxTIME")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiny", action="store_true", help="TNLConfig.tiny: a smoke test on any backend")
    ap.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    args = ap.parse_args()
    TINY = args.tiny
    IMPLEMENTATIONS = tuple(args.implementations.split(","))
    results = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": {}}
    for shape in args.shapes.split(","):
        batch, time = (int(x) for x in shape.split("x"))
        results["rows"][shape] = run(batch, time)
        if args.out:
            json.dump(results, open(args.out, "w"), indent=1)
    log(f"{'shape':10s} {'implementation':15s} {'ms':>8s} {'vs first':>8s} {'rel diff':>9s}")
    for shape, row in results["rows"].items():
        first = row[IMPLEMENTATIONS[0]]["ms"]
        for impl in IMPLEMENTATIONS:
            diff = row[impl].get("rel_diff_to_first")
            log(f"{shape:10s} {impl:15s} {row[impl]['ms']:8.2f} {first / row[impl]['ms']:8.3f} "
                + ("-" if diff is None else f"{diff:9.2e}"))


if __name__ == "__main__":
    main()
