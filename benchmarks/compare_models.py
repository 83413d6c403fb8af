"""Does TNL learn as well as the Transformer? Trains models side by side on the same data, in the same
order, for the same steps with the same optimizer, over several seeds, and compares their
validation loss on the whole held-out split.

    python benchmarks/compare_models.py                      # the CPU demo pair, 3 seeds (~25 min on 2 shared cores)
    python benchmarks/compare_models.py --seeds 1 --steps 200 --out runs/compare_quick
    python benchmarks/compare_models.py --tiny               # smoke test: 20 steps, 1 seed, small batches
    python benchmarks/compare_models.py --model TNL=train/configs/demo.py \\
        --model TNL-minimax=train/configs/demo.py --set TNL-minimax:model.decay=minimax   # an ablation

Each model is a train/configs file (`--model LABEL=PATH`, repeatable; default the demo pair:
TNL=train/configs/demo.py and Transformer=train/configs/demo_transformer.py). `--set [LABEL:]KEY=VALUE`
overrides a field of one model's config (or of all of them without a label): `optim.lr=1e-3`,
`model.decay=minimax` (model fields may be added; other sections' fields must exist). Every run
goes through the library's own `train_and_evaluate`, with checkpoints off, and is read back from
its `metrics.jsonl`; seed i gives every model the same initialisation seed and the same data order.
The script refuses models whose data or step count differ, and lists optimizer settings that differ.

Writes under `--out` (default runs/compare_demo): `LABEL/seed<N>/metrics.jsonl` per run,
`results.json` (settings, every run's curves and final numbers, the summary), `comparison.md` (the
table: mean and per-seed final validation loss, train loss, wall time, parameters) and `loss.png`
(train and eval curves of every model, means over seeds). With `--reuse`, a run whose workdir holds a
finished result of the same config is read back instead of trained again; `--reuse-from DIR`
(repeatable) also looks for it in another --out directory (`DIR/LABEL/seed<N>/`, e.g. runs of one
model each on separate GPUs), copies it in, and trains nothing: a run found nowhere is an error.

    CUDA_VISIBLE_DEVICES=0 python benchmarks/compare_models.py --model TNL=... --out runs/a &
    CUDA_VISIBLE_DEVICES=1 python benchmarks/compare_models.py --model Transformer=... --out runs/b
    python benchmarks/compare_models.py --model TNL=... --model Transformer=... --out runs/ab \\
        --reuse-from runs/a --reuse-from runs/b     # the table and plot of both
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import runpy
import shutil
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEMO_PAIR = (("TNL", "train/configs/demo.py"), ("Transformer", "train/configs/demo_transformer.py"))
# The smoke mode: a few steps of small batches, a slice of the held-out split.
TINY = dict(steps=20, seeds=1, batch_size=8, seq_len=64, eval_tokens=8192, eval_every=10, log_every=5)
# The train loss reported is the mean of the logged rows over this last fraction of the steps.
TRAIN_LOSS_TAIL = 0.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", metavar="LABEL=PATH",
                   help="a model to train: a label and a train/configs file (repeatable; default the demo pair)")
    p.add_argument("--set", action="append", default=[], metavar="[LABEL:]KEY=VALUE",
                   help="override a config field of one model (LABEL:) or of all (repeatable)")
    p.add_argument("--seeds", type=int, help="how many seeds, first-seed, first-seed + 1, ... (default 3)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="optimizer steps (default: the configs')")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (default: the configs'; 0: at the end)")
    p.add_argument("--eval-tokens", type=int, default=-1,
                   help="held-out tokens to evaluate: -1 (default) the whole split, N the first N")
    p.add_argument("--out", default="runs/compare_demo", help="output directory (default runs/compare_demo)")
    p.add_argument("--reuse", action="store_true", help="read back finished runs of the same config instead of training")
    p.add_argument("--reuse-from", action="append", default=[], metavar="DIR",
                   help="read finished runs of the same config from another --out directory too (repeatable); "
                        "train nothing")
    p.add_argument("--tiny", action="store_true",
                   help=f"smoke mode: {TINY['steps']} steps of {TINY['batch_size']} x {TINY['seq_len']} tokens, "
                        f"{TINY['seeds']} seed, the first {TINY['eval_tokens']} held-out tokens")
    p.add_argument("--no-plot", action="store_true", help="skip loss.png")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = TINY["seeds"] if args.tiny else 3
    if args.seeds < 1:
        p.error(f"--seeds: got {args.seeds}, expected at least 1")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: got {args.steps}, expected at least 1")
    models = []
    for spec in args.model or [f"{label}={path}" for label, path in DEMO_PAIR]:
        label, eq, path = spec.partition("=")
        if not eq or not label or not path or "/" in label or ":" in label:
            p.error(f"--model: got {spec!r}, expected LABEL=PATH (a label without / or :)")
        if not os.path.isabs(path) and not os.path.exists(path):
            path = os.path.join(ROOT, path)
        if not os.path.isfile(path):
            p.error(f"--model: {path}: no such config file")
        models.append((label, path))
    labels = [label for label, _ in models]
    if len(set(labels)) != len(labels):
        p.error(f"--model: labels must differ, got {labels}")
    args.models = models
    args.overrides = {label: [] for label in labels}
    for spec in args.set:
        key, eq, value = spec.partition("=")
        target, _, key = key.rpartition(":")
        if not eq or not key:
            p.error(f"--set: got {spec!r}, expected [LABEL:]KEY=VALUE")
        if target and target not in args.overrides:
            p.error(f"--set: {spec!r} names no model, expected one of {labels}")
        for label in ([target] if target else labels):
            args.overrides[label].append((key, _value(value)))
    return args


def _value(text: str):
    """A Python literal (1e-3, 30, True, (0, 2), None), else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(config, key: str, value) -> None:
    """config.<key> = value for a dotted key; `model` may gain fields, other sections may not."""
    *parents, name = key.split(".")
    node = config
    for part in parents:
        if part not in node:
            raise SystemExit(f"error: --set {key}: the config has no section {part!r}")
        node = node[part]
    if name not in node and parents != ["model"]:
        raise SystemExit(f"error: --set {key}: unknown field (only model.* fields may be added)")
    if name in node and isinstance(value, int) and not isinstance(value, bool) and isinstance(node[name], float):
        value = float(value)
    with node.unlocked() if hasattr(node, "unlocked") else _nothing():
        node[name] = value


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_config(path: str, overrides, seed: int, workdir: str, args) -> dict:
    """The config dict of one run: the file's get_config(), the overrides, then the run's settings."""
    config = runpy.run_path(path)["get_config"]()
    if args.steps is not None:
        config.steps = args.steps
    config.checkpoint.enabled = False  # a comparison needs the curves, not the weights
    config.log.progress_bar = False
    config.eval.max_tokens = args.eval_tokens
    if args.eval_every is not None:
        config.eval.every_steps = args.eval_every
    if args.tiny:
        config.steps = args.steps or TINY["steps"]
        config.data.batch_size = TINY["batch_size"]
        config.data.seq_len = TINY["seq_len"]
        config.eval.max_tokens = TINY["eval_tokens"]
        config.eval.every_steps = TINY["eval_every"] if args.eval_every is None else args.eval_every
        config.log.every_steps = TINY["log_every"]
    for key, value in overrides:  # after the settings above: an explicit --set wins
        set_field(config, key, value)
    config.seed = seed
    config.workdir = workdir
    return config.to_dict()


