"""The training configuration: frozen dataclasses, checked field by field.

The CLI reads ml_collections config files (train/configs/*.py) and hands `config.to_dict()` to
`TrainConfig.from_dict`; notebooks build `TrainConfig(...)` directly. Every check raises `ConfigError`
(an `lightning_jax.checks.ArgumentError`) whose field is the dotted path from the root
(``config.optim.lr: got -1.0, expected ...``), so the CLI can print it as one line and exit 2.
Sections check their own fields with the shared `lightning_jax.checks` functions and nest the
field under their path with `ArgumentError.under`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from lightning_jax.checks import (
    ArgumentError,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
    fail,
    is_int,
)

ROOT = "config"

# Tokens per device per block of the blocked cross-entropy (training/loss.py): its float32 logits
# block is this x vocab x 4 bytes (1 GiB at vocab 64000), never the whole [tokens, vocab].
DEFAULT_LOSS_BLOCK_TOKENS = 4096


class ConfigError(ArgumentError):
    """A bad configuration value; `field` is its dotted path (``config.optim.lr``)."""


def as_config_error(error: Exception, path: str = "") -> ConfigError:
    """`error` as a ConfigError under ``config.<path>``: an ArgumentError keeps its field (nested
    under the path); any other error's message becomes the detail of the path itself."""
    if isinstance(error, ArgumentError):
        field, detail = error.field, error.detail
    else:
        field, detail = "", str(error)
    return ConfigError(field, detail).under(f"{ROOT}.{path}" if path else ROOT)


class _Checked:
    """Runs `_check` after construction and reports its failures under ``config.<_path>``."""

    _path = ""

    def __post_init__(self):
        try:
            self._check()
        except ConfigError:
            raise
        except ArgumentError as e:
            raise as_config_error(e, self._path) from None

    def _check(self) -> None:
        raise NotImplementedError

    def _int(self, name: str, **bounds) -> None:
        # Stored as a Python int (a numpy integer would not survive the checkpoint's JSON meta).
        object.__setattr__(self, name, check_int(name, getattr(self, name), **bounds))

    def _bool(self, name: str) -> None:
        object.__setattr__(self, name, check_bool(name, getattr(self, name)))

    def _float(self, name: str, **bounds) -> None:
        check_float(name, getattr(self, name), **bounds)


@dataclasses.dataclass(frozen=True)
class ModelSpec(_Checked):
    """Which model: `arch` ("tnl" or "transformer"), a preset classmethod of its config dataclass
    (e.g. "tiny", "tnl_385m"), and field overrides applied on top of the preset
    (lightning_jax.models.registry builds it)."""

    arch: str = "tnl"
    preset: str = "tiny"
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    _path = "model"

    def _check(self):
        check_choice("arch", self.arch, ("tnl", "transformer"))
        check_str("preset", self.preset)


@dataclasses.dataclass(frozen=True)
class DataConfig(_Checked):
    """`corpus`: "shakespeare" (shipped) or a directory (see lightning_jax.training.data).
    `batch_size` is global (all processes, all devices) in sequences of `seq_len` tokens per step.
    `document_mask`: keep the documents packed into a row apart (TNL): attention does not cross
    a document boundary, LRPE positions restart, and the loss skips the target across it."""

    corpus: str = "shakespeare"
    tokenizer: str = "byte"
    seq_len: int = 256
    batch_size: int = 16
    document_mask: bool = False

    _path = "data"

    def _check(self):
        check_str("corpus", self.corpus)
        check_str("tokenizer", self.tokenizer)
        self._int("seq_len", minimum=2)
        self._int("batch_size", minimum=1)
        self._bool("document_mask")


