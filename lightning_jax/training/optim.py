"""The optimizer: AdamW, linear warmup then cosine decay, global-norm clipping, and weight decay only
on weight matrices (not on norms, embeddings, LRPE angles or any vector).

Parameters are stored in float32 (`param_dtype`) and the model computes in bfloat16 (`dtype`), so
the optimizer always updates float32 master weights; nothing here casts.
"""

from __future__ import annotations

import re

import jax
import optax

from lightning_jax.training.config import OptimConfig

# Parameter paths matching this get no weight decay. Embeddings: decaying them shrinks rare tokens'
# rows toward zero; norms and scales: decay pulls them away from 1, fighting the normalisation.
NO_DECAY_PATTERN = re.compile(r"embed|norm|scale|bias|theta|lrpe", re.IGNORECASE)


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then cosine to lr * min_lr_ratio at `total_steps`."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=config.lr * config.min_lr_ratio,
    )


def path_name(path) -> str:
    """A pytree key path as "a/b/0" (dict keys, attribute names and sequence indices joined by /)."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def weight_decay_mask(params):
    """True for parameters that get weight decay: matrices (ndim >= 2) whose path names no
    embedding, norm, scale, bias or LRPE angle. A pytree of bools shaped like `params`."""

    def decays(path, leaf) -> bool:
        return getattr(leaf, "ndim", 0) >= 2 and not NO_DECAY_PATTERN.search(path_name(path))

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, decoupled weight decay on `weight_decay_mask`)."""
    return optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(
            learning_rate_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=weight_decay_mask,
        ),
    )
