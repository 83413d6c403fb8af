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
# # Growing the context: TNL against a Transformer
#
# Softmax attention compares every token with every earlier one: for a sequence of $T$ tokens it
# costs $O(T^2)$ time, and unless it is computed in tiles (flash attention) the $T \times T$ scores
# take $O(T^2)$ memory. Generation keeps every past key and value: the KV cache grows with the
# context. Lightning attention costs $O(T)$ and carries a fixed `dim_k x dim_v` state per head.
#
# Hold the number of tokens per batch fixed and make the sequences longer (fewer of them). Then
#
# | | TNL | Transformer |
# |---|---|---|
# | time per batch | flat | grows $\propto T$ (the attention part) |
# | activation memory | flat | grows $\propto T$ (XLA materialises the scores) |
# | decode cache | constant | $\propto T$ |
# | decode time per token | constant | $\propto T$ |
#
# Both models come from `lightning_jax.models` with the same sizes (the `tiny` presets: 3 layers,
# width 64, 4 heads of 16, MLP width 128, 256 tokens). The first part measures them on this CPU; the
# last part plots the GPU numbers recorded in `docs/`.

# %%
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig
from lightning_jax.training.step import loss_sums

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
          " or ".join(map(str, starts)), "(the GPU part below is skipped)")
    return None


ROOT = find_repo_root() or pathlib.Path.cwd()  # without the repository, the docs/ checks below skip
print("jax", jax.__version__, "on", jax.default_backend(), f"({jax.devices()[0].device_kind})")

# %%
sizes = dict(num_layers=1 if SMOKE else 3)  # otherwise the tiny presets: D 64, 4 heads of 16, TNL's SGLU 128, the Transformer's MLP 149 (the same parameter count)
configs = {"TNL": TNLConfig.tiny(**sizes), "Transformer": TransformerConfig.tiny(**sizes)}
models = {"TNL": TNL(configs["TNL"], rngs=nnx.Rngs(0)), "Transformer": Transformer(configs["Transformer"], rngs=nnx.Rngs(0))}
for name, c in configs.items():
    print(f"{name:>11}: {c.num_params():,} parameters, training FLOPs/token at T=1K: {c.flops_per_token(1024):,.0f}, "
          f"at T=16K: {c.flops_per_token(16384):,.0f}")

# %% [markdown]
# ## Time and memory at a fixed token budget
#
# For each length $T$ the batch is `budget // T` sequences, so every point processes the same
# tokens. Two programs per model: the forward pass (the mean next-token loss, with the library's
# `loss_sums`) and forward + backward (its gradient with respect to the parameters: a training
# step without the optimizer). Each is compiled once with `jax.jit(f).lower(...).compile()`; the
# compiled program reports its memory (`memory_analysis().temp_size_in_bytes`: the scratch XLA
# allocates for activations and intermediates, beyond the inputs and outputs) before it ever runs,
# so memory can be read at lengths too large to run here. Time is the median of a few runs, and only
# where the program fits comfortably in this machine's memory.

# %%
budget = 1024 if SMOKE else 8192
lengths = [128, 1024] if SMOKE else [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]
run_limit = 3 * 2**30  # time a program only if its scratch memory is below this
repeats = 2 if SMOKE else 3


def programs(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, tokens):
        total, count = loss_sums(graphdef, params, rest, tokens, jnp.ones(tokens[:, 1:].shape, jnp.float32))
        return total / count

    return params, {"forward": loss, "forward+backward": jax.grad(loss)}


def median_seconds(compiled, *args):
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


