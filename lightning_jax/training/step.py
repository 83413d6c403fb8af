"""The compiled pieces of training: the train state, the loss, one optimizer step, evaluation sums.

Pure functions over pytrees (NNX "tree mode" style): the model is `nnx.split` once into a static
`graphdef` and its parameters / other variables, and re-`nnx.merge`d inside the loss. Nothing here
imports grain or ml_collections, so benchmarks can use it on a bare GPU image.

Train state (a dict, the unit that is checkpointed)::

    params     nnx.State of the nnx.Param variables (float32 master weights)
    rest       nnx.State of every other variable (may be empty)
    opt_state  optax state, sharded like params
    step       int32 [], updates done so far
    rng        uint32 [2], the run's base key data; step keys are fold_in(rng, step)

Batches are ``tokens: int32 [batch, seq_len + 1]``; inputs are tokens[:, :-1], targets tokens[:, 1:].
With document masks (`data.document_mask`), ``segment_ids: int32 [batch, seq_len + 1]`` (the document
of each token, non-decreasing along a row) come with them: the model keeps documents apart and the
target across each boundary gets weight 0 (`document_weights`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lightning_jax.models.sharding import constrain
from lightning_jax.training import chunked, loss as loss_lib
from lightning_jax.training.config import DEFAULT_LOSS_BLOCK_TOKENS

TrainState = dict[str, Any]


def _chunked(tokens: jax.Array, time_chunk_tokens: int) -> bool:
    """Whether sequences of `tokens` [batch, seq_len + 1] go through the model a chunk at a time."""
    return bool(time_chunk_tokens) and tokens.shape[1] - 1 > time_chunk_tokens


def document_weights(weights: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """weights [batch, seq_len] with 0 at each target that belongs to another document than its
    input (segment_ids [batch, seq_len + 1] changes between them); unchanged without segment ids."""
    if segment_ids is None:
        return weights
    return jnp.where(segment_ids[:, 1:] == segment_ids[:, :-1], weights, 0.0)


def loss_sums(graphdef, params, rest, tokens: jax.Array, weights: jax.Array, segment_ids: jax.Array | None = None,
              *, loss_block_tokens: int | None = DEFAULT_LOSS_BLOCK_TOKENS,
              time_chunk_tokens: int = 0) -> tuple[jax.Array, jax.Array]:
    """Weighted next-token cross-entropy: (sum of loss * weight, sum of weight), float32 scalars.

    tokens: int32 [batch, seq_len + 1]; weights: float32 [batch, seq_len] (0 on padding);
    segment_ids: None or int32 [batch, seq_len + 1], packed documents kept apart.
    loss_block_tokens: the logits of this many tokens per device at a time, from the model's final
    hidden states (training/loss.py); 0 or None: the model's full logits (the reference).
    time_chunk_tokens: sequences longer than this run through the model this many tokens at a time
    (TNL only; training/chunked.py); 0: whole.
    """
    weights = document_weights(weights, segment_ids)
    if _chunked(tokens, time_chunk_tokens):
        return chunked.chunked_loss_sums(graphdef, params, rest, tokens, weights, segment_ids,
                                         chunk_tokens=time_chunk_tokens, loss_block_tokens=loss_block_tokens)
    model = nnx.merge(graphdef, params, rest)
    # Batches arrive split over the batch axes only (seq_len + 1 columns do not split evenly over a
    # context axis); inputs, targets and weights are split over time (logical "time": the mesh's
    # context axis, if any) after the shift, a local slice of what each device holds.
    bt = ("batch", "time")
    inputs, targets = constrain(tokens[:, :-1], bt), constrain(tokens[:, 1:], bt)
    weights = constrain(weights, bt)
    documents = {} if segment_ids is None else {"segment_ids": constrain(segment_ids[:, :-1], bt)}
    # The softmax runs in float32 whatever the compute dtype: bf16 log-sum-exp over 64K logits loses
    # the small differences the loss is made of.
    if not loss_block_tokens:
        logits = model(inputs, **documents)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
        return jnp.sum(losses * weights), jnp.sum(weights)
    total = loss_lib.cross_entropy_sum(model.hidden_states(inputs, **documents), *model.logits_weight(), targets, weights,
                                       block_tokens=loss_block_tokens)
    return total, jnp.sum(weights)


def init_train_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int):
    """(graphdef, state) from a model already created with its parameters sharded.

    The optimizer state gets the sharding of the parameter it belongs to (jit alone would put the
    zeros it creates on one device), and scalars are replicated.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_shapes = jax.eval_shape(tx.init, params)
    mesh = _mesh_of(params)
    replicated = NamedSharding(mesh, P()) if mesh is not None else None
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    opt_shardings = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        opt_shapes,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = jnp.zeros((), jnp.int32)
    rng = jax.random.key_data(jax.random.key(seed))
    if replicated is not None:
        step, rng = jax.device_put((step, rng), replicated)
    return graphdef, {"params": params, "rest": rest, "opt_state": opt_state, "step": step, "rng": rng}


def _mesh_of(tree):
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding):
            return sharding.mesh
    return None