def check_comparable(configs: dict[str, dict]) -> list[str]:
    """Exit with status 2 if the models' data or steps differ; return the optimizer fields that differ."""
    labels = list(configs)
    first = configs[labels[0]]
    for label in labels[1:]:
        for field in ("data", "steps"):
            if configs[label][field] != first[field]:
                print(f"error: {label}'s {field} differs from {labels[0]}'s ({configs[label][field]} vs "
                      f"{first[field]}): a comparison trains every model on the same data for the same steps",
                      file=sys.stderr)
                sys.exit(2)
    return sorted({k for label in labels[1:] for k, v in configs[label]["optim"].items() if first["optim"][k] != v})


def _finished(workdir: str, config: dict) -> dict | None:
    """The result.json in `workdir` if it is a finished run of `config` (the workdir aside)."""
    result_path = os.path.join(workdir, "result.json")
    if not os.path.exists(result_path):
        return None
    with open(result_path) as f:
        result = json.load(f)
    same = {k: v for k, v in result.get("config", {}).items() if k != "workdir"} == {
        k: v for k, v in config.items() if k != "workdir"}
    return result if same else None  # the same run (a renamed or copied workdir too)


def reuse_from(config: dict, others: list[str]) -> dict:
    """A finished run of `config` from the first of the workdirs `others` that holds one, copied into
    config's workdir (result.json, metrics.jsonl). Exits with status 2 if none does."""
    workdir = config["workdir"]
    for other in others:
        result = _finished(other, config)
        if result is not None:
            os.makedirs(workdir, exist_ok=True)
            for name in ("metrics.jsonl", "result.json"):
                if os.path.exists(os.path.join(other, name)) and os.path.abspath(other) != os.path.abspath(workdir):
                    shutil.copyfile(os.path.join(other, name), os.path.join(workdir, name))
            return {**result, "config": config}
    print(f"error: --reuse-from: no finished run of this config in {others} (a result.json whose config "
          f"differs, e.g. in --set, --steps or --eval-tokens, does not count)", file=sys.stderr)
    sys.exit(2)