results = []  # one row per (model, program, length)
for name, model in models.items():
    params, fns = programs(model)
    for length in lengths:
        batch = max(1, budget // length)
        tokens = jax.random.randint(jax.random.key(length), (batch, length + 1), 0, 256)
        for program, fn in fns.items():
            compiled = jax.jit(fn).lower(params, tokens).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            seconds = median_seconds(compiled, params, tokens) if temp < run_limit and length <= budget else np.nan
            results.append(dict(model=name, program=program, length=length, batch=batch, temp=temp, seconds=seconds))
            print(f"{name:>11} {program:>16} T={length:>6} batch={batch:>3}: scratch {temp / 2**20:9.1f} MiB, "
                  + ("not run" if np.isnan(seconds) else f"{1e3 * seconds:8.1f} ms"), flush=True)

# %% [markdown]
# Beyond the budget (`T > budget`) the batch stays at 1 sequence, so the tokens per batch grow with
# $T$ too: those points are memory only, and there even TNL's memory grows (linearly, with the
# tokens), while the Transformer's grows with $T^2$.

# %%
def series(name, program, key):
    rows = [r for r in results if r["model"] == name and r["program"] == program]
    return [r["length"] for r in rows], [r[key] for r in rows]


fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for name, color in [("TNL", "C0"), ("Transformer", "C3")]:
    for program, style in [("forward", "--"), ("forward+backward", "-")]:
        x, seconds = series(name, program, "seconds")
        axes[0].plot(x, 1e3 * np.asarray(seconds), style, marker="o", color=color, label=f"{name} {program}")
        x, seconds = series(name, program, "seconds")
        axes[1].plot(x, budget / np.asarray(seconds) / 1e3, style, marker="o", color=color, label=f"{name} {program}")
        x, temp = series(name, program, "temp")
        axes[2].plot(x, np.asarray(temp) / 2**20, style, marker="o", color=color, label=f"{name} {program}")
axes[0].set(ylabel="time per batch (ms)", title=f"{budget} tokens per batch, CPU")
axes[1].set(ylabel="thousand tokens / s", title="throughput")
axes[2].set(ylabel="XLA scratch memory (MiB)", title="memory (compiled, not run)")
axes[2].axvline(budget, color="gray", ls=":", lw=1)
axes[2].text(budget, axes[2].get_ylim()[1], "batch 1 from here ", ha="right", va="top", fontsize=8, color="gray")
for ax in axes:
    ax.set(xscale="log", xlabel="sequence length T")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Generation: the cache and the time per token
#
# `prefill` reads the prompt and returns a cache; `decode` takes one token and the cache and
# returns the next logits and the updated cache. A Transformer's cache holds the keys and values of
# every position (`TransformerCache`, allocated for prompt + `max_new_tokens`); TNL's holds one
# state per head and layer (`TNLCache`). `jax.eval_shape` gives the cache's shapes without
# computing anything, so the sizes below are exact at any context, also for the 385M-parameter
# presets (abstract models from `nnx.eval_shape`: no weights are allocated).

# %%
def cache_bytes(model, context, batch=1):
    graphdef, state = nnx.split(model)

    def prefill(state, tokens):
        return nnx.merge(graphdef, state).prefill(tokens, max_new_tokens=1)[1]

    cache = jax.eval_shape(prefill, state, jax.ShapeDtypeStruct((batch, context), jnp.int32))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache))


big = {
    "TNL-385M": nnx.eval_shape(lambda: TNL(TNLConfig.tnl_385m(scan_layers=True), rngs=nnx.Rngs(0))),
    "Transformer-385M": nnx.eval_shape(
        lambda: Transformer(TransformerConfig.transformer_385m(scan_layers=True), rngs=nnx.Rngs(0))),
}
contexts = [1024, 16384, 262144] if SMOKE else [1024, 4096, 16384, 65536, 262144, 1048576]
tiny = {f"{name} (tiny)": model for name, model in models.items()}
cache_sizes = {name: [cache_bytes(m, c) for c in contexts] for name, m in {**tiny, **big}.items()}

plt.figure(figsize=(6.5, 3.8))
for (name, sizes_), color, style in zip(cache_sizes.items(), ["C0", "C3", "C0", "C3"], ["--", "--", "-", "-"]):
    plt.loglog(contexts, sizes_, style, marker="o", color=color, label=name)
