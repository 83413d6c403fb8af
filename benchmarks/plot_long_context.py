"""Tokens/s and peak memory of TNL-385M and Transformer-385M against tokens per sequence, on H200s.

    python benchmarks/plot_long_context.py docs/long_context.png docs/long_context_h200.json

Reads the rows that benchmarks/long_context_memory.py printed (collected under "cells" in the JSON file,
with the run each came from) and draws two panels: training tokens/s per GPU, and peak device memory (XLA's
compiled plan where a cell was only compiled), both against tokens per sequence.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

GIB_LIMITS = ((104.85, "default allocator limit (75 %)"), (132.81, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95"))


def series(rows):
    """label -> [(tokens per sequence, tokens/s, peak GiB or None, planned GiB or None)]."""
    out = {}
    for r in rows:
        if "context" not in r or r.get("status") not in ("ok", "compiled") or r.get("run") == 1:
            continue  # run 1 came before the loss head's bf16 transposes (tables in docs/benchmarks.md)
        if r.get("model") == "transformer":
            label = "Transformer-385M (cuDNN), whole sequence"
        elif r.get("chunk") == 32768 and r.get("scan") == 0:
            label = ("TNL-385M, chunks of 32K" + (f", sequence split over {r['gpus']} GPUs" if r.get("gpus", 1) > 1
                                                  else ""))
        elif not r.get("chunk") and r.get("remat") == "full" and r.get("scan", 1):
            label = "TNL-385M, whole sequence"
        else:
            continue  # the other chunk settings are in the tables of docs/benchmarks.md
        out.setdefault(label, []).append((r["context"], r.get("tokens_per_s"), r.get("peak_gib") if r.get("batch", 1) == 1
                                          else None, r.get("plan_gib")))
    return {k: sorted(v) for k, v in out.items()}


def main(out_png, data_json):
    rows = json.load(open(data_json))["cells"]
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, (label, points) in enumerate(sorted(series(rows).items())):
        color = f"C{i}"
        measured = [(t, s) for t, s, _, _ in points if s]
        if measured:
            speed.plot(*zip(*measured), marker="o", color=color, label=label)
        peaks = [(t, m) for t, _, m, _ in points if m]
        plans = [(t, p) for t, _, _, p in points if p]
        if peaks:
            memory.plot(*zip(*peaks), marker="o", color=color, label=f"{label}: measured peak")
        if plans:
            memory.plot(*zip(*plans), marker="x", linestyle="--", color=color, label=f"{label}: compiled plan")
    for gib, text in GIB_LIMITS:
        memory.axhline(gib, color="grey", linewidth=0.8, linestyle=":")
        memory.text(2.2e5, gib + 2, text, fontsize=7, color="grey")
    for ax in (speed, memory):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per sequence")
        ax.grid(alpha=0.3)
    speed.set_ylabel("training tokens/s per GPU")
    speed.set_ylim(0, 160e3)
    speed.set_title("One H200 (two where split), bf16, AdamW")
    memory.set_ylabel("GiB per GPU (batch 1)")
    memory.set_title("Peak device memory")
    speed.legend(fontsize=7, loc="lower left")
    memory.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
