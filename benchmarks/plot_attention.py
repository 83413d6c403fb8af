"""Time vs sequence length (family (a)) from benchmarks/attention.py's JSON: python benchmarks/plot_attention.py IN.json OUT.png"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
rows = results["family_a"]
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
for ax, key, title in ((axes[0], "fwd_s", "forward"), (axes[1], "fb_s", "forward + backward")):
    names = [n for n in rows[0]["impls"] if n not in ("cudnn", "seed")]
    for name in names:
        pts = [(r["shape"][1], r["impls"][name][key] * 1e3) for r in rows if key in r["impls"].get(name, {})]
        ax.plot(*zip(*pts), marker="o", label="ours (pallas)" if name == "pallas" else name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (batch = 65,536 / length), heads 16, dim 128, bf16")
    ax.set_ylabel("ms")
    ax.set_title(f"{title}, {results['versions'].get('device', '')}")
    ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
