"""Plot the training and evaluation loss curves of one or more runs to a PNG.

    python train/plot_metrics.py runs/demo                      # -> runs/demo/loss.png
    python train/plot_metrics.py runs/a runs/b --out compare.png
    python train/plot_metrics.py runs/demo/metrics.jsonl --log-x
"""

import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training host
import matplotlib.pyplot as plt

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightning_jax.training.metrics import read_metrics  # noqa: E402


def metrics_path(run: str) -> str:
    return run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")


def plot(runs: list[str], out: str, log_x: bool = False) -> str:
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        path = metrics_path(run)
        rows = read_metrics(path)
        if not rows:
            raise SystemExit(f"error: {path}: no metrics (missing or empty)")
        label = os.path.basename(os.path.dirname(os.path.abspath(path))) if len(runs) > 1 else ""
        color = f"C{i}"
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
        evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None and r.get("mode") != "eval"]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train".strip())
        if evals:
            ax.plot(*zip(*evals), "o--", color=color, label=f"{label} eval".strip())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    if log_x:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main():
    parser = argparse.ArgumentParser(description="Plot loss curves from metrics.jsonl files.")
    parser.add_argument("runs", nargs="+", help="workdirs or metrics.jsonl files")
    parser.add_argument("--out", help="PNG path (default: <first run>/loss.png)")
    parser.add_argument("--log-x", action="store_true", help="log-scale step axis")
    args = parser.parse_args()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(metrics_path(args.runs[0]))), "loss.png")
    print(plot(args.runs, out, args.log_x))


if __name__ == "__main__":
    main()