plt.xscale("log", base=2)
plt.xlabel("context (tokens)")
plt.ylabel("decode cache, batch 1 (bytes)")
plt.title("what generation carries (tiny: fp32, 385M: bf16)")
plt.legend()
plt.show()
for name, sizes_ in cache_sizes.items():
    print(f"{name:>17}: " + ", ".join(f"{c // 1024}K: {s / 2**20:,.2f} MiB" for c, s in zip(contexts, sizes_)))

# %% [markdown]
# The time of one `decode` step after a prompt of growing length, for the tiny models, batch 1:
# TNL's step is the same program at every context (it is compiled once), the Transformer's reads a
# longer cache each time.

# %%
decode_contexts = [64, 512] if SMOKE else [128, 512, 2048, 8192]
decode_ms = {}
for name, model in models.items():
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda state, tokens: nnx.merge(graphdef, state).prefill(tokens, max_new_tokens=1))
    decode = jax.jit(lambda state, token, cache: nnx.merge(graphdef, state).decode(token, cache))
    decode_ms[name] = []
    for context in decode_contexts:
        tokens = jax.random.randint(jax.random.key(context), (1, context), 0, 256)
        logits, cache = prefill(state, tokens)
        token = jnp.argmax(logits[:, -1], axis=-1)
        decode_ms[name].append(1e3 * median_seconds(decode, state, token, cache))
    print(f"{name:>11}: " + ", ".join(f"T={c}: {t:.2f} ms" for c, t in zip(decode_contexts, decode_ms[name])))

plt.figure(figsize=(6, 3.6))
for name, color in [("TNL", "C0"), ("Transformer", "C3")]:
    plt.plot(decode_contexts, decode_ms[name], "o-", color=color, label=name)
plt.xscale("log", base=2)
plt.xlabel("context (tokens already in the cache)")
plt.ylabel("one decode step (ms, CPU)")
plt.legend()
plt.title("time per generated token, batch 1")
plt.show()

# %% [markdown]
# ## On the GPU
#
# `benchmarks/attention.py` (the op against its peers) and `benchmarks/train_throughput.py` (full
# training steps of TNL-385M against Transformer-385M) run on an H200; their results are summarised
# in [docs/benchmarks.md](../docs/benchmarks.md) and their JSON is kept under `docs/`. This cell
# plots whatever of it is there, and says so when a file is missing.
#
# * Attention (`family_a`): 65,536 tokens per call, 16 heads of 128, bf16, sequence length 1K to
#   64K; forward and forward+backward time of our Pallas kernels (`pallas`) and of the peers that
#   were importable (flash-linear-attention `fla`, cuDNN softmax attention `cudnn`, ...).
# * Training throughput: tokens per second per GPU at the same tokens per step from 1K to 64K
#   context (TNL flat, the Transformer falling), with the model FLOPs utilisation.

# %%
def load_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"skipping {path.relative_to(ROOT)}: {e}")
        return None


LABELS = {"pallas": "ours (Pallas)", "xla": "ours, plain XLA", "jla": "jax-linear-attention", "fla": "flash-linear-attention",
          "seed": "lightning-attn (CUDA)", "cudnn": "cuDNN softmax attention"}


