"""Metrics: `workdir/metrics.jsonl` (one JSON object per line), optional TensorBoard, MFU.

Training rows: step, loss, lr, grad_norm, tokens_per_sec, tokens_per_sec_per_device, mfu (null when
the device's peak is unknown, e.g. on CPU), peak_memory_gib (the most device memory in use so far,
max over this process's devices; null where the backend does not report it, e.g. on CPU). Evaluation rows: step, eval_loss, eval_perplexity,
eval_tokens. Only process 0 writes; every line is flushed at once, so a crash loses nothing logged.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

# Dense bf16 peak per device, FLOP/s (vendor spec). Matched against `device_kind`.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v4": 275e12,
}


def peak_flops_per_device(device=None, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: `override_tflops` * 1e12 if given, else looked up, else None."""
    if override_tflops:
        return override_tflops * 1e12
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_sec_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s per device over the device's peak."""
    if not peak:
        return None
    return flops_per_token * tokens_per_sec_per_device / peak


def peak_memory_gib(devices=None) -> float | None:
    """The most memory in use so far on any of `devices` (default: this process's), in GiB, from
    the allocator's `peak_bytes_in_use`; None where the backend has no memory stats (CPU)."""
    peaks = []
    for device in devices if devices is not None else jax.local_devices():
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
    return round(max(peaks) / 2**30, 3) if peaks else None


def read_metrics(path: str) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (a missing file is empty); a torn last line is skipped."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a kill mid-write
    return rows


class MetricsWriter:
    """Appends rows to `workdir/metrics.jsonl` (and TensorBoard if asked and installed) on process 0;
    a no-op elsewhere."""

    def __init__(self, workdir: str, *, tensorboard: bool = False, active: bool | None = None):
        self.active = jax.process_index() == 0 if active is None else active
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(workdir, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = _tensorboard_writer(os.path.join(workdir, "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Drops rows with step > `step`: a resumed run repeats those steps, and one curve per run
        reads better than a curve that doubles back."""
        if not self.active:
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        self._file.close()
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, self.path)  # atomic: a kill here leaves the old or the new file, whole
        self._file = open(self.path, "a")

    def write(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        row = {k: _plain(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, row["step"])
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _plain(value):
    """Python scalars from numpy / jax ones. NaN stays NaN (Python's json reads and writes it): a
    diverged loss must show in the log, not turn into a missing value."""
    return value.item() if hasattr(value, "item") else value


def _tensorboard_writer(logdir: str):
    """A SummaryWriter from tensorboardX or torch if one is installed, else None (TensorBoard is
    optional; clu's writer would pull in TensorFlow)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logging.getLogger(__name__).warning(
                "log.tensorboard: neither tensorboardX nor torch is installed; writing metrics.jsonl only"
            )
            return None
    return SummaryWriter(logdir)
