# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lightning attention: the op
#
# Causal linear attention with a fixed per-head decay $\lambda_h = e^{-s_h}$. For one head, with
# $q_t, k_t \in \mathbb{R}^{d}$ and $v_t \in \mathbb{R}^{e}$:
#
# $$S_t = \lambda S_{t-1} + k_t^\top v_t, \qquad o_t = q_t S_t
# \qquad\Longleftrightarrow\qquad O = \big((Q K^\top) \odot M\big) V,\; M_{tj} = \lambda^{t-j}\,[t \ge j].$$
#
# The left form is a recurrence with a $d \times e$ state (constant memory, the decode path); the
# right is a masked quadratic form (parallel, but $O(T^2)$). **Lightning attention** splits time into
# blocks of $B$ tokens: the quadratic form inside a block, the carried state across blocks
# ($R_i$ = the state aged to block $i$'s first token):
#
# $$O_i = \big((Q_i K_i^\top) \odot D\big) V_i + \operatorname{diag}(\lambda^{a})\, Q_i R_i, \qquad
#   R_{i+1} = \lambda^{B} R_i + \big(\operatorname{diag}(\lambda^{B-a}) K_i\big)^\top V_i .$$
#
# The cost per token is $O(B(d+e) + de)$, whatever the length: a fixed budget of tokens costs the
# same as 64 sequences of 1K or one of 64K. This notebook checks the implementations against each
# other, looks at the decay schedules, and plots measured speed against length.

# %%
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import lightning_jax as lj

SMOKE = os.environ.get("LIGHTNING_JAX_SMOKE") == "1"  # CI runs every notebook small and fast


def find_repo_root():
    """The repository (the folder with pyproject.toml and docs/), searched upward from this file's
    folder, then from the current directory (in Jupyter `__file__` is not defined, and the kernel
    starts in the notebook's folder). None if neither is inside the repository."""
    starts = [pathlib.Path.cwd().resolve()]
    if "__file__" in globals():
        starts.insert(0, pathlib.Path(__file__).resolve().parent)
    for start in starts:
        for folder in (start, *start.parents):
            if (folder / "pyproject.toml").is_file() and (folder / "docs").is_dir():
                return folder
    print("repository root not found: no folder with pyproject.toml and docs/ above",
          " or ".join(map(str, starts)))
    return None


ROOT = find_repo_root()
if ROOT is not None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plot_attention import FAMILY_A_FILES, LABELS, family_a_points
print("jax", jax.__version__, "on", jax.default_backend(), "| default implementation:", lj.default_implementation())

# %% [markdown]
# ## Every implementation computes the same function
#
# `"reference"` is the masked quadratic form in fp32, `"recurrent"` the token recurrence (a second
# oracle), `"xla"` the block algorithm in plain JAX, and `"pallas"` the GPU kernels (on a Hopper GPU
# the Mosaic GPU kernels where they are faster, else the Triton kernels, which `"pallas_triton"` pins);
# on a CPU the Triton kernels run in Pallas interpret mode (slow, but the same code path).
# `"pallas_mosaic"` takes 16-bit inputs only, so it sits out this fp32 comparison. The sequence length is
# deliberately not a multiple of the block, and the heads span rates from 0 (no decay) to 8.

# %%
batch, length, heads, dim_k, dim_v = 2, 45 if SMOKE else 200, 4, 16, 32
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (batch, length, heads, dim_k))
k = jax.random.normal(keys[1], (batch, length, heads, dim_k))
v = jax.random.normal(keys[2], (batch, length, heads, dim_v))
state_in = jax.random.normal(keys[3], (batch, heads, dim_k, dim_v))
rates = np.array([0.0, 0.1, 1.0, 8.0], np.float32)

results = {
    name: lj.lightning_attention(q, k, v, rates, initial_state=state_in, return_final_state=True,
                                 block_size=16, implementation=name)
    for name in lj.IMPLEMENTATIONS
    if name != "pallas_mosaic"
}
o_ref, s_ref = results["reference"]


def rel_err(x, ref):
    return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


print(f"{'implementation':>14} | rel. error of o | rel. error of final state")
for name, (o, s) in results.items():
    print(f"{name:>14} | {rel_err(o, o_ref):15.2e} | {rel_err(s, s_ref):.2e}")
    assert rel_err(o, o_ref) < 1e-4 and rel_err(s, s_ref) < 1e-4

# %% [markdown]
# Gradients too: the block algorithm's hand-written backward (a forward sweep for dQ, a reverse
# sweep with a cotangent state for dK and dV) against autodiff of the quadratic form.

# %%
def loss(implementation):
    def f(q, k, v, s):
        o, s_out = lj.lightning_attention(q, k, v, rates, initial_state=s, return_final_state=True,
                                          block_size=16, implementation=implementation)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s_out**2) * 1e-3
    return jax.grad(f, argnums=(0, 1, 2, 3))


g_ref = loss("reference")(q, k, v, state_in)
for name in ("recurrent", "xla", "pallas"):
    errors = [rel_err(g, r) for g, r in zip(loss(name)(q, k, v, state_in), g_ref)]
    print(f"{name:>10}: dq {errors[0]:.1e}  dk {errors[1]:.1e}  dv {errors[2]:.1e}  d_state {errors[3]:.1e}")