def plot_attention(data, source):
    entries = [e for e in data.get("family_a", []) if isinstance(e, dict) and "impls" in e and "shape" in e]
    if not entries:
        print(f"{source}: no family_a rows")
        return
    device = data.get("versions", {}).get("device", "GPU")
    names = list(dict.fromkeys(n for e in entries for n in e["impls"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for i, impl in enumerate(names):
        color = "C0" if impl == "pallas" else f"C{i + 1}"
        for key, ax in [("fwd_s", axes[0]), ("fb_s", axes[1]), ("fb_peak", axes[2])]:
            points = [(e["shape"][1], e["impls"][impl][key]) for e in entries
                      if isinstance(e["impls"].get(impl), dict) and isinstance(e["impls"][impl].get(key), (int, float))]
            if points:
                x, y = zip(*points)
                scale = 1e3 if key.endswith("_s") else 2.0**-20
                ax.plot(x, np.asarray(y) * scale, "o-", color=color, label=LABELS.get(impl, impl))
    tokens = entries[0]["shape"][0] * entries[0]["shape"][1]
    axes[0].set(ylabel="forward (ms)", title=f"{device}: {tokens:,} tokens per call")
    axes[1].set(ylabel="forward + backward (ms)", title=f"heads {entries[0]['shape'][2]}, dim {entries[0]['shape'][3]}, bf16")
    axes[2].set(ylabel="MiB (JAX: XLA temp + output; torch: allocated)", title="peak memory, forward + backward")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
    if axes[0].lines:
        axes[0].legend(fontsize=8)
    plt.tight_layout()
    plt.show()


def plot_throughput(data, source):
    rows = [r for r in data.get("rows", []) if isinstance(r, dict) and "model" in r and "context" in r]
    if not rows:
        print(f"{source}: no rows")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for i, name in enumerate(dict.fromkeys(r["model"] for r in rows)):
        ok = [r for r in rows if r["model"] == name and r.get("status") == "ok"]
        failed = [r["context"] for r in rows if r["model"] == name and r.get("status") != "ok"]
        if ok:
            axes[0].plot([r["context"] for r in ok], [r["tokens_per_sec_per_device"] / 1e3 for r in ok], "o-",
                         color=f"C{i}", label=name + (f" ({', '.join(map(str, failed))}: OOM)" if failed else ""))
            mfu = [(r["context"], 100 * r["mfu"]) for r in ok if r.get("mfu") is not None]
            if mfu:
                axes[1].plot(*zip(*mfu), "o-", color=f"C{i}", label=name)
    axes[0].set(ylabel="thousand tokens / s per device",
                title=f"{data.get('device', 'GPU')}: {data.get('tokens_per_step', '?')} tokens per step")
    axes[1].set(ylabel="MFU (%)", title="model FLOPs utilisation")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        if ax.lines:
            ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()


found = {path.name: load_json(path) for path in sorted((ROOT / "docs").glob("*.json"))} if (ROOT / "docs").is_dir() else {}
found = {name: data for name, data in found.items() if isinstance(data, dict)}
# Several attention runs may be recorded; attention_bench_family_a.json is the current kernels' family (a) run.
attention_runs = [name for name, data in found.items() if data.get("family_a")]
attention = next((n for n in ("attention_bench_family_a.json", "attention.json") if n in attention_runs),
                 attention_runs[-1] if attention_runs else None)
throughput = [name for name, data in found.items() if isinstance(data.get("rows"), list)]
if attention is None:
    print("no attention benchmark JSON (with family_a) under docs/: run benchmarks/attention.py on a GPU")
else:
    print(f"attention: docs/{attention} ({found[attention].get('date', 'no date')}: {found[attention].get('command', '')})")
    # Later runs (plot_attention.FAMILY_A_FILES, in order) replace the rows they re-measured.
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from plot_attention import FAMILY_A_FILES, family_a_rows

    merged, _ = family_a_rows([ROOT / "docs" / n for n in FAMILY_A_FILES if (ROOT / "docs" / n).exists()])
    plot_attention({**found[attention], "family_a": merged}, attention)
if not throughput:
    print("no training-throughput JSON under docs/ yet: run benchmarks/train_throughput.py on a GPU")
for name in throughput:
    print(f"training throughput: docs/{name}")
    plot_throughput(found[name], name)
skipped = sorted(set(found) - {attention, *throughput})
if skipped:
    print("not plotted here:", ", ".join(skipped))

# %% [markdown]
# What to look for: at a fixed number of tokens, the softmax-attention line (cuDNN) climbs with the
# sequence length while the linear-attention kernels stay flat, the same shape as the CPU plots
# above; a training step of the whole model (the throughput plot, when recorded) shows it as tokens
# per second that stay put for TNL and fall for the Transformer as the context grows.