def train_one(config: dict, reuse: bool) -> tuple[dict, bool]:
    """Trains one run (or reads back a finished one with --reuse) -> (its result dict, reused)."""
    from lightning_jax.training.config import TrainConfig
    from lightning_jax.training.loop import train_and_evaluate
    from lightning_jax.training.metrics import read_metrics
    from lightning_jax.training.run import model_config

    workdir = config["workdir"]
    result_path = os.path.join(workdir, "result.json")
    if reuse:
        result = _finished(workdir, config)
        if result is not None:
            return {**result, "config": config}, True
    if os.path.isdir(workdir):
        shutil.rmtree(workdir)  # no checkpoints to resume from: start over, one curve per workdir
    train_config = TrainConfig.from_dict(config)
    params = model_config(train_config.model).num_params()
    t0 = time.perf_counter()
    train_and_evaluate(train_config)
    wall = time.perf_counter() - t0
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    rates = [r["tokens_per_sec"] for r in rows if r.get("tokens_per_sec")][1:]  # the first row includes compile
    steps = config["steps"]
    tail = [loss for step, loss in train if step > steps * (1 - TRAIN_LOSS_TAIL)] or [train[-1][1]]
    if not evals or evals[-1][0] != steps:
        raise RuntimeError(f"{workdir}: no evaluation at the last step {steps} in metrics.jsonl")
    result = {
        "config": config, "params": params, "wall_s": wall,
        "train_tokens_per_sec": statistics.median(rates) if rates else None,
        "final_eval_loss": evals[-1][1], "eval_tokens": next(r["eval_tokens"] for r in reversed(rows) if "eval_tokens" in r),
        "final_train_loss": statistics.fmean(tail), "train": train, "eval": evals,
    }
    with open(result_path, "w") as f:
        json.dump(result, f)
    return result, False


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def summarise(results: dict[str, list[dict]], seeds: list[int]) -> dict:
    summary = {}
    for label, runs in results.items():
        summary[label] = {
            "params": runs[0]["params"],
            "final_eval_loss": _stats([r["final_eval_loss"] for r in runs]),
            "final_train_loss": _stats([r["final_train_loss"] for r in runs]),
            "wall_s": _stats([r["wall_s"] for r in runs]),
            "train_tokens_per_sec": _stats([r["train_tokens_per_sec"] or math.nan for r in runs]),
        }
    labels = list(results)
    for label in labels[1:]:  # paired by seed against the first model
        diffs = [a["final_eval_loss"] - b["final_eval_loss"] for a, b in zip(results[labels[0]], results[label])]
        summary[label][f"eval_loss_minus_{labels[0]}"] = _stats([-d for d in diffs])
    return summary


def unit(config: dict) -> str:
    return "nats per byte" if config["data"]["tokenizer"] == "byte" else "nats per token"


