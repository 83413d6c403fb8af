"""Sampling from a model with `prefill` / `decode` (TNL, Transformer): jitted, left-padded batches.

Prompts of different lengths are left-padded to one length, so every row's next token sits in the
last column and one `decode` call advances all rows together. Pad positions are recognised as the
leading run of `pad_id` in each row (or given by `pad_mask`); the models zero their contribution,
so a padded row generates exactly what it would alone.

Only the last prompt position's logits are computed (`prefill(..., logits="last")`): a batch of
long prompts never holds [batch, time, vocab] logits. `prefill_chunk=C` (TNL) runs a prompt longer
than C tokens through the model C tokens at a time, so prefill memory follows the chunk and a
prompt of any length fits (the state does not grow).

`generate` runs everything in one `jit` and returns all tokens at the end; `Sampler` gives the same
tokens one step at a time (for streaming; `train/generate.py` is the command line). Prompt token ids
are checked before `jit`: ids outside [0, vocab_size) raise ArgumentError naming `prompt_tokens`
(inside `jit` they cannot be seen, and an id >= vocab_size would give NaN logits). A `generate` or
`Sampler` called with a traced prompt (inside an outer `jit`) trusts its ids.

Weight layout: both decode through `decoding_model(model)`, the same parameters laid out for
decoding (the same tokens): a model built with `scan_layers=True` (the training layout, and that of
its checkpoints) becomes one layer group per layer (`models.stack.relayout`: no per-step dynamic
slices of stacked weights and states), and every projection weight holds its input axes last
(`models.layers.inputs_last`: a matrix-vector product then reads its weight contiguously). On an
H200, TNL-385M's step at batch 64 took 1.43 ms unscanned against 3.07 ms scanned, and at batch 1
0.56 ms with the input axes last against 0.97 ms without. The conversion copies the projection
weights once per `generate` call and once per `Sampler` (a few ms; the copy lives as long as the
call / sampler).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightning_jax import checks
from lightning_jax.models.layers import check_token_range, inputs_last
from lightning_jax.models.stack import is_stacked, relayout


def decoding_model(model: nnx.Module) -> nnx.Module:
    """`model` laid out for decoding (a copy of its projection weights; it computes the same
    function): one group per layer where its layer groups are stacked (`scan_layers=True`;
    `relayout(model, scan=False)`), and every projection weight with its input axes last
    (`inputs_last`). On an H200 each halves the time of a TNL-385M decoding step: the first at
    batch 64, the second at batch 1."""
    if getattr(getattr(model, "config", None), "scan_layers", False) and is_stacked(model):
        model = relayout(model, scan=False)
    return inputs_last(model)


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
    prefill_chunk: int | None = None,
) -> jax.Array:
    """Samples `max_new_tokens` tokens after each (left-padded) prompt.

    Args:
      model: a model with `prefill(tokens, pad_mask=, max_new_tokens=, logits="last")`,
        `decode(token, cache)` and `config.vocab_size` (TNL, Transformer).
      prompt_tokens: [batch, prompt_len] int, left-padded with `pad_id`; ids in [0, vocab_size) at
        real positions (checked when concrete; pad positions may hold any id).
      max_new_tokens: number of tokens to generate (>= 1; static: one compilation per value).
      temperature: softmax temperature; 0 means greedy (argmax).
      top_k: keep only the k most likely tokens (static), or None.
      top_p: nucleus sampling, keep the smallest set of tokens with probability >= top_p, or None.
      rng: a PRNG key.
      pad_id: the padding token; only a row's leading run of it counts as padding.
      pad_mask: [batch, prompt_len] bool, True at real tokens; overrides `pad_id` when given.
      prefill_chunk: None, or (TNL only; static) run prompts longer than this many tokens through
        the model a chunk at a time (`TNL.prefill(chunk=)`): same tokens, one chunk's activations.

    The model is decoded as `decoding_model(model)` lays it out (one copy of its projection weights
    per call, freed at the end; the same function).

    Returns:
      [batch, max_new_tokens] int32: the generated tokens (the prompt not included).
    """
    prompt_tokens, pad_mask, temperature, top_p = _check_arguments(
        model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, pad_id, pad_mask, prefill_chunk)
    graphdef, state = nnx.split(decoding_model(model))
    return _generate(graphdef, state, prompt_tokens, pad_mask, rng, temperature, top_p,
                     max_new_tokens=max_new_tokens, top_k=top_k, prefill_chunk=prefill_chunk)


def _check_arguments(model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, pad_id, pad_mask,
                     prefill_chunk):
    """The checks of `generate` and `Sampler`. Returns (prompt_tokens int32 with 0 at pads, pad_mask
    bool, temperature float32, top_p float32 or None)."""
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
    if prefill_chunk is not None:
        checks.check_int("prefill_chunk", prefill_chunk, minimum=1)
        if not hasattr(model, "extend"):
            raise checks.ArgumentError(
                "prefill_chunk", f"got {prefill_chunk}, expected None for a {type(model).__name__}: only a model "
                                 "with a fixed-size state (TNL) prefills a chunk at a time")
    if pad_mask is None:
        # Leading pads only: a pad_id inside the prompt is a real token.
        pad_mask = jnp.cumsum(prompt_tokens != pad_id, axis=1) > 0
    elif pad_mask.shape != prompt_tokens.shape:
        raise checks.ArgumentError("pad_mask", f"got shape {pad_mask.shape}, expected {prompt_tokens.shape}")
    pad_mask = jnp.asarray(pad_mask, bool)
    # Pads may hold any id (-1 included): they are masked, and embedded as token 0.
    prompt_tokens = jnp.where(pad_mask, prompt_tokens, 0).astype(jnp.int32)
    try:
        check_token_range(prompt_tokens, model.config.vocab_size)
    except checks.ArgumentError as e:
        raise checks.ArgumentError("prompt_tokens", e.detail) from None
    if not isinstance(pad_mask, jax.core.Tracer):
        empty = np.flatnonzero(~np.asarray(pad_mask).any(axis=1))
        if empty.size:
            raise checks.ArgumentError("prompt_tokens", f"got no real token in rows {empty.tolist()} (all padding), "
                                                        "expected at least one per row")
    return (prompt_tokens, pad_mask, jnp.asarray(temperature, jnp.float32),
            None if top_p is None else jnp.asarray(top_p, jnp.float32))


def _first_token(model, prompt_tokens, pad_mask, rng, temperature, top_p, max_new_tokens, top_k, prefill_chunk):
    """Prefill and sample: -> (first new token [batch] int32, cache)."""
    chunk = {} if prefill_chunk is None else {"chunk": prefill_chunk}
    logits, cache = model.prefill(prompt_tokens, pad_mask=pad_mask, max_new_tokens=max_new_tokens,
                                  logits="last", **chunk)
    return sample_logits(logits, jax.random.fold_in(rng, 0), temperature, top_k, top_p), cache


def _next_token(model, token, cache, rng, i, temperature, top_p, top_k):
    """Decode token [batch] and sample new token `i`: -> (token [batch] int32, cache)."""
    logits, cache = model.decode(token, cache)
    return sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "prefill_chunk"))
def _generate(graphdef, state, prompt_tokens, pad_mask, rng, temperature, top_p, *, max_new_tokens, top_k,
              prefill_chunk):
    model = nnx.merge(graphdef, state)
    first, cache = _first_token(model, prompt_tokens, pad_mask, rng, temperature, top_p, max_new_tokens, top_k,
                                prefill_chunk)

    def step(carry, i):
        token, cache = carry
        token, cache = _next_token(model, token, cache, rng, i, temperature, top_p, top_k)
        return (token, cache), token

    _, rest = jax.lax.scan(step, (first, cache), jnp.arange(1, max_new_tokens))
    return jnp.concatenate([first[:, None], rest.T], axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "top_k", "prefill_chunk"))
def _prefill_step(graphdef, state, prompt_tokens, pad_mask, rng, temperature, top_p, *, max_new_tokens, top_k,
                  prefill_chunk):
    return _first_token(nnx.merge(graphdef, state), prompt_tokens, pad_mask, rng, temperature, top_p,
                        max_new_tokens, top_k, prefill_chunk)


@functools.partial(jax.jit, static_argnames=("graphdef", "treedef", "top_k"), donate_argnames=("cache",))
def _decode_step(leaves, token, cache, rng, i, temperature, top_p, *, graphdef, treedef, top_k):
    # The state comes as its flat list of arrays: a step is called once per token, and flattening
    # the model's State pytree (and hashing its graphdef) on every call costs more than the step.
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    return _next_token(model, token, cache, rng, i, temperature, top_p, top_k)


class Sampler:
    """`generate`, one step at a time: the same arguments give the same tokens (the same key is
    folded with the same step numbers), but each step returns to Python, for streaming.

        sampler = Sampler(model, prompt_tokens, 100, temperature=0.8, top_k=40, rng=jax.random.key(0))
        for token in sampler:          # max_new_tokens arrays of [batch] int32
            ...

    or by hand: `token, cache = sampler.prefill()` (the prompt and the first new token), then
    `token, cache = sampler.decode(token, cache, i)` for i = 1 .. max_new_tokens - 1 (it donates
    `cache`). The prefill is compiled when the sampler is made (`compile_seconds`), so timing
    `prefill()` measures the prefill alone; `decode` compiles at its first call, and later calls
    run the compiled step directly (no retracing checks, no hashing of the model). Arguments and
    checks as `generate`'s. The model is decoded as `decoding_model(model)` lays it out (the
    sampler holds that copy of its weights; the same tokens).
    """

    def __init__(self, model: nnx.Module, prompt_tokens: jax.Array, max_new_tokens: int, *,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, rng: jax.Array,
                 pad_id: int = 0, pad_mask: jax.Array | None = None, prefill_chunk: int | None = None):
        self.prompt_tokens, self.pad_mask, self._temperature, self._top_p = _check_arguments(
            model, prompt_tokens, max_new_tokens, temperature, top_k, top_p, pad_id, pad_mask, prefill_chunk)
        self.max_new_tokens, self.top_k, self.rng = max_new_tokens, top_k, rng
        self._graphdef, self._state = nnx.split(decoding_model(model))
        self._leaves, self._treedef = jax.tree.flatten(self._state)
        self._decode = None  # compiled at the first `decode`
        start = time.perf_counter()
        self._prefill = _prefill_step.lower(
            self._graphdef, self._state, self.prompt_tokens, self.pad_mask, rng, self._temperature, self._top_p,
            max_new_tokens=max_new_tokens, top_k=top_k, prefill_chunk=prefill_chunk).compile()
        self.compile_seconds = time.perf_counter() - start

    def prefill(self) -> tuple[jax.Array, object]:
        """-> (the first new token [batch] int32, the cache after the prompt)."""
        return self._prefill(self._state, self.prompt_tokens, self.pad_mask, self.rng, self._temperature,
                             self._top_p)

    def decode(self, token: jax.Array, cache, i: int) -> tuple[jax.Array, object]:
        """Feeds token [batch] (new token i - 1) and samples new token `i` (1 <= i < max_new_tokens):
        -> (token [batch] int32, cache). `cache` is donated: use the returned one."""
        checks.check_int("i", i, minimum=1, maximum=self.max_new_tokens - 1)
        args = (self._leaves, token, cache, self.rng, np.int32(i), self._temperature, self._top_p)
        if self._decode is None:
            self._decode = _decode_step.lower(*args, graphdef=self._graphdef, treedef=self._treedef,
                                              top_k=self.top_k).compile()
        return self._decode(*args)

    def __iter__(self) -> Iterator[jax.Array]:
        token, cache = self.prefill()
        yield token
        for i in range(1, self.max_new_tokens):
            token, cache = self.decode(token, cache, i)
            yield token


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
