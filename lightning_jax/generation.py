"""Sampling from a model with `prefill` / `decode` (TNL, Transformer): jitted, left-padded batches.

Prompts of different lengths are left-padded to one length, so every row's next token sits in the
last column and one `decode` call advances all rows together. Pad positions are recognised as the
leading run of `pad_id` in each row (or given by `pad_mask`); the models zero their contribution,
so a padded row generates exactly what it would alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from lightning_jax import checks


def generate(
    model: nnx.Module,
    prompt_tokens: jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: jax.Array,
    pad_id: int = 0,
    pad_mask: jax.Array | None = None,
) -> jax.Array:
    """Samples `max_new_tokens` tokens after each (left-padded) prompt.

    Args:
      model: a model with `prefill(tokens, pad_mask=, max_new_tokens=)` and `decode(token, cache)`.
      prompt_tokens: [batch, prompt_len] int, left-padded with `pad_id`.
      max_new_tokens: number of tokens to generate (>= 1; static: one compilation per value).
      temperature: softmax temperature; 0 means greedy (argmax).
      top_k: keep only the k most likely tokens (static), or None.
      top_p: nucleus sampling, keep the smallest set of tokens with probability >= top_p, or None.
      rng: a PRNG key.
      pad_id: the padding token; only a row's leading run of it counts as padding.
      pad_mask: [batch, prompt_len] bool, True at real tokens; overrides `pad_id` when given.

    Returns:
      [batch, max_new_tokens] int32: the generated tokens (the prompt not included).
    """
    prompt_tokens = jnp.asarray(prompt_tokens)
    if prompt_tokens.ndim != 2 or not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise checks.ArgumentError(
            "prompt_tokens",
            f"got shape {prompt_tokens.shape} dtype {prompt_tokens.dtype}, expected int [batch, prompt_len]",
        )
    checks.check_int("max_new_tokens", max_new_tokens, minimum=1)
    if top_k is not None:
        checks.check_int("top_k", top_k, minimum=1)
    if top_p is not None:
        checks.check_float("top_p", top_p, low=0.0, high=1.0, open_low=True)
    if not isinstance(temperature, jax.Array):  # a traced temperature is trusted
        checks.check_float("temperature", temperature, low=0.0)
    if pad_mask is None:
        # Leading pads only: a pad_id inside the prompt is a real token.
        pad_mask = jnp.cumsum(prompt_tokens != pad_id, axis=1) > 0
    elif pad_mask.shape != prompt_tokens.shape:
        raise checks.ArgumentError("pad_mask", f"got shape {pad_mask.shape}, expected {prompt_tokens.shape}")
    graphdef, state = nnx.split(model)
    return _generate(
        graphdef, state, prompt_tokens.astype(jnp.int32), jnp.asarray(pad_mask, bool), rng,
        jnp.asarray(temperature, jnp.float32), None if top_p is None else jnp.asarray(top_p, jnp.float32),
        max_new_tokens=max_new_tokens, top_k=top_k,
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k"))
def _generate(graphdef, state, prompt_tokens, pad_mask, rng, temperature, top_p, *, max_new_tokens, top_k):
    model = nnx.merge(graphdef, state)
    logits, cache = model.prefill(prompt_tokens, pad_mask=pad_mask, max_new_tokens=max_new_tokens)
    first = sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_k, top_p)

    def step(carry, i):
        token, cache = carry
        logits, cache = model.decode(token, cache)
        token = sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
        return (token, cache), token

    _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def sample_logits(logits, key, temperature, top_k: int | None = None, top_p=None) -> jax.Array:
    """logits [batch, vocab] -> tokens [batch] int32; temperature 0 -> argmax."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][:, -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p is not None:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token if the mass before it is < top_p (the most likely token is always kept).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)