def state_shardings(state: TrainState):
    return jax.tree.map(lambda x: x.sharding, state)


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, grad_accum_steps: int = 1, *,
    loss_block_tokens: int | None = DEFAULT_LOSS_BLOCK_TOKENS, time_chunk_tokens: int = 0,
) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """`train_step(state, tokens, segment_ids=None) -> (state, metrics)`, not yet jitted (see
    `jit_train_step`).

    With `grad_accum_steps` k > 1 the batch is split into k microbatches whose gradients are averaged
    (in float32, weighted by their numbers of targets) before one update: the same update as the
    whole batch at once, in 1/k the activation memory. metrics: loss (mean over the batch), grad_norm (before clipping), lr.
    `loss_block_tokens`, `time_chunk_tokens`: see `loss_sums`.
    """

    def mean_loss(params, rest, tokens, segment_ids):
        weights = jnp.ones(tokens[:, 1:].shape, jnp.float32)
        total, count = loss_sums(graphdef, params, rest, tokens, weights, segment_ids,
                                 loss_block_tokens=loss_block_tokens)
        return total / count

    def grad_fn(params, rest, tokens, segment_ids):
        if _chunked(tokens, time_chunk_tokens):
            weights = document_weights(jnp.ones(tokens[:, 1:].shape, jnp.float32), segment_ids)
            return chunked.chunked_loss_and_grad(graphdef, params, rest, tokens, weights, segment_ids,
                                                 chunk_tokens=time_chunk_tokens, loss_block_tokens=loss_block_tokens)
        return jax.value_and_grad(mean_loss)(params, rest, tokens, segment_ids)

    def train_step(state: TrainState, tokens: jax.Array, segment_ids: jax.Array | None = None):
        params, rest = state["params"], state["rest"]
        if grad_accum_steps == 1:
            loss, grads = grad_fn(params, rest, tokens, segment_ids)
        else:
            batch = tokens.shape[0]
            # Strided microbatches (rows j, j + k, ...): each device's contiguous block of the
            # batch-sharded rows contributes equally to every microbatch, so no rows move.
            def microbatches(x):
                return None if x is None else x.reshape(batch // grad_accum_steps, grad_accum_steps, -1).swapaxes(0, 1)

            # Each microbatch's mean loss and gradient count by its number of targets (equal
            # without document masks, which drop one target per boundary), so the update is the
            # whole batch's.
            def accumulate(carry, micro):
                loss_sum, count_sum, grad_sum = carry
                loss, grads = grad_fn(params, rest, *micro)
                micro_tokens, micro_ids = micro
                count = jnp.sum(document_weights(jnp.ones(micro_tokens[:, 1:].shape, jnp.float32), micro_ids))
                grad_sum = jax.tree.map(lambda total, g: total + count * g.astype(jnp.float32), grad_sum, grads)
                return (loss_sum + count * loss, count_sum + count, grad_sum), None

            zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            micro = (microbatches(tokens), microbatches(segment_ids))
            zero = jnp.zeros((), jnp.float32)
            (loss, count, grads), _ = jax.lax.scan(accumulate, (zero, zero, zeros), micro)
            loss = loss / count
            grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state["step"])}
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state: TrainState):
    """jit with the state donated and kept in its own sharding (so every step's program, and a
    resumed run's, is the same)."""
    shardings = state_shardings(state)
    return jax.jit(train_step, donate_argnums=(0,), out_shardings=(shardings, None))


def make_eval_sums(graphdef, *, loss_block_tokens: int | None = DEFAULT_LOSS_BLOCK_TOKENS, time_chunk_tokens: int = 0):
    """jit-ted `eval_sums(params, rest, tokens, weights, segment_ids=None) -> (sum loss*w, sum w)`
    over the global (sharded) batch: XLA reduces across all devices and returns replicated scalars."""

    def eval_sums(params, rest, tokens, weights, segment_ids=None):
        return loss_sums(graphdef, params, rest, tokens, weights, segment_ids, loss_block_tokens=loss_block_tokens,
                         time_chunk_tokens=time_chunk_tokens)

    return jax.jit(eval_sums)


def make_pmap_eval_sums(graphdef, axis_name: str = "devices", *,
                        loss_block_tokens: int | None = DEFAULT_LOSS_BLOCK_TOKENS, time_chunk_tokens: int = 0):
    """The same sums through `jax.pmap`: tokens [local_devices, rows_per_device, seq_len + 1],
    weights [local_devices, rows_per_device, seq_len], segment_ids None or like tokens; params and
    rest broadcast (in_axes None). Returns per-device copies of the sums over all devices (psum)."""

    def local(params, rest, tokens, weights, segment_ids=None):
        total, count = loss_sums(graphdef, params, rest, tokens, weights, segment_ids,
                                 loss_block_tokens=loss_block_tokens, time_chunk_tokens=time_chunk_tokens)
        return jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)

    sums = jax.pmap(local, axis_name=axis_name, in_axes=(None, None, 0, 0, 0))
    return lambda params, rest, tokens, weights, segment_ids=None: sums(params, rest, tokens, weights, segment_ids)
