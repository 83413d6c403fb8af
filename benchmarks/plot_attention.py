"""Time vs sequence length (family (a)) from benchmarks/attention.py's JSON files.

    python benchmarks/plot_attention.py docs/attention_time_vs_length.png \
        docs/attention_bench_family_a.json docs/attention_bench_family_b.json \
        docs/attention_mosaic_peers_family_a_h200.json

Family (a) points are the rows with 65,536 tokens, heads 16, dim 128 from any section; a later file's
row replaces an earlier one of the same shape (a re-run after a change), so every point keeps the
peers timed in its own run.
"""

import json
import sys

import matplotlib
import matplotlib.pyplot as plt

# The files under docs/ with family (a) rows, in the order to merge them: the runs with every peer
# (seed and cuDNN too, on an earlier version of our kernels) first, the current kernels' runs last.
FAMILY_A_FILES = (
    "attention_bench_all_peers_family_a.json",
    "attention_bench_all_peers_family_b.json",
    "attention_bench_family_a.json",
    "attention_bench_family_b.json",
    "attention_mosaic_peers_family_a_h200.json",
)
LABELS = {"pallas": "ours (\"pallas\": Mosaic GPU on Hopper)", "pallas_triton": "ours (Pallas-Triton)",
          "xla": "ours (plain XLA)", "jla": "jax-linear-attention (jla)",
          "fla": "flash-linear-attention (fla)", "seed": "lightning-attn (authors' kernel)",
          "cudnn": "cuDNN softmax attention"}


def _family_a(paths):
    """(device, rows): every family (a) row of the files, in order, with the device that ran it."""
    device, out = "", []
    for path in paths:
        results = json.load(open(path))
        device = results["versions"].get("device", device)
        for key in ("family_a", "family_b"):
            for row in results.get(key, []):
                batch, time, heads, dim = row["shape"]
                if batch * time == 65536 and heads == 16 and dim == 128:
                    out.append(row)
    return device, out


def family_a_rows(paths):
    """The family (a) rows by length, each from the last file that has it; and the device."""
    device, rows = _family_a(paths)
    by_time = {row["shape"][1]: row for row in rows}
    return [by_time[t] for t in sorted(by_time)], device


def family_a_points(paths):
    """Like family_a_rows, but merged per implementation: impl -> time -> its timings from the last
    file that timed that implementation at that length (peers skipped in a later run keep their
    points from an earlier one)."""
    device, rows = _family_a(paths)
    points = {}
    for row in rows:
        for impl, timings in row["impls"].items():
            if "fwd_s" in timings or "fb_s" in timings:
                points.setdefault(impl, {})[row["shape"][1]] = timings
    return points, device


def main():
    matplotlib.use("Agg")
    out, paths = sys.argv[1], sys.argv[2:]
    rows, device = family_a_rows(paths)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "fwd_s", "forward"), (axes[1], "fb_s", "forward + backward")):
        names = [n for n in rows[0]["impls"] if n not in ("cudnn", "seed")]
        for name in names:
            pts = [(r["shape"][1], r["impls"][name][key] * 1e3) for r in rows if key in r["impls"].get(name, {})]
            ax.plot(*zip(*pts), marker="o", label=LABELS.get(name, name))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("length (batch = 65,536 / length; heads 16, dim 128, bf16)")
        ax.set_ylabel("ms")
        ax.set_title(f"{title}, {device}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
