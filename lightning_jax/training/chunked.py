"""Training and evaluating TNL on sequences of any length: the sequence a chunk of time at a time.

Each TNL layer carries everything earlier tokens contribute in a fixed-size float32 state, so a
sequence of T tokens cut into n chunks of `chunk_tokens` is the recurrence

    (loss_c, S_{c+1}) = chunk(params, S_c, tokens of chunk c)      S_0 = 0,  loss = sum_c loss_c

(`TNL.extend`). Differentiating the whole sequence at once keeps every layer's activations for all
T tokens (2 bytes x D per token per layer even under full remat: 48 GiB at 1M tokens for TNL-385M).
`chunked_loss_and_grad` keeps one chunk's:

1. forward sweep: S_1 .. S_{n-1} from the chunks in order, nothing differentiated, no logits;
   the states are kept ([n] x layers x batch x heads x dim_k x dim_v float32: 25 MiB per chunk for
   TNL-385M at batch 1).
2. backward sweep, last chunk first: chunk c is run again from S_c under `jax.vjp` (its loss by
   blocks, training/loss.py, and S_{c+1}) and pulled back with (1 / total weight, dS_{c+1}): its
   parameter gradients are added into float32 accumulators and dS_c goes to chunk c - 1.

The layers run forward twice and backward once, the loss head once each way: the FLOPs of full
rematerialisation of the whole sequence. Inside a chunk the model's own remat policy still applies;
with `remat="none"` the chunk is the unit of recomputation and nothing is recomputed twice.

Chunks are cut along the global time axis; with a context mesh axis each chunk is split over it
(the op's context parallelism, chunk by chunk), so `chunk_tokens` must be a multiple of the context
size. A sequence whose length is not a multiple of `chunk_tokens` is padded at its end with tokens
of weight 0: causal, so they change nothing before them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lightning_jax.checks import ArgumentError, check_int
from lightning_jax.models import layers
from lightning_jax.models.sharding import constrain
from lightning_jax.models.tnl import TNL, TNLCache
from lightning_jax.training import loss as loss_lib

F32 = jnp.float32


def _chunks(tokens: jax.Array, weights: jax.Array, chunk_tokens: int):
    """tokens int [batch, seq_len + 1], weights [batch, seq_len] -> inputs, targets, weights
    [n, batch, chunk_tokens] (padded at the end with weight 0) and the chunks' first positions [n]."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, time = inputs.shape
    n = -(-time // chunk_tokens)
    pad = n * chunk_tokens - time

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, pad)))
        return x.reshape(batch, n, chunk_tokens).swapaxes(0, 1)

    starts = jnp.arange(n, dtype=jnp.int32) * chunk_tokens
    return split(inputs), split(targets), split(weights.astype(F32)), starts


def _model(graphdef, params, rest) -> TNL:
    model = nnx.merge(graphdef, params, rest)
    if not isinstance(model, TNL):
        raise ArgumentError("optim.time_chunk_tokens",
                            f"chunked training needs a model with a recurrent state (TNL); got "
                            f"{type(model).__name__}: set it to 0")
    return model


def _chunk_loss(model: TNL, cache: TNLCache, inputs, targets, weights, loss_block_tokens: int):
    """One chunk from `cache`: (sum of weight x cross-entropy, the cache after the chunk)."""
    bt = ("batch", "time")
    inputs, targets, weights = constrain(inputs, bt), constrain(targets, bt), constrain(weights, bt)
    hidden, cache = model.extend(inputs, cache)
    if loss_block_tokens:
        total = loss_lib.cross_entropy_sum(hidden, *model.logits_weight(), targets, weights,
                                           block_tokens=loss_block_tokens)
    else:
        logits = layers.head_logits(hidden, *model.logits_weight())
        total = jnp.sum(loss_lib.token_losses(logits, targets) * weights)
    return total, cache


def _loss_block(chunk_tokens: int, loss_block_tokens: int | None) -> int:
    """Checks `chunk_tokens`; the loss block in tokens, 0 for the full logits."""
    check_int("chunk_tokens", chunk_tokens, minimum=1)
    return loss_block_tokens or 0


def chunked_loss_sums(graphdef, params, rest, tokens: jax.Array, weights: jax.Array, *, chunk_tokens: int,
                      loss_block_tokens: int | None) -> tuple[jax.Array, jax.Array]:
    """`step.loss_sums` a chunk at a time (evaluation: one forward sweep, loss included).

    tokens int32 [batch, seq_len + 1]; weights float32 [batch, seq_len]. Returns float32 scalars
    (sum of loss x weight, sum of weight)."""
    block = _loss_block(chunk_tokens, loss_block_tokens)
    inputs, targets, chunk_weights, starts = _chunks(tokens, weights, chunk_tokens)
    model = _model(graphdef, params, rest)

    def step(carry, chunk):
        cache, total = carry
        x, y, w, _ = chunk
        loss, cache = _chunk_loss(model, cache, x, y, w, block)
        return (cache, total + loss), None

    (_, total), _ = jax.lax.scan(step, (model.empty_cache(tokens.shape[0]), jnp.zeros((), F32)),
                                 (inputs, targets, chunk_weights, starts))
    return total, jnp.sum(weights.astype(F32))


def chunked_loss_and_grad(graphdef, params, rest, tokens: jax.Array, weights: jax.Array, *, chunk_tokens: int,
                          loss_block_tokens: int | None) -> tuple[jax.Array, nnx.State]:
    """(mean weighted loss, its gradient for `params`) a chunk at a time (see the module docstring):
    the value and gradient of `step.loss_sums`' total / count, in a chunk's activation memory.

    tokens int32 [batch, seq_len + 1]; weights float32 [batch, seq_len]. Gradients have the
    parameters' dtypes; they are accumulated in float32."""
    block = _loss_block(chunk_tokens, loss_block_tokens)
    inputs, targets, chunk_weights, starts = _chunks(tokens, weights, chunk_tokens)
    batch = tokens.shape[0]
    count = jnp.sum(weights.astype(F32))

    # 1. Forward sweep: the cache entering each chunk.
    def advance(cache, x):
        _, after = _model(graphdef, params, rest).extend(constrain(x, ("batch", "time")), cache)
        return after, cache.states

    start_cache = _model(graphdef, params, rest).empty_cache(batch)
    _, entering = jax.lax.scan(advance, start_cache, inputs)

    # 2. Backward sweep, last chunk first.
    def chunk_fn(params, states, x, y, w, start):
        model = _model(graphdef, params, rest)
        cache = TNLCache(states, jnp.full((batch,), start, jnp.int32))
        total, after = _chunk_loss(model, cache, x, y, w, block)
        return total, after.states

    def back(carry, chunk):
        d_after, grads, total = carry
        x, y, w, start, states = chunk
        (loss, _), pullback = jax.vjp(lambda p, s: chunk_fn(p, s, x, y, w, start), params, states)
        d_params, d_states = pullback((1.0 / count, d_after))
        grads = jax.tree.map(lambda g, d: g + d.astype(F32), grads, d_params)
        return (d_states, grads, total + loss), None

    zeros_states = jax.tree.map(jnp.zeros_like, start_cache.states)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params)
    (_, grads, total), _ = jax.lax.scan(back, (zeros_states, zero_grads, jnp.zeros((), F32)),
                                        (inputs, targets, chunk_weights, starts, entering), reverse=True)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return total / count, grads
