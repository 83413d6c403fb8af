"""The training configuration: frozen dataclasses, checked field by field.

The CLI reads ml_collections config files (train/configs/*.py) and hands `config.to_dict()` to
`TrainConfig.from_dict`; notebooks build `TrainConfig(...)` directly. Every check raises `ConfigError`
whose message starts with the dotted field name (``config.optim.lr: got -1.0, expected ...``), so the
CLI can print it as one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


class ConfigError(ValueError):
    """A bad configuration value; the message names the field."""


def _fail(field: str, value, expected: str):
    raise ConfigError(f"config.{field}: got {value!r}, expected {expected}")


def _int(field: str, value, minimum: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        _fail(field, value, f"an integer >= {minimum}" if minimum is not None else "an integer")


def _float(field: str, value, *, low: float = -math.inf, high: float = math.inf, open_low: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        _fail(field, value, f"a finite number in {'(' if open_low else '['}{low}, {high}]")


def _bool(field: str, value):
    if not isinstance(value, bool):
        _fail(field, value, "True or False")


def _str(field: str, value, choices=None):
    if not isinstance(value, str) or (choices is not None and value not in choices):
        _fail(field, value, f"one of {list(choices)}" if choices else "a string")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Which model: `arch` ("tnl" or "transformer"), a preset classmethod of its config dataclass
    (e.g. "tiny", "tnl_385m"), and field overrides applied on top of the preset."""

    arch: str = "tnl"
    preset: str = "tiny"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        _str("model.arch", self.arch, ("tnl", "transformer"))
        _str("model.preset", self.preset)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`corpus`: "shakespeare" (shipped) or a directory (see lightning_jax.training.data).
    `batch_size` is global (all processes, all devices) in sequences of `seq_len` tokens per step."""

    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 16

    def __post_init__(self):
        _str("data.corpus", self.corpus)
        _str("data.tokenizer", self.tokenizer)
        _int("data.seq_len", self.seq_len, 2)
        _int("data.batch_size", self.batch_size, 1)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup to `lr`, cosine decay to `lr * min_lr_ratio` at the last step, and
    global-norm clipping. `grad_accum_steps` splits each step's batch into that many microbatches."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1

    def __post_init__(self):
        _float("optim.lr", self.lr, low=0.0, open_low=True)
        _float("optim.min_lr_ratio", self.min_lr_ratio, low=0.0, high=1.0)
        _int("optim.warmup_steps", self.warmup_steps, 0)
        _float("optim.b1", self.b1, low=0.0, high=1.0)
        _float("optim.b2", self.b2, low=0.0, high=1.0)
        _float("optim.eps", self.eps, low=0.0, open_low=True)
        _float("optim.weight_decay", self.weight_decay, low=0.0)
        _float("optim.clip_norm", self.clip_norm, low=0.0, open_low=True)
        _int("optim.grad_accum_steps", self.grad_accum_steps, 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ("data", "fsdp", "tensor"); -1 takes the devices the others leave."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
                _fail(f"mesh.{name}", value, "a positive integer or -1 (the remaining devices)")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            _fail("mesh", (self.data, self.fsdp, self.tensor), "at most one axis of -1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Save every `every_steps` steps and at the end (asynchronously), keep the newest `keep`."""

    enabled: bool = True
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _bool("checkpoint.enabled", self.enabled)
        _int("checkpoint.every_steps", self.every_steps, 1)
        _int("checkpoint.keep", self.keep, 1)
        _bool("checkpoint.async_save", self.async_save)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation every `every_steps` (0: only at the end) over the first `max_tokens` held-out
    tokens (0: all). `batch_size` 0 uses data.batch_size. `pmap` selects the jax.pmap path."""

    every_steps: int = 200
    max_tokens: int = 0
    batch_size: int = 0
    pmap: bool = False

    def __post_init__(self):
        _int("eval.every_steps", self.every_steps, 0)
        _int("eval.max_tokens", self.max_tokens, 0)
        _int("eval.batch_size", self.batch_size, 0)
        _bool("eval.pmap", self.pmap)


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Metrics every `every_steps`. `peak_tflops_per_device` for MFU (0: look it up from the device
    kind; unknown kinds, such as CPUs, log mfu = null)."""

    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    peak_tflops_per_device: float = 0.0

    def __post_init__(self):
        _int("log.every_steps", self.every_steps, 1)
        _bool("log.progress_bar", self.progress_bar)
        _bool("log.tensorboard", self.tensorboard)
        _float("log.peak_tflops_per_device", self.peak_tflops_per_device, low=0.0)


_SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. `steps` optimizer updates; `workdir` holds checkpoints/ and
    metrics.jsonl; `seed` fixes initialisation and the data order."""

    steps: int
    workdir: str
    seed: int = 0
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def __post_init__(self):
        _int("steps", self.steps, 1)
        _str("workdir", self.workdir)
        if not self.workdir:
            _fail("workdir", self.workdir, "a directory path")
        _int("seed", self.seed, 0)
        if self.data.batch_size % self.optim.grad_accum_steps:
            _fail(
                "optim.grad_accum_steps",
                self.optim.grad_accum_steps,
                f"a divisor of data.batch_size={self.data.batch_size}",
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Builds from nested mappings (e.g. `ConfigDict.to_dict()`); unknown or missing fields raise
        ConfigError naming them."""
        d = dict(d)
        for required in ("steps", "workdir"):
            if required not in d:
                raise ConfigError(f"config.{required}: missing, every config needs steps, workdir and seed")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in ("steps", "workdir", "seed"):
                kwargs[key] = value
            elif key == "model":
                model = dict(value)
                spec = {k: model.pop(k) for k in ("arch", "preset") if k in model}
                overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
                kwargs["model"] = ModelSpec(**spec, overrides=overrides)
            elif key in _SECTIONS:
                kwargs[key] = _section(key, _SECTIONS[key], value)
            else:
                known = ["steps", "workdir", "seed", "model", *_SECTIONS]
                raise ConfigError(f"config.{key}: unknown field, expected one of {known}")
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"arch": self.model.arch, "preset": self.model.preset, **dict(self.model.overrides)}
        return d


def _section(name: str, cls, value):
    if not isinstance(value, Mapping):
        _fail(name, value, "a mapping of fields")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            raise ConfigError(f"config.{name}.{key}: unknown field, expected one of {sorted(known)}")
    return cls(**value)