# %% [markdown]
# ## Decay schedules
#
# TNL gives head $h$ of layer $l$ the rate $s_{h,l} = \text{slope}_h \,(1 - l/(L-1) + 10^{-5})$ with
# ALiBi slopes: early layers forget fast (local), the last layer barely forgets (global). The
# formula printed in the ICML paper differs (and is what flash-linear-attention implements); the
# released checkpoints use the TNL one.

# %%
num_layers, num_heads = 24, 8
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for ax, (name, fn) in zip(axes, [("tnl", lj.tnl_rates), ("minimax", lj.minimax_rates), ("paper", lj.paper_rates)]):
    table = np.stack([fn(num_heads, layer, num_layers) for layer in range(num_layers)])
    image = ax.imshow(table.T, aspect="auto", cmap="viridis")
    ax.set(title=f"{name}: rate per (head, layer)", xlabel="layer", ylabel="head")
    fig.colorbar(image, ax=ax)
plt.tight_layout()
plt.show()

# %% [markdown]
# What a rate means: the weight $\lambda^{\Delta}$ that a token $\Delta$ positions back still gets,
# for every head of the first layer, a middle layer and the last layer.

# %%
lag = np.arange(1, 4097)
fig, axes = plt.subplots(1, 3, figsize=(14, 3.4), sharey=True)
for ax, layer in zip(axes, [0, num_layers // 2, num_layers - 1]):
    for h, rate in enumerate(lj.tnl_rates(num_heads, layer, num_layers)):
        ax.loglog(lag, np.exp(-rate * lag), label=f"head {h}")
    ax.set(title=f"TNL layer {layer}", xlabel="distance (tokens)", ylim=(1e-8, 1.5))
axes[0].set_ylabel("weight $\\lambda^{\\Delta}$")
axes[-1].legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Constant speed, measured here
#
# A fixed budget of tokens split into sequences of growing length: the block algorithm's time should
# stay flat, the quadratic form's grows with the length. (CPU, plain-XLA path, small sizes; the GPU
# numbers follow.)

# %%
budget = 2048 if SMOKE else 16384
lengths = [128, 512, 2048] if SMOKE else [128, 512, 2048, 8192, 16384]


def median_ms(fn, *args, repeats=3 if SMOKE else 5):
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


cpu_times = {"xla": [], "reference": []}
for n in lengths:
    shape = (budget // n, n, 4, 32)
    xs = [jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(n), 3)]
    for name in cpu_times:
        if name == "reference" and n > 2048:  # O(T^2) memory: stop before it hurts
            cpu_times[name].append(np.nan)
            continue
        fn = jax.jit(lambda q, k, v, name=name: lj.lightning_attention(q, k, v, lj.alibi_slopes(4), implementation=name))
        cpu_times[name].append(median_ms(fn, *xs))

plt.figure(figsize=(6, 3.6))
for name, ys in cpu_times.items():
    plt.plot(lengths, ys, "o-", label=name)
plt.xscale("log", base=2)
plt.yscale("log")
plt.xlabel("sequence length (tokens per call fixed)")
plt.ylabel("forward time (ms, CPU)")
plt.legend()
plt.title(f"{budget} tokens per call, 4 heads, dim 32")
plt.show()

# %% [markdown]
# ## On the GPU
#
# `benchmarks/attention.py` measures the Pallas kernels against the peers on an H200; the results
# are in `docs/benchmarks.md`, the raw numbers in `docs/attention_bench_*.json`. Family (a) keeps
# 65,536 tokens per call (16 heads, dim 128, bf16) and grows the sequence length: flat lines are
# "constant speed"; softmax attention (cuDNN) grows with the length. Each point comes from the
# latest run that timed that implementation at that length (the authors' kernel and cuDNN were
# timed in an earlier run than ours, jla and fla).

# %%
bench_paths = [ROOT / "docs" / name for name in FAMILY_A_FILES] if ROOT else []
missing = [str(path) for path in bench_paths if not path.exists()]
if ROOT is None:
    print("GPU results skipped: the repository's docs/ folder was not found (see above)")
elif missing:
    print(f"GPU results skipped: {', '.join(missing)} not found (benchmarks/attention.py writes them on a GPU)")
else:
    points, device = family_a_points(bench_paths)
    fig, axes = plt.subplots(1, 2, figsize=(13, 4), sharey=True)
    for ax, key, title in [(axes[0], "fwd_s", "forward"), (axes[1], "fb_s", "forward + backward")]:
        for impl, label in LABELS.items():
            xy = sorted((t, 1e3 * timings[key]) for t, timings in points.get(impl, {}).items() if timings.get(key))
            if xy:
                ax.plot(*zip(*xy), "o-", label=label, lw=2.5 if impl == "pallas" else 1.2)
        ax.set(xscale="log", yscale="log", xlabel="sequence length (65,536 tokens per call)", title=title)
        ax.set_xscale("log", base=2)
    axes[0].set_ylabel("ms")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Lightning attention and peers: 65,536 tokens per call, 16 heads, dim 128, bf16, {device}")
    plt.tight_layout()
    plt.show()