@dataclasses.dataclass(frozen=True)
class OptimConfig(_Checked):
    """AdamW with linear warmup to `lr`, cosine decay to `lr * min_lr_ratio` at the last step, and
    global-norm clipping. `grad_accum_steps` splits each step's batch into that many microbatches.
    `loss_block_tokens`: the cross-entropy (training and evaluation) computes the logits of this many
    tokens per device at a time (training/loss.py); 0 (or None) computes all the logits at once.
    `time_chunk_tokens`: sequences longer than this run through the model this many tokens at a
    time, each layer's state carried from chunk to chunk (training/chunked.py, TNL only): activation
    memory follows the chunk, not the sequence, at the FLOPs of full remat (set `model.remat` to
    "none" with it: the chunk is already recomputed). 0 keeps sequences whole."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum_steps: int = 1
    loss_block_tokens: int = DEFAULT_LOSS_BLOCK_TOKENS
    time_chunk_tokens: int = 0

    _path = "optim"

    def _check(self):
        self._float("lr", low=0.0, open_low=True)
        self._float("min_lr_ratio", low=0.0, high=1.0)
        self._int("warmup_steps", minimum=0)
        self._float("b1", low=0.0, high=1.0)
        self._float("b2", low=0.0, high=1.0)
        self._float("eps", low=0.0, open_low=True)
        self._float("weight_decay", low=0.0)
        self._float("clip_norm", low=0.0, open_low=True)
        self._int("grad_accum_steps", minimum=1)
        if self.loss_block_tokens is None:
            object.__setattr__(self, "loss_block_tokens", 0)
        self._int("loss_block_tokens", minimum=0)
        self._int("time_chunk_tokens", minimum=0)


@dataclasses.dataclass(frozen=True)
class MeshConfig(_Checked):
    """Device mesh ("data", "fsdp", "tensor", "context"); -1 takes the devices the others leave
    (data, fsdp or tensor). `context` splits each sequence over that many devices (context
    parallelism, TNL only; data.seq_len must be a multiple of it)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    context: int = 1

    _path = "mesh"

    def _check(self):
        self._int("context", minimum=1)
        for name in ("data", "fsdp", "tensor"):
            value = getattr(self, name)
            if not (is_int(value) and (value >= 1 or value == -1)):
                fail(name, value, "a positive integer or -1 (the remaining devices)")
            object.__setattr__(self, name, int(value))
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            fail("", (self.data, self.fsdp, self.tensor), "at most one axis of -1")  # the section itself


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Checked):
    """Save every `every_steps` steps and at the end (asynchronously), keep the newest `keep`."""

    enabled: bool = True
    every_steps: int = 500
    keep: int = 3
    async_save: bool = True

    _path = "checkpoint"

    def _check(self):
        self._bool("enabled")
        self._int("every_steps", minimum=1)
        self._int("keep", minimum=1)
        self._bool("async_save")


@dataclasses.dataclass(frozen=True)
class EvalConfig(_Checked):
    """Validation every `every_steps` (0: only at the end) over the first `max_tokens` held-out
    tokens: 0 (default) the whole split when it holds at most 1,048,576 tokens, else its first
    1,048,576 (evaluation.AUTO_MAX_TOKENS); -1 the whole split whatever its size. `batch_size` 0
    uses data.batch_size. `pmap` selects the jax.pmap path."""

    every_steps: int = 200
    max_tokens: int = 0
    batch_size: int = 0
    pmap: bool = False

    _path = "eval"

    def _check(self):
        self._int("every_steps", minimum=0)
        self._int("max_tokens", minimum=-1)
        self._int("batch_size", minimum=0)
        self._bool("pmap")


@dataclasses.dataclass(frozen=True)
class LogConfig(_Checked):
    """Metrics every `every_steps`. `peak_tflops_per_device` for MFU (0: look it up from the device
    kind; unknown kinds, such as CPUs, log mfu = null)."""

    every_steps: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    peak_tflops_per_device: float = 0.0

    _path = "log"

    def _check(self):
        self._int("every_steps", minimum=1)
        self._bool("progress_bar")
        self._bool("tensorboard")
        self._float("peak_tflops_per_device", low=0.0)


_SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "eval": EvalConfig,
    "log": LogConfig,
}


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Checked):
    """Everything a run needs. `steps` optimizer updates; `workdir` holds checkpoints/ and
    metrics.jsonl; `seed` fixes initialisation and the data order. `init_from`: a TransNormerLLM
    checkpoint directory (official Hugging Face layout, models/hf_tnl.py) to start from instead of a
    random initialisation; its config.json then fixes the model's architecture, and `model` only
    the run's choices (dtype, param_dtype, scan_layers, remat, attention implementation)."""

    steps: int
    workdir: str
    seed: int = 0
    init_from: str = ""
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)

    def _check(self):
        self._int("steps", minimum=1)
        check_str("workdir", self.workdir)
        if not self.workdir:
            fail("workdir", self.workdir, "a directory path")
        self._int("seed", minimum=0)
        check_str("init_from", self.init_from)
        if self.init_from and self.model.arch != "tnl":
            fail("init_from", self.init_from,
                 f"'' for model.arch={self.model.arch!r}: only TransNormerLLM (tnl) checkpoints load")
        if self.data.batch_size % self.optim.grad_accum_steps:
            fail(
                "optim.grad_accum_steps",
                self.optim.grad_accum_steps,
                f"a divisor of data.batch_size={self.data.batch_size}",
            )
        if self.mesh.context > 1:
            if self.model.arch != "tnl":
                fail("mesh.context", self.mesh.context,
                     f"1 for model.arch={self.model.arch!r}: context parallelism (time split over devices) "
                     "is only implemented for TNL's lightning attention")
            if self.data.seq_len % self.mesh.context:
                fail("data.seq_len", self.data.seq_len,
                     f"a multiple of mesh.context={self.mesh.context} (each sequence is split evenly over "
                     "the context devices)")

        if self.data.document_mask:
            if self.model.arch != "tnl":
                fail("data.document_mask", True,
                     f"False for model.arch={self.model.arch!r}: document masks are implemented for TNL's "
                     "lightning attention only")

        if self.optim.time_chunk_tokens:
            if self.model.arch != "tnl":
                fail("optim.time_chunk_tokens", self.optim.time_chunk_tokens,
                     f"0 for model.arch={self.model.arch!r}: chunked sequences need a recurrent state (TNL)")
            if self.optim.time_chunk_tokens % self.mesh.context:
                fail("optim.time_chunk_tokens", self.optim.time_chunk_tokens,
                     f"a multiple of mesh.context={self.mesh.context} (each chunk is split evenly over "
                     "the context devices)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Builds from nested mappings (e.g. `ConfigDict.to_dict()`); unknown or missing fields raise
        ConfigError naming them."""
        d = dict(d)
        for required in ("steps", "workdir"):
            if required not in d:
                raise ConfigError(required, "missing, every config needs steps, workdir and seed").under(ROOT)
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in ("steps", "workdir", "seed", "init_from"):
                kwargs[key] = value
            elif key == "model":
                model = dict(value)
                spec = {k: model.pop(k) for k in ("arch", "preset") if k in model}
                overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
                kwargs["model"] = ModelSpec(**spec, overrides=overrides)
            elif key in _SECTIONS:
                kwargs[key] = _section(key, _SECTIONS[key], value)
            else:
                known = ["steps", "workdir", "seed", "init_from", "model", *_SECTIONS]
                raise ConfigError(key, f"unknown field, expected one of {known}").under(ROOT)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = {"arch": self.model.arch, "preset": self.model.preset, **dict(self.model.overrides)}
        return d


def _section(name: str, cls, value):
    if not isinstance(value, Mapping):
        raise as_config_error(ArgumentError("", f"got {value!r}, expected a mapping of fields"), name)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in value:
        if key not in known:
            raise as_config_error(ArgumentError(key, f"unknown field, expected one of {sorted(known)}"), name)
    return cls(**value)
