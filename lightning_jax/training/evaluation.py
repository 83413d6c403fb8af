"""Validation loss: the `Evaluator` (a jit path over the mesh and a `jax.pmap` path) and
`evaluate(config, workdir)`, which restores a checkpoint and evaluates it."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from lightning_jax.checks import fail
from lightning_jax.training import data as data_lib
from lightning_jax.training import metrics as metrics_lib
from lightning_jax.training import step as step_lib
from lightning_jax.training.config import ConfigError
from lightning_jax.training.run import (
    Run,
    as_config,
    check_workdir,
    global_batch,
    local_rows,
    restore_run,
)

log = logging.getLogger(__name__)


# eval.max_tokens = 0 (the default) evaluates the whole held-out split when it holds at most this many
# tokens (the demo's two plays: 202 K), else its first this many: a fixed, seed-independent set that
# a large corpus (FineWeb) does not turn into an hour-long evaluation.
AUTO_MAX_TOKENS = 1 << 20


def eval_token_limit(max_tokens: int) -> int | None:
    """The number of held-out tokens to evaluate for `config.eval.max_tokens` (None: all): -1 all,
    0 all up to AUTO_MAX_TOKENS, N > 0 the first N."""
    if max_tokens == -1:
        return None
    return max_tokens or AUTO_MAX_TOKENS


def eval_rows(cfg, tokenizer):
    """The validation rows `cfg.eval.max_tokens` selects (`data.validation_rows`); says so in one log
    line when the default cut a split larger than AUTO_MAX_TOKENS."""
    tokens, weights = data_lib.validation_rows(
        cfg.data.corpus, tokenizer, seq_len=cfg.data.seq_len, max_tokens=eval_token_limit(cfg.eval.max_tokens)
    )
    if cfg.eval.max_tokens == 0 and int(weights.sum()) >= AUTO_MAX_TOKENS and jax.process_index() == 0:
        log.warning(f"eval: the held-out split is larger than {AUTO_MAX_TOKENS} tokens; evaluating its first "
                    f"{AUTO_MAX_TOKENS} (config.eval.max_tokens=-1 evaluates all of it, N the first N)")
    return tokens, weights


class Evaluator:
    """Validation loss over the held-out rows: `evaluator(state) -> {"eval_loss", ...}`.

    Both paths compute sum(loss * weight) and sum(weight) per global batch and add the batches in
    float64 on the host: "jit" as one sharded program over the mesh (the same layout as training);
    "pmap" with `jax.pmap` over this process's devices and a psum over all devices.
    """

    def __init__(self, run: Run, *, pmap: bool | None = None):
        self.run = run
        cfg = run.config
        self.pmap = cfg.eval.pmap if pmap is None else pmap
        self.batch_size = cfg.eval.batch_size or cfg.data.batch_size
        if self.pmap and self.batch_size % jax.device_count():
            fail("config.eval.batch_size", self.batch_size,
                 f"a multiple of the {jax.device_count()} devices for eval.pmap", kind=ConfigError)
        self.tokens, self.weights = eval_rows(cfg, run.tokenizer)
        # Documents are the runs between EOS ids (data.segment_ids_from_eos); None: not kept apart.
        self.segment_ids = (data_lib.segment_ids_from_eos(self.tokens, data_lib.open_corpus(cfg.data.corpus).eos_id(
            run.tokenizer)) if cfg.data.document_mask else None)
        loss = dict(loss_block_tokens=cfg.optim.loss_block_tokens, time_chunk_tokens=cfg.optim.time_chunk_tokens)
        self._jit = step_lib.make_eval_sums(run.graphdef, **loss)
        self._pmap = step_lib.make_pmap_eval_sums(run.graphdef, **loss) if self.pmap else None

    def __call__(self, state) -> dict[str, float]:
        total = count = 0.0
        if self.pmap:
            params, rest = self._local_replicas(state)
            devices = jax.local_device_count()
        rows = (self.tokens, self.weights) + (() if self.segment_ids is None else (self.segment_ids,))
        for batch in data_lib.validation_batches(self.batch_size, *rows):
            local = [local_rows(a) for a in batch]  # tokens, weights[, segment ids]
            if self.pmap:
                s, n = self._pmap(params, rest, *(a.reshape(devices, -1, a.shape[-1]) for a in local))
                s, n = s[0], n[0]
            else:
                with jax.set_mesh(self.run.mesh):
                    s, n = self._jit(state["params"], state["rest"],
                                     *(global_batch(self.run, a, self.batch_size) for a in local))
            total += float(s)
            count += float(n)
        loss = total / count
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0)), "eval_tokens": int(count)}

    def _local_replicas(self, state):
        """Whole copies of params and rest on this process (pmap broadcasts them to its devices)."""
        replicated = NamedSharding(self.run.mesh, P())
        tree = (state["params"], state["rest"])
        with jax.set_mesh(self.run.mesh):
            tree = jax.jit(lambda t: t, out_shardings=replicated)(tree)
        return jax.tree.map(lambda x: x.addressable_data(0), tree)


def evaluate(config, workdir: str | None = None, *, step: int | None = None, pmap: bool | None = None,
             tokenizer=None, write_metrics: bool = True) -> dict[str, Any]:
    """Restores checkpoint `step` (default: the newest intact one; damaged ones are named in a log
    line and skipped) of `workdir` onto this config's mesh and returns {"step", "eval_loss",
    "eval_perplexity", "eval_tokens"}; also appends the row to metrics.jsonl (marked "mode":
    "eval") unless `write_metrics` is False."""
    config = as_config(config, workdir)
    if write_metrics and os.path.isdir(config.workdir):
        check_workdir(config.workdir)  # metrics.jsonl is written at the end: say so before compiling
    run, state = restore_run(config, tokenizer, step)
    run.state = None
    row = {"step": int(state["step"]), **Evaluator(run, pmap=pmap)(state)}
    if write_metrics:
        writer = metrics_lib.MetricsWriter(config.workdir)
        writer.write({**row, "mode": "eval"})
        writer.close()
    return row
