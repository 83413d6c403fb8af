"""Next-token cross-entropy from the final hidden states, a block of tokens at a time.

The full-logits loss holds float32 logits [tokens, vocab] (and their gradient): 62.5 GiB for 262,144
tokens of a 64,000-word vocabulary. `cross_entropy_sum` never does:

- forward: per block, the logits, their float32 log-sum-exp and the weighted loss; only the sum is
  kept.
- under differentiation (a `jax.custom_vjp`) the same loop also takes, per block, the loss's
  gradient for the logits (the same function's VJP, for a unit cotangent), d_hidden for the block's
  rows and the block's d_weight, added into float32 accumulators; the backward only multiplies
  them by the scalar cotangent. This is how Liger's fused linear cross-entropy avoids recomputing
  the logits (MaxText's vocabulary tiling recomputes them in the backward instead: one more
  logits matmul, 5 % of TNL-385M's step at 2,048 tokens on an H200).

Memory: one block of logits and its gradient (block tokens x vocab x 4 bytes each), d_hidden
[batch, time, D] in float32 (held from the loss's forward to its backward: 4 GiB at 1M tokens of
D 1024) and the float32 d_weight accumulator. Evaluation (no differentiation) runs the plain loop: logits and losses only.

Blocks run along the time axis over every row, so the batch keeps its sharding; a block holds
`block_tokens` tokens per device (the rows a device holds x the block's time steps). A vocab
sharded over the `tensor` mesh axis works unchanged: XLA partitions each block's matmul and
reductions as it does the full logits'. The weight is gathered over the batch axes once, before the
blocks, and each batch shard keeps its own d_weight partial sum ([shards, ...] sharded like the
batch), summed once after the last block: no collective on the weight per block. When the time axis
is not a multiple of the block, the last block slides back to end at the last token and gives
weight 0 to the tokens it shares with the block before it: nothing is padded or copied.

When the whole time axis fits in one block, that block is differentiated directly (no recompute):
its logits are within the budget anyway.

Context parallelism (time split over the mesh's `context` axis, C devices): slicing blocks along
the global time axis would make XLA gather the hidden states. So the loss first folds time into
rows, [batch, time, ...] -> [C x batch, time / C, ...] (a swap of the [batch, C] axes, free on each
device since every device holds one of the C slices): row c x batch + b is sequence b's c-th slice,
the rows shard over (context, data, fsdp), and the blocks run along each device's own slice.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lightning_jax.checks import check_int
from lightning_jax.models import layers
from lightning_jax.models.sharding import constrain, current_rules, logical_to_spec

F32 = jnp.float32

# Logical axes of the LM head weight by the index of its vocab axis (layers.logits_weight), once
# gathered for the blocks (vocab only) and as per-batch-shard d_weight partials.
_GATHERED_AXES = {0: ("vocab", None), 1: (None, "vocab")}
_PARTIAL_AXES = {0: ("batch", "vocab", None), 1: ("batch", None, "vocab")}


def token_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """float32 logits [..., vocab], int targets [...] -> logsumexp(logits) - logits[target] [...].

    optax.softmax_cross_entropy_with_integer_labels' arithmetic; the target logit is picked by a
    compare and sum over the vocab, which XLA partitions like the log-sum-exp when the vocab is
    sharded."""
    vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1)
    target = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - target


def cross_entropy_sum(hidden: jax.Array, weight: jax.Array, vocab_axis: int, targets: jax.Array,
                      loss_weights: jax.Array, *, block_tokens: int) -> jax.Array:
    """sum(loss_weights * cross-entropy of the logits `layers.head_logits(hidden, weight, vocab_axis)`
    at `targets`), a float32 scalar, computed `block_tokens` tokens per device at a time.

    hidden: [batch, time, D] in the compute dtype (a model's `hidden_states`); weight, vocab_axis: the
    LM head (a model's `logits_weight()`); targets: int [batch, time]; loss_weights: float32
    [batch, time] (0 on padding). Differentiable in hidden and weight (not in loss_weights).
    """
    check_int("block_tokens", block_tokens, minimum=1)
    batch, time, _ = hidden.shape
    if targets.shape != (batch, time) or loss_weights.shape != (batch, time):
        raise ValueError(f"targets, loss_weights: got shapes {targets.shape}, {loss_weights.shape}, "
                         f"expected hidden's [batch, time] = {(batch, time)}")
    hidden, targets, loss_weights, rules = _fold_context(hidden, targets, loss_weights)
    rows, time = targets.shape
    shards = _batch_shards(rows, rules)
    steps = max(1, min(time, block_tokens // (rows // shards)))
    with jax.named_scope("loss"):
        if steps == time:  # one block
            return _block_losses(hidden, weight, targets, loss_weights, vocab_axis, rules).sum()
        weight = constrain(weight.astype(hidden.dtype), _GATHERED_AXES[vocab_axis], rules)
        return _blocked_sum(hidden, weight, targets, loss_weights, vocab_axis, steps, shards, rules)


def _mesh_axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _fold_context(hidden, targets, loss_weights):
    """(hidden, targets, loss_weights, rules): unchanged (rules None: the current ones) unless the
    mesh in context splits time (logical "time"); then time folded into rows, [batch, time, ...] ->
    [C x batch, time / C, ...], and rules whose "batch" maps onto the rows' mesh axes (context
    first, then the batch's)."""
    batch, time = targets.shape
    spec = logical_to_spec(("batch", "time"), (batch, time))
    if spec is None or not _mesh_axes(spec[1]):
        return hidden, targets, loss_weights, None
    mesh = jax.sharding.get_abstract_mesh()
    context_axes, batch_axes = _mesh_axes(spec[1]), _mesh_axes(spec[0])
    c = math.prod(mesh.shape[a] for a in context_axes)
    if c == 1:
        return hidden, targets, loss_weights, None
    rows = tuple(a for a in context_axes + batch_axes if mesh.shape[a] > 1)
    rules = (("batch", rows),) + tuple((k, v) for k, v in current_rules() if k != "batch")

    def fold(a):
        a = a.reshape(batch, c, time // c, *a.shape[2:]).swapaxes(0, 1).reshape(c * batch, time // c, *a.shape[2:])
        return constrain(a, ("batch",) + (None,) * (a.ndim - 1), rules)

    return fold(hidden), fold(targets), fold(loss_weights), rules


def _batch_shards(batch: int, rules=None) -> int:
    """How many pieces the mesh in context cuts the batch (rows) into (1 without a mesh or inside
    pmap)."""
    spec = logical_to_spec(("batch",), (batch,), rules)
    if spec is None or spec[0] is None:
        return 1
    return math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in _mesh_axes(spec[0]))


def _block_losses(x, weight, targets, loss_weights, vocab_axis, rules=None):
    """The weighted losses of one block, summed over its time steps: float32 [batch]."""
    logits = layers.head_logits(x, weight, vocab_axis, rules)
    return jnp.sum(token_losses(logits, targets) * loss_weights, axis=1)


def _block(i, steps, x, targets, loss_weights):
    """Block i's start and its slices of x, targets and loss_weights. The last block may start
    before i * steps (so that it ends at the last token); its tokens before i * steps belong to
    block i - 1 and get weight 0 here."""
    start = jnp.minimum(i * steps, x.shape[1] - steps)
    cut = lambda a: jax.lax.dynamic_slice_in_dim(a, start, steps, axis=1)
    new = start + jnp.arange(steps) >= i * steps
    return start, cut(x), cut(targets), jnp.where(new, cut(loss_weights), 0.0)


def _num_blocks(time, steps):
    return -(-time // steps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _blocked_sum(x, weight, targets, loss_weights, vocab_axis, steps, shards, rules):
    def body(i, rows):
        _, xb, tb, wb = _block(i, steps, x, targets, loss_weights)
        return rows + _block_losses(xb, weight, tb, wb, vocab_axis, rules)

    # Per-row sums ([batch], sharded like it): one reduction across devices, after the last block.
    rows = constrain(jnp.zeros(x.shape[:1], F32), ("batch",), rules)
    return jax.lax.fori_loop(0, _num_blocks(x.shape[1], steps), body, rows).sum()


def _blocked_sum_fwd(x, weight, targets, loss_weights, vocab_axis, steps, shards, rules):
    """Under differentiation the forward also takes the gradients, for a unit cotangent (Liger's
    fused linear cross-entropy): the loss is a scalar, so the backward only scales them. Each
    block's logits are computed once, where recomputing them in the backward would cost one more
    [tokens, D] x [D, vocab] matmul (5 % of TNL-385M's training FLOPs, 5 % of its step time at
    2,048 tokens on an H200). Held from here to the backward: d_hidden and d_weight, float32."""
    batch = x.shape[0]
    by_shard = lambda a: a.reshape(shards, batch // shards, *a.shape[1:])  # [shards, rows, ...]
    partial_axes = _PARTIAL_AXES[vocab_axis]
    d_weight_spec = "srtv,srtd->svd" if vocab_axis == 0 else "srtv,srtd->sdv"
    d_x_spec = "btv,vd->btd" if vocab_axis == 0 else "btv,dv->btd"

    def body(i, carry):
        rows, dx, d_weight = carry
        start, xb, tb, wb = _block(i, steps, x, targets, loss_weights)
        logits = layers.head_logits(xb, weight, vocab_axis, rules)
        losses, loss_vjp = jax.vjp(lambda logits: jnp.sum(token_losses(logits, tb) * wb, axis=1), logits)
        (d_logits,) = loss_vjp(jnp.ones_like(losses))  # float32 [batch, steps, vocab]
        # The head matmul's transposes in the compute dtype with float32 accumulation, as the
        # forward's: float32 operands would make them fp32 GEMMs, 12 % of TNL-385M's step on an
        # H200 (bf16: about a third of that). d_logits = softmax - one_hot, each in [-1, 1].
        d_logits = d_logits.astype(xb.dtype)
        dxb = jnp.einsum(d_x_spec, d_logits, weight, preferred_element_type=F32)
        d_weight_b = jnp.einsum(d_weight_spec, by_shard(d_logits), by_shard(xb), preferred_element_type=F32)
        # Adds rather than writes: a slid-back last block's rows of the block before are zeros here.
        dxb = jax.lax.dynamic_slice_in_dim(dx, start, steps, axis=1) + dxb
        dx = jax.lax.dynamic_update_slice_in_dim(dx, dxb, start, axis=1)
        return rows + losses, dx, constrain(d_weight + d_weight_b, partial_axes, rules)

    rows = constrain(jnp.zeros(x.shape[:1], F32), ("batch",), rules)
    # float32 until the backward has applied the cotangent, so d_hidden is rounded once, as in
    # the full-logits path (rounding here, then scaling, moved bf16 gradients by several ulps).
    dx = constrain(jnp.zeros(x.shape, F32), ("batch", None, None), rules)
    d_weight = constrain(jnp.zeros((shards, *weight.shape), F32), partial_axes, rules)
    rows, dx, d_weight = jax.lax.fori_loop(0, _num_blocks(x.shape[1], steps), body, (rows, dx, d_weight))
    return rows.sum(), (dx, d_weight.sum(axis=0), jnp.zeros((), x.dtype))


def _blocked_sum_bwd(vocab_axis, steps, shards, rules, residuals, g):
    dx, d_weight, like = residuals  # like: a scalar of hidden's dtype (a dtype is no residual)
    # The weight came in cast to hidden's dtype (cross_entropy_sum): its gradient leaves in it.
    return (g * dx).astype(like.dtype), (g * d_weight).astype(like.dtype), None, None


_blocked_sum.defvjp(_blocked_sum_fwd, _blocked_sum_bwd)
