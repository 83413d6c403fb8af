"""Paper model of TNL training on 8 hosts x 8 H200s: bytes per collective, their time, compute, memory.

Pure Python (no jax): `python benchmarks/scaling_model.py` prints the markdown tables of
docs/scaling.md, which explains every formula and assumption. Nothing here is measured at this
scale; the only measured inputs are one H200's training throughput and one peak-memory figure
(docs/benchmarks.md). The asserts at the end check the totals against hand-computed values.
"""

from __future__ import annotations

import dataclasses
import math

# Hardware assumptions ----------------------------------------------------------------------------
HOSTS, GPUS_PER_HOST = 8, 8
PEAK_FLOPS = 989e12  # H200 dense bf16, as docs/benchmarks.md's MFU uses
HBM_BUDGET = 0.9 * 141e9  # bytes per device we allow ourselves: 90 % of the H200's 141 GB
NVLINK_BW = 0.8 * 450e9  # bytes/s per GPU per direction: 900 GB/s bidirectional NVLink, 80 % reached
IB_BW = 0.8 * 50e9  # bytes/s per GPU per direction: one 400 Gb/s NIC per GPU (8 per host), 80 % reached
LAT_NVLINK, LAT_IB = 10e-6, 25e-6  # seconds per collective (start-up), within a host / across hosts

# Measured on one H200 (docs/benchmarks.md): TNL-385M, bf16, full remat, 1K to 262K context ---------
TOKENS_PER_S_385M = 125e3  # 123.1K-129.3K measured; flat in the context length
MEASURED_PEAK = (262_144, 33.2 * 2**30)  # (tokens, peak bytes): TNL-385M, batch 1, blocked loss

# Bytes per element -------------------------------------------------------------------------------
GATHER_BYTES = 2  # FSDP weight all-gathers: the bf16 copies the layers compute with
GRAD_BYTES = 4  # gradient reductions: fp32, as the fp32 master parameters' gradients (an upper bound)
STATE_BYTES = 16  # per parameter: fp32 param, fp32 grad, fp32 Adam m and v
ACT_BYTES = 2  # bf16 activations (residual stream, tensor-parallel all-reduces)


@dataclasses.dataclass(frozen=True)
class Model:
    """The TNLConfig fields that matter here (lightning_jax/models/config.py)."""

    name: str
    layers: int
    d: int  # hidden_dim
    heads: int
    head_dim: int
    glu: int
    vocab: int = 64000
    lrpe_layers: tuple[int, ...] = (0,)
    block: int = 64  # lightning_attention's default block size (attention/registry.py)

    def key_dim(self, layer: int) -> int:
        return 2 * self.head_dim if layer in self.lrpe_layers else self.head_dim

    @property
    def layer_params(self) -> int:  # TNLConfig._layer_matmul_params
        a = self.heads * self.head_dim
        return 5 * self.d * a + 3 * self.d * self.glu

    @property
    def params(self) -> int:  # TNLConfig.num_params, tied embeddings
        return self.vocab * self.d + self.layers * self.layer_params + len(self.lrpe_layers) * self.heads * self.head_dim

    @property
    def flops_per_token(self) -> float:  # TNLConfig.flops_per_token for seq_len >= block
        attention = sum(3 * self.heads * (2 * self.block * (self.key_dim(l) + self.head_dim)
                                          + 4 * self.key_dim(l) * self.head_dim) for l in range(self.layers))
        return 6 * (self.layers * self.layer_params + self.vocab * self.d) + attention

    @property
    def tokens_per_s(self) -> float:
        """Per H200: measured for TNL-385M; for others derived at TNL-385M's MFU."""
        return TOKENS_PER_S_385M * TNL_385M.flops_per_token / self.flops_per_token


TNL_385M = Model("TNL-385M", layers=24, d=1024, heads=8, head_dim=128, glu=2816)
TNL_7B = Model("TNL-7B", layers=30, d=4096, heads=32, head_dim=128, glu=11008)
MFU = TOKENS_PER_S_385M * TNL_385M.flops_per_token / PEAK_FLOPS


def working_set_per_token() -> float:
    """w in activations = tokens x D x (2 L + 4 + w / tensor): fitted to the one measured peak."""
    tokens, peak = MEASURED_PEAK
    m = TNL_385M
    return (peak - STATE_BYTES * m.params) / (tokens * m.d) - (2 * m.layers + 4)


