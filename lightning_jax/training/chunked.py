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

With packed documents (segment ids) a chunk's first document continues from the carried state,
unless it starts at the chunk's first token: then that row's state and position are reset
(`TNLCache.reset_rows`), inside the differentiated chunk, so no gradient crosses the boundary.
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


def _chunks(tokens: jax.Array, weights: jax.Array, segment_ids: jax.Array | None, chunk_tokens: int):
    """tokens int [batch, seq_len + 1], weights [batch, seq_len], segment_ids None or like tokens ->
    a tuple of per-chunk arrays for `lax.scan`: inputs, targets, weights [n, batch, chunk_tokens]
    (padded at the end with weight 0), the position of each row's first token [n, batch], whether
    a document starts there [n, batch] bool, and the inputs' segment ids [n, batch, chunk_tokens]
    (None without them)."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    batch, time = inputs.shape
    n = -(-time // chunk_tokens)
    pad = n * chunk_tokens - time

    def split(x, mode="constant"):
        x = jnp.pad(x, ((0, 0), (0, pad)), mode=mode)
        return x.reshape(batch, n, chunk_tokens).swapaxes(0, 1)

    if segment_ids is None:
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None] * chunk_tokens, (n, batch))
        resets, segments = jnp.zeros((n, batch), bool), None
    else:
        documents = segment_ids[:, :-1]
        positions = layers.positions_in_documents(documents)[:, ::chunk_tokens].T
        resets = layers.document_starts(documents)[:, ::chunk_tokens].T
        segments = split(documents, mode="edge")  # the padding stays in the last document
    return split(inputs), split(targets), split(weights.astype(F32)), positions, resets, segments


def _model(graphdef, params, rest) -> TNL:
    model = nnx.merge(graphdef, params, rest)
    if not isinstance(model, TNL):
        raise ArgumentError("optim.time_chunk_tokens",
                            f"chunked training needs a model with a recurrent state (TNL); got "
                            f"{type(model).__name__}: set it to 0")
    return model


def _entering(states, position, reset) -> TNLCache:
    """The cache a chunk starts from: the carried states at `position` [batch], rows where a
    document starts (`reset` [batch] bool) back at zero."""
    return TNLCache(states, position).reset_rows(reset)


def _extend(model: TNL, cache: TNLCache, inputs, segments):
    bt = ("batch", "time")
    documents = {} if segments is None else {"segment_ids": constrain(segments, bt)}
    return model.extend(constrain(inputs, bt), cache, **documents)


def _chunk_loss(model: TNL, cache: TNLCache, inputs, targets, weights, segments, loss_block_tokens: int):
    """One chunk from `cache`: (sum of weight x cross-entropy, the cache after the chunk)."""
    bt = ("batch", "time")
    targets, weights = constrain(targets, bt), constrain(weights, bt)
    hidden, cache = _extend(model, cache, inputs, segments)
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


def chunked_loss_sums(graphdef, params, rest, tokens: jax.Array, weights: jax.Array,
                      segment_ids: jax.Array | None = None, *, chunk_tokens: int,
                      loss_block_tokens: int | None) -> tuple[jax.Array, jax.Array]:
    """`step.loss_sums` a chunk at a time (evaluation: one forward sweep, loss included).

    tokens int32 [batch, seq_len + 1]; weights float32 [batch, seq_len] (cross-document targets
    already at 0); segment_ids None or int32 like tokens. Returns float32 scalars (sum of loss x
    weight, sum of weight)."""
    block = _loss_block(chunk_tokens, loss_block_tokens)
    model = _model(graphdef, params, rest)

    def step(carry, chunk):
        states, total = carry
        x, y, w, position, reset, segments = chunk
        loss, cache = _chunk_loss(model, _entering(states, position, reset), x, y, w, segments, block)
        return (cache.states, total + loss), None

    (_, total), _ = jax.lax.scan(step, (model.empty_cache(tokens.shape[0]).states, jnp.zeros((), F32)),
                                 _chunks(tokens, weights, segment_ids, chunk_tokens))
    return total, jnp.sum(weights.astype(F32))


def chunked_loss_and_grad(graphdef, params, rest, tokens: jax.Array, weights: jax.Array,
                          segment_ids: jax.Array | None = None, *, chunk_tokens: int,
                          loss_block_tokens: int | None) -> tuple[jax.Array, nnx.State]:
    """(mean weighted loss, its gradient for `params`) a chunk at a time (see the module docstring):
    the value and gradient of `step.loss_sums`' total / count, in a chunk's activation memory.

    tokens int32 [batch, seq_len + 1]; weights float32 [batch, seq_len] (cross-document targets
    already at 0); segment_ids None or int32 like tokens. Gradients have the parameters' dtypes;
    they are accumulated in float32."""
    block = _loss_block(chunk_tokens, loss_block_tokens)
    chunks = _chunks(tokens, weights, segment_ids, chunk_tokens)
    count = jnp.sum(weights.astype(F32))

    # 1. Forward sweep: the states entering each chunk.
    def advance(states, chunk):
        x, _, _, position, reset, segments = chunk
        _, after = _extend(_model(graphdef, params, rest), _entering(states, position, reset), x, segments)
        return after.states, states

    start_states = _model(graphdef, params, rest).empty_cache(tokens.shape[0]).states
    _, entering = jax.lax.scan(advance, start_states, chunks)

    # 2. Backward sweep, last chunk first.
    def chunk_fn(params, states, chunk):
        x, y, w, position, reset, segments = chunk
        total, after = _chunk_loss(_model(graphdef, params, rest), _entering(states, position, reset), x, y, w,
                                   segments, block)
        return total, after.states

    def back(carry, chunk_and_states):
        d_after, grads, total = carry
        chunk, states = chunk_and_states
        (loss, _), pullback = jax.vjp(lambda p, s: chunk_fn(p, s, chunk), params, states)
        d_params, d_states = pullback((1.0 / count, d_after))
        grads = jax.tree.map(lambda g, d: g + d.astype(F32), grads, d_params)
        return (d_states, grads, total + loss), None

    zeros_states = jax.tree.map(jnp.zeros_like, start_states)
    zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, F32), params)
    (_, grads, total), _ = jax.lax.scan(back, (zeros_states, zero_grads, jnp.zeros((), F32)),
                                        (chunks, entering), reverse=True)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return total / count, grads
