"""XLA's TNL-385M decoding step (`decode_implementation="xla"`, batch 1, the decoding layout, greedy
`generate`) compiled with XLA GPU
fusion options set per program (`jax.jit(..., compiler_options=)`): ms per step and whether the
tokens match the default program's.

    python benchmarks/decode_xla_options.py          # one H200
    python benchmarks/decode_xla_options.py --tiny   # CPU smoke run (the GPU options are ignored)

Per step = (T(129 new tokens) - T(1 new token)) / 128, T from 5 back-to-back calls; T(1) from the
default program. A variant that does not compile prints its error.
"""
import os
import sys
import time
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import jax
import numpy as np
from flax import nnx
from lightning_jax import generation
from lightning_jax.models import TNL, TNLConfig
TINY = "--tiny" in sys.argv
cfg = (TNLConfig.tiny if TINY else TNLConfig.tnl_385m)(dtype="bfloat16", param_dtype="bfloat16", scan_layers=False,
                                                      decode_implementation="xla")
model = generation.decoding_model(TNL(cfg, rngs=nnx.Rngs(0)))
tokens = np.random.default_rng(0).integers(1, cfg.vocab_size, (1, 256), dtype=np.int32)
tok, mask, temp, top_p = generation._check_arguments(model, tokens, 129, 0.0, None, None, 0, None, None)
graphdef, state = nnx.split(model)
dyn = (tok, mask, jax.random.key(0), temp, top_p)
VARIANTS = [None, {"xla_gpu_experimental_enable_triton_heroless_priority_fusion": True},
            {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
            {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True},
            {"xla_gpu_experimental_all_fusions_with_triton": True}]
ref = None
t1 = None
for opts in VARIANTS:
    try:
        f = jax.jit(generation._generate.__wrapped__, static_argnames=("graphdef", "max_new_tokens", "top_k", "prefill_chunk"),
                    compiler_options=opts)
        times = {}
        for n in ((129, 1) if opts is None else (129,)):
            c = f.lower(graphdef, state, *dyn, max_new_tokens=n, top_k=None, prefill_chunk=None).compile()
            out = jax.block_until_ready(c(state, *dyn))
            t0 = time.perf_counter()
            for _ in range(5):
                out = c(state, *dyn)
            jax.block_until_ready(out)
            times[n] = (time.perf_counter() - t0) / 5
            if n == 129:
                out129 = np.asarray(out)
        if opts is None:
            ref, t1 = out129, times[1]
        print(f"== {opts}: {(times[129] - t1) / 128 * 1e3:.3f} ms/step; tokens equal {np.mean(out129 == ref):.3f}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"== {opts}: failed {str(e).splitlines()[0][:200]}", flush=True)