W_FIT = working_set_per_token()


@dataclasses.dataclass(frozen=True)
class Layout:
    label: str
    data: int = 1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1
    seq_len: int = 2048
    global_tokens: int = 2**21

    @property
    def sizes(self):
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "context": self.context}

    @property
    def rows(self) -> float:  # sequences per device (batch over data x fsdp)
        return self.global_tokens / self.seq_len / (self.data * self.fsdp)

    @property
    def tokens(self) -> float:  # tokens per device per step (a tensor group shares its tokens)
        return self.global_tokens / (self.data * self.fsdp * self.context)


def group_shape(layout: Layout, axes: tuple[str, ...]) -> tuple[int, int]:
    """(GPUs of the group per host, hosts it spans) for the group of device 0 along `axes`.

    jax.make_mesh on GPUs orders devices by id (host-major) and lets the last mesh axis vary
    fastest: mesh axes (data, fsdp, tensor, context), device index = row-major over them."""
    names = ("data", "fsdp", "tensor", "context")
    shape = [layout.sizes[n] for n in names]
    assert math.prod(shape) == HOSTS * GPUS_PER_HOST, layout
    members = [0]
    for i, name in enumerate(names):
        if name in axes:
            stride = math.prod(shape[i + 1:])
            members = [m + k * stride for m in members for k in range(shape[i])]
    hosts = {m // GPUS_PER_HOST for m in members}
    return len(members) // len(hosts), len(hosts)


def collective(kind: str, size: float, group: tuple[int, int], count: int = 1) -> dict:
    """Bytes each device sends, and their time, for `count` collectives over `group` = (g, h)
    whose buffers add up to `size` bytes.

    Buffer: all-reduce: the array; all-gather: its output; reduce-scatter: its input. Two levels, as
    NCCL's rings and trees over NVLink and one NIC per GPU behave: within a host f (g-1)/g x size
    over NVLink; across hosts each GPU's own NIC carries f (h-1)/h x size/g; f = 2 for an
    all-reduce, 1 for an all-gather or reduce-scatter. Plus a start-up latency per collective."""
    g, h = group
    f = 2 if kind == "all-reduce" else 1
    nvl = f * (g - 1) / g * size
    ib = f * (h - 1) / h * size / g
    lat = 0.0 if g * h == 1 else (LAT_IB if h > 1 else LAT_NVLINK)
    return {"bytes": nvl + ib, "time": nvl / NVLINK_BW + ib / IB_BW + count * lat}


def step_collectives(m: Model, lo: Layout) -> dict[str, dict]:
    """Per device and step: name -> {bytes, time, critical (on the critical path)}.
    Full remat: every forward collective of a layer runs twice (forward, recompute)."""
    out = {}
    n_tensors = 4 * m.layers + 2  # parameter arrays (qkvu, out, w12, w3 per layer; embed; LRPE)
    rest = {"data": lo.data, "context": lo.context}
    batchlike = tuple(a for a, n in rest.items() if n > 1)  # gradients are partial sums over these
    if lo.fsdp > 1:
        grp = group_shape(lo, ("fsdp",))
        rs = collective("reduce-scatter", GRAD_BYTES * m.params / lo.tensor, grp, n_tensors)
        ag = collective("all-gather", 2 * GATHER_BYTES * m.params / lo.tensor, grp, 2 * n_tensors)
        out["fsdp: weight all-gather x2 (bf16)"] = {**ag, "critical": False}
        out["fsdp: grad reduce-scatter (fp32)"] = {**rs, "critical": False}
    if batchlike:
        grp = group_shape(lo, batchlike)
        ar = collective("all-reduce", GRAD_BYTES * m.params / (lo.tensor * lo.fsdp), grp, n_tensors)
        out[f"{' x '.join(batchlike)}: grad all-reduce (fp32)"] = {**ar, "critical": False}
    if lo.tensor > 1:
        grp = group_shape(lo, ("tensor",))
        layer = collective("all-reduce", 6 * m.layers * ACT_BYTES * m.d * lo.tokens, grp, 6 * m.layers)
        ends = collective("all-reduce", 2 * 4 * m.d * lo.tokens, grp, 2)  # embedding lookup, loss d_hidden
        out["tensor: activation all-reduce"] = {
            "bytes": layer["bytes"] + ends["bytes"], "time": layer["time"] + ends["time"], "critical": True}
    if lo.context > 1:
        grp = group_shape(lo, ("context",))
        b, t = 0.0, 0.0
        for l in range(m.layers):
            state = 4 * lo.rows * (m.heads / lo.tensor) * m.key_dim(l) * m.head_dim  # S_l, fp32
            for kind in ("all-gather", "all-gather", "reduce-scatter"):  # fwd, recompute, bwd
                c = collective(kind, lo.context * state, grp)
                b, t = b + c["bytes"], t + c["time"]
        out["context: state all-gather x2 + reduce-scatter"] = {"bytes": b, "time": t, "critical": True}
    return out


def compute_time(m: Model, lo: Layout) -> float:
    return lo.tokens / lo.tensor / m.tokens_per_s


def memory(m: Model, lo: Layout) -> tuple[float, float]:
    """(states, activations) bytes per device: 16 N / (fsdp x tensor); tokens x D x (2L + 4 + w/t)."""
    states = STATE_BYTES * m.params / (lo.fsdp * lo.tensor)
    acts = lo.tokens * m.d * (2 * m.layers + 4 + W_FIT / lo.tensor)
    return states, acts


def summarize(m: Model, lo: Layout) -> dict:
    colls = step_collectives(m, lo)
    comp = compute_time(m, lo)
    crit = sum(c["time"] for c in colls.values() if c["critical"])
    hideable = sum(c["time"] for c in colls.values() if not c["critical"])
    total = crit + hideable
    best = comp + crit + max(0.0, hideable - comp)
    states, acts = memory(m, lo)
    return {"colls": colls, "compute": comp, "comm": total, "ratio": total / comp,
            "eff_best": comp / best, "eff_worst": comp / (comp + total), "states": states, "acts": acts}


def fmt_bytes(x: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def fmt_time(x: float) -> str:
    return f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"


def table(m: Model, layouts: list[Layout]) -> str:
    source = "measured" if m is TNL_385M else "derived at the same MFU"
    title = (f"**{m.name}**: {m.params / 1e9:.3f} B parameters, {m.flops_per_token / 1e9:.2f} GFLOP per token, "
             f"{m.tokens_per_s / 1e3:.3g}K tokens/s per H200 ({source}).")
    columns = ("layout", "tokens / device", "collective (per device, per step)", "bytes sent", "time", "compute",
               "comm / compute", "efficiency", "memory: states + activations")
    lines = [title, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for lo in layouts:
        s = summarize(m, lo)
        used = (s["states"] + s["acts"]) / HBM_BUDGET
        fits = "**does not fit**" if used > 1 else "at the limit" if used > 0.9 else "fits"
        mem = f"{fmt_bytes(s['states'])} + {fmt_bytes(s['acts'])} ({fits})"
        first = True
        for name, c in s["colls"].items():
            head = (f"| {lo.label} | {lo.tokens:,.0f} |" if first else "| | |")
            tail = (f" {fmt_time(s['compute'])} | {s['ratio']:.3g} | {s['eff_worst']:.0%}-{s['eff_best']:.0%} | {mem} |"
                    if first else " | | | |")
            crit = " (critical path)" if c["critical"] else ""
            lines.append(f"{head} {name}{crit} | {fmt_bytes(c['bytes'])} | {fmt_time(c['time'])} |{tail}")
            first = False
    return "\n".join(lines)


LAYOUTS_385M = [
    Layout("data 64", data=64),
    Layout("fsdp 8 (host) x data 8", data=8, fsdp=8),
    Layout("tensor 8 (host) x data 8", data=8, tensor=8),
    Layout("context 8 (host) x data 8, 1M-token sequences", data=8, context=8, seq_len=2**20, global_tokens=2**23),
    Layout("context 64, one 1M-token sequence", context=64, seq_len=2**20, global_tokens=2**20),
    Layout("data 64, 128K tokens per step", data=64, global_tokens=2**17),
]
LAYOUTS_7B = [
    Layout("data 64", data=64),
    Layout("fsdp 8 (host) x data 8", data=8, fsdp=8),
    Layout("tensor 8 (host) x data 8", data=8, tensor=8),
    Layout("fsdp 8 x context 8 (host), 1M-token sequences", fsdp=8, context=8, seq_len=2**20, global_tokens=2**23),
    Layout("fsdp 8 (host) x data 8, 128K tokens per step", data=8, fsdp=8, global_tokens=2**17),
]


def break_even_tokens(m: Model, lo: Layout) -> float:
    """Tokens per device at which the (batch-independent) gradient collectives take as long as the
    compute: below it they can no longer hide behind the backward."""
    grads = sum(c["time"] for n, c in step_collectives(m, lo).items() if not c["critical"])
    return grads * m.tokens_per_s * lo.tensor


def ring_attention_ratio(lo: Layout, m: Model) -> tuple[float, float]:
    """(bytes a device receives per layer and forward pass: ring attention's K, V in bf16; ours)."""
    t_local = lo.seq_len / lo.context
    ring = (lo.context - 1) * lo.rows * t_local * 2 * m.heads * m.head_dim * ACT_BYTES
    ours = (lo.context - 1) * 4 * lo.rows * m.heads * m.head_dim * m.head_dim
    return ring, ours


def main() -> None:
    print(f"MFU of the measured TNL-385M figure: {MFU:.1%}; fitted working set w = {W_FIT:.1f} x D bytes/token\n")
    for m, layouts in ((TNL_385M, LAYOUTS_385M), (TNL_7B, LAYOUTS_7B)):
        print(table(m, layouts) + "\n")
        for lo in layouts[:3]:
            print(f"- {m.name}, {lo.label}: gradient collectives equal compute at "
                  f"{break_even_tokens(m, lo):,.0f} tokens per device")
        print()
    lo = LAYOUTS_385M[3]
    ring, ours = ring_attention_ratio(lo, TNL_385M)
    print(f"1M tokens over context 8, per layer and forward pass, bytes a device receives: ring attention "
          f"{fmt_bytes(ring)}, lightning state {fmt_bytes(ours)} (ratio {ring / ours:.0f} = slice / head_dim)")
    self_check()
    print("\nself-check passed")


def self_check() -> None:
    """Totals checked against TNLConfig (values printed by lightning_jax.models.config at the time of
    writing) and against hand arithmetic of the formulas."""
    assert TNL_385M.params == 398_984_192 and TNL_385M.flops_per_token == 2_452_488_192
    assert TNL_7B.params == 6_836_719_616 and TNL_7B.flops_per_token == 41_311_272_960
    assert abs(MFU - 0.310) < 0.001 and 50 < W_FIT < 65
    # Axis placement: the last axis of size 8 lies within a host.
    assert group_shape(LAYOUTS_385M[1], ("fsdp",)) == (8, 1)
    assert group_shape(LAYOUTS_385M[1], ("data",)) == (1, 8)
    assert group_shape(LAYOUTS_385M[0], ("data",)) == (8, 8)
    assert group_shape(LAYOUTS_385M[3], ("data", "context")) == (8, 8)
    # data 64, 385M: all-reduce of 4N bytes; NVLink 2 * 7/8 * 4N, IB 2 * 7/8 * 4N / 8.
    n4 = 4 * TNL_385M.params
    c = step_collectives(TNL_385M, LAYOUTS_385M[0])["data: grad all-reduce (fp32)"]
    assert math.isclose(c["bytes"], 1.75 * n4 * (1 + 1 / 8))
    assert math.isclose(c["time"], 1.75 * n4 / NVLINK_BW + 1.75 * n4 / 8 / IB_BW + 98 * LAT_IB)
    # context 8, 385M, 1M tokens: S = 4 * 1 * 8 * dk * 128 (dk 256 on layer 0, 128 on 23 layers);
    # 3 collectives per layer, each sending 7 S; 2 x 7 x sum S received forward, 7 x sum S sent backward.
    sum_s = 4 * 8 * 128 * (256 + 23 * 128)
    c = step_collectives(TNL_385M, LAYOUTS_385M[3])["context: state all-gather x2 + reduce-scatter"]
    assert math.isclose(c["bytes"], 3 * 7 * sum_s)
    assert sum_s == 12.5 * 2**20
    ring, ours = ring_attention_ratio(LAYOUTS_385M[3], TNL_385M)
    assert ring / ours == 2**17 / 128
    # Compute: tokens / tokens_per_s.
    assert math.isclose(compute_time(TNL_385M, LAYOUTS_385M[0]), 2**15 / 125e3)


if __name__ == "__main__":
    main()