def markdown(results: dict, summary: dict, seeds: list[int], settings: dict) -> str:
    labels = list(results)
    u = settings["unit"]
    seed_cols = " / ".join(f"seed {s}" for s in seeds)
    lines = [
        f"| model | parameters | final validation loss, mean ± sd ({u}) | per seed ({seed_cols}) | "
        f"train loss, last {TRAIN_LOSS_TAIL:.0%} of steps | wall time per run (s) | train tokens/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label in labels:
        s = summary[label]
        e, t, w, r = s["final_eval_loss"], s["final_train_loss"], s["wall_s"], s["train_tokens_per_sec"]
        per_seed = " / ".join(f"{v:.4f}" for v in e["per_seed"])
        lines.append(f"| {label} | {s['params']:,} | {e['mean']:.4f} ± {e['sd']:.4f} | {per_seed} | "
                     f"{t['mean']:.4f} | {w['mean']:.0f} | {r['mean']:,.0f} |")
    for label in labels[1:]:
        d = summary[label][f"eval_loss_minus_{labels[0]}"]
        lines.append("")
        lines.append(f"{label} minus {labels[0]}, final validation loss per seed: "
                     + ", ".join(f"{v:+.4f}" for v in d["per_seed"]) + f" (mean {d['mean']:+.4f})")
    lines += ["", f"Settings: {settings['steps']} steps of {settings['batch_size']} x {settings['seq_len']} tokens "
              f"({settings['corpus']}, {settings['tokenizer']} tokenizer), seeds {seeds}, validation on "
              f"{settings['eval_tokens']:,} held-out tokens"
              + (" (the whole split)" if settings["whole_split"] else "") + "."]
    for label in labels:
        o = results[label][0]["config"]["optim"]
        lines.append(f"- {label}: lr {o['lr']}, warmup {o['warmup_steps']}, cosine to {o['min_lr_ratio']} x lr, "
                     f"AdamW b1 {o['b1']} b2 {o['b2']} weight decay {o['weight_decay']}, clip {o['clip_norm']}; "
                     f"model {json.dumps(results[label][0]['config']['model'])}")
    if settings["optim_differs"]:
        lines.append(f"- optimizer fields that differ between the models: {settings['optim_differs']}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str, settings: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = settings["steps"]
    for i, (label, runs) in enumerate(results.items()):
        color = f"C{i}"
        for ax in axes:
            train_steps = [s for s, _ in runs[0]["train"]]
            train = np.mean([[v for _, v in r["train"]] for r in runs], axis=0)
            ax.plot(train_steps, train, color=color, alpha=0.6, lw=1, label=f"{label} train")
            eval_steps = [s for s, _ in runs[0]["eval"]]
            evals = np.array([[v for _, v in r["eval"]] for r in runs])
            ax.plot(eval_steps, evals.mean(0), "o--", color=color, lw=1.5, label=f"{label} validation")
            if len(runs) > 1:
                ax.fill_between(eval_steps, evals.min(0), evals.max(0), color=color, alpha=0.15)
    n = len(next(iter(results.values())))
    axes[0].set_title(f"whole run (mean of {n} seed{'s' if n > 1 else ''}; band: min-max over seeds)")
    axes[1].set_title("second half")
    axes[1].set_xlim(steps / 2, steps * 1.02)
    tail = [v for runs in results.values() for r in runs for key in ("train", "eval")
            for s, v in r[key] if s >= steps / 2]
    if tail:
        lo, hi = min(tail), max(tail)
        axes[1].set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss ({settings['unit']})")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{' vs '.join(results)}: {steps} steps of {settings['batch_size']} x {settings['seq_len']} "
                 f"tokens, same data and order per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = os.path.normpath(args.out)  # as given: results.json records workdirs relative to where it ran
    os.makedirs(out, exist_ok=True)
    seeds = [args.first_seed + i for i in range(args.seeds)]
    configs = {label: {seed: run_config(path, args.overrides[label], seed, os.path.join(out, label, f"seed{seed}"), args)
                       for seed in seeds} for label, path in args.models}
    optim_differs = check_comparable({label: c[seeds[0]] for label, c in configs.items()})
    if optim_differs:
        print(f"note: the models' optimizer settings differ in {optim_differs}", file=sys.stderr)

    results: dict[str, list[dict]] = {label: [] for label in configs}
    for seed in seeds:  # seed-major: a partial sweep has every model at the first seeds
        for label in configs:
            if args.reuse_from:  # this --out first, then each DIR/LABEL/seed<N>
                config = configs[label][seed]
                others = [os.path.join(d, label, f"seed{seed}") for d in args.reuse_from]
                result, reused = reuse_from(config, [config["workdir"], *others]), True
            else:
                result, reused = train_one(configs[label][seed], args.reuse)
            results[label].append(result)
            print(f"{label} seed {seed}: validation {result['final_eval_loss']:.4f}, train "
                  f"{result['final_train_loss']:.4f}, {result['wall_s']:.0f} s" + (" (reused)" if reused else ""),
                  flush=True)

    first = configs[args.models[0][0]][seeds[0]]
    eval_tokens = results[args.models[0][0]][0]["eval_tokens"]
    settings = {
        "steps": first["steps"], "batch_size": first["data"]["batch_size"], "seq_len": first["data"]["seq_len"],
        "corpus": first["data"]["corpus"], "tokenizer": first["data"]["tokenizer"], "seeds": seeds,
        "eval_tokens": eval_tokens, "whole_split": first["eval"]["max_tokens"] == -1, "unit": unit(first),
        "optim_differs": optim_differs, "train_loss": f"mean of the logged train losses over the last "
                                                      f"{TRAIN_LOSS_TAIL:.0%} of the steps",
        "models": {label: path for label, path in args.models}, "overrides": args.overrides,
    }
    summary = summarise(results, seeds)
    table = markdown(results, summary, seeds, settings)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"settings": settings, "summary": summary, "runs": results}, f, indent=1)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table)
    if not args.no_plot:
        plot(results, os.path.join(out, "loss.png"), settings)
    print(table, end="")
    return summary


if __name__ == "__main__":
    main()
