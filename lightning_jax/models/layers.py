"""Building blocks shared by the models: parameters with logical axes, norms, the gated MLP, token
checks, embedding and LM head. The layer stack (groups, scan, remat) is in `models.stack`.

Module calls open a `jax.named_scope` (embed, channel_mixer, lm_head, ...) so that profiles and
HLO dumps name the model part each op belongs to; scopes cost nothing at run time.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lightning_jax.checks import ArgumentError
from lightning_jax.models.sharding import constrain, current_rules

F32 = jnp.float32


def param(rngs: nnx.Rngs, shape: tuple[int, ...], logical: tuple[str | None, ...], dtype, std: float,
          init: Callable | None = None, *, inputs: int = 0) -> nnx.Param:
    """An nnx.Param of `shape` annotated with `logical` axis names (one per dimension).

    `inputs`: for a projection weight used through `project`, how many of its leading axes are
    contracted with the input (recorded as `input_axes` metadata, counted from the end so that a
    stacked copy's extra leading layer axis does not shift them); `inputs_last` uses it."""
    if len(logical) != len(shape):
        raise ValueError(f"logical: got {logical} for shape {shape}, expected one name per dimension")
    init = nnx.initializers.normal(std) if init is None else init
    # Created in its sharding when a mesh is set (`sharding.create_sharded_model`); without a mesh
    # the annotation is only recorded, so models also build on one device.
    # The rules travel with the variable, so copies made later outside `nnx.logical_axis_rules`
    # (optimizer state, checkpoint targets) resolve the same mesh axes.
    eager = not jax.sharding.get_abstract_mesh().empty
    weight = nnx.Param(
        nnx.with_partitioning(init, logical, eager_sharding=eager, sharding_rules=current_rules())(
            rngs.params(), shape, jnp.dtype(dtype)
        )
    )
    if inputs:
        weight.set_metadata(input_axes=tuple(range(-len(shape), inputs - len(shape))))
    return weight


def project(spec: str, x: jax.Array, weight: nnx.Param, dtype) -> jax.Array:
    """`jnp.einsum(spec, x, weight)` with both operands in `dtype`, however `weight` is stored: after
    `inputs_last` it holds its input axes last, and the weight's subscripts in `spec` move the
    same way, so the product is the same."""
    operands, out = spec.split("->")
    lhs, sub = operands.split(",")
    meta = weight.get_metadata()
    if meta.get("inputs_last"):
        inputs = [len(sub) + a for a in meta["input_axes"]]
        sub = "".join(c for i, c in enumerate(sub) if i not in inputs) + "".join(sub[i] for i in inputs)
    return jnp.einsum(f"{lhs},{sub}->{out}", x.astype(dtype), weight[...].astype(dtype))


def inputs_last(model: nnx.Module) -> nnx.Module:
    """A copy of `model` in which every projection weight (a Param made with `inputs=`) holds its
    input axes last, for decoding; the other parameters are shared, not copied.

    Why: at batch 1 a projection is a matrix-vector product, which XLA computes as a reduction over
    the input axes; it reads the weight at close to full bandwidth only when those axes are the
    contiguous (last) ones. On an H200, TNL-385M's decoding step took 0.56 ms with the weights
    laid out this way against 0.97 ms in the training layout (docs/benchmarks.md). `project`
    reads either layout, so the modules run unchanged; sharded weights keep their mesh axes (the
    partition spec is permuted with the axes). A model with nothing left to move is returned as is."""

    def to_move(node):
        if not isinstance(node, nnx.Param):
            return False
        meta = node.get_metadata()
        return "input_axes" in meta and not meta.get("inputs_last")

    if not any(to_move(node) for _, node in nnx.iter_graph(model)):
        return model
    model = nnx.clone(model)
    for _, node in nnx.iter_graph(model):
        if not to_move(node):
            continue
        meta = node.get_metadata()
        value = node.get_value()
        inputs = [value.ndim + a for a in meta["input_axes"]]
        perm = tuple(a for a in range(value.ndim) if a not in inputs) + tuple(inputs)
        node.set_value(_transposed(value, perm))
        names = meta.get("out_sharding")
        extra = {"out_sharding": tuple(names[a] for a in perm)} if names and len(names) == value.ndim else {}
        node.set_metadata(inputs_last=True, **extra)
    return model


def laid_out_for_decoding(model: nnx.Module) -> bool:
    """True when some projection weight of `model` holds its input axes last (`inputs_last`)."""
    return any(isinstance(node, nnx.Param) and node.get_metadata().get("inputs_last")
               for _, node in nnx.iter_graph(model))


def _transposed(value: jax.Array, perm: tuple[int, ...]) -> jax.Array:
    """jnp.transpose(value, perm) as a new contiguous array, sharded like `value` with its axes permuted."""
    sharding = getattr(value, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * (value.ndim - len(sharding.spec))
        out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*(spec[a] for a in perm)))
        return jax.jit(lambda v: jnp.transpose(v, perm), out_shardings=out)(value)
    return jnp.transpose(value, perm)


# TNL's activations on q and k by name (TNLConfig.attention_activation; "none": identity).
ACTIVATIONS = {"silu": jax.nn.silu, "relu": jax.nn.relu, "none": None}


def srms_norm(x: jax.Array, eps: float, *, axes=(-1,)) -> jax.Array:
    """Simple RMSNorm (no weight): x / sqrt(mean(x^2) + eps) over `axes`, computed in fp32."""
    x32 = x.astype(F32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axes, keepdims=True) + eps)


class GatedMLP(nnx.Module):
    """W3(act(W1 x) * (W2 x)), W1 and W2 fused into one [D, 2, width] parameter.

    activation None is TNL's SGLU (no activation, docs/tnl.md); jax.nn.silu is LLaMA's SwiGLU."""

    def __init__(self, hidden_dim: int, width: int, *, activation: Callable | None, dtype, param_dtype,
                 init_std: float, rngs: nnx.Rngs):
        self.activation = activation
        self.dtype = jnp.dtype(dtype)
        self.w12 = param(rngs, (hidden_dim, 2, width), ("embed", None, "mlp"), param_dtype, init_std, inputs=1)
        self.w3 = param(rngs, (width, hidden_dim), ("mlp", "embed"), param_dtype, init_std, inputs=1)

    @jax.named_scope("channel_mixer")
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, time, D] -> [batch, time, D] in the compute dtype."""
        h1, h2 = project("btd,dfm->fbtm", x, self.w12, self.dtype)
        if self.activation is not None:
            h1 = self.activation(h1)
        return project("btm,md->btd", h1 * h2, self.w3, self.dtype)


def check_tokens(tokens: jax.Array, pad_mask: jax.Array | None) -> None:
    """tokens: int [batch, time] with batch, time >= 1; pad_mask: None or tokens' shape.

    Empty token arrays are refused here, naming `tokens`, rather than deep in the attention op."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ArgumentError("tokens", f"got shape {tokens.shape} dtype {tokens.dtype}, expected int [batch, time]")
    if 0 in tokens.shape:
        raise ArgumentError("tokens", f"got shape {tokens.shape}, expected at least one row and one token")
    if pad_mask is not None and pad_mask.shape != tokens.shape:
        raise ArgumentError("pad_mask", f"got shape {pad_mask.shape}, expected tokens' shape {tokens.shape}")


def check_token_range(tokens, vocab_size: int) -> None:
    """Token ids in [0, vocab_size) when they are concrete; ArgumentError naming `tokens` otherwise.

    Traced ids (inside `jit`) cannot be inspected and are trusted, as the attention op trusts traced
    rates: there an id >= vocab_size embeds as NaN (every logit NaN) and a negative id counts from
    the end of the table (-1 is the last token). Check ids before `jit` (`generate` does)."""
    if isinstance(tokens, jax.core.Tracer) or not hasattr(tokens, "shape") or not math.prod(tokens.shape):
        return
    if isinstance(tokens, np.ndarray):
        lo, hi = tokens.min(), tokens.max()
    else:
        # Concrete ids can also meet a trace (an array closed over by a jitted function): evaluate
        # the min / max now, on the concrete values, rather than as part of that trace.
        with jax.ensure_compile_time_eval():
            lo, hi = jax.device_get((jnp.min(tokens), jnp.max(tokens)))
    if lo < 0 or hi >= vocab_size:
        ids = np.asarray(tokens)
        where = tuple(int(i) for i in np.argwhere((ids < 0) | (ids >= vocab_size))[0])
        raise ArgumentError("tokens", f"got ids in [{int(lo)}, {int(hi)}] ({int(ids[where])} at index {where}), "
                                      f"expected ids in [0, {vocab_size}) (the model's vocab_size)")


@jax.named_scope("embed")
def embed_tokens(table: nnx.Param, tokens: jax.Array, dtype, *, scale: bool, time: str | None = None) -> jax.Array:
    """table [vocab, D], tokens [batch, ...] -> [batch, ..., D] in `dtype`, times sqrt(D) if `scale`.
    `time`: the logical name of the tokens' second axis (e.g. "time", split over context).

    Concrete ids outside [0, vocab) raise ArgumentError naming `tokens`; traced ones are trusted
    (`check_token_range`). Every model entry point (`__call__`, `hidden_states`, `prefill`,
    `decode`, `extend`) embeds through here."""
    check_token_range(tokens, table.shape[0])
    x = jnp.take(table[...], tokens, axis=0).astype(dtype)
    if scale:
        x = x * jnp.asarray(math.sqrt(table.shape[-1]), dtype)
    names = ("batch", time) + (None,) * (x.ndim - 2) if x.ndim > 2 else ("batch",) + (None,) * (x.ndim - 1)
    return constrain(x, names)


def logits_weight(embed: nnx.Param, lm_head: nnx.Param | None) -> tuple[jax.Array, int]:
    """(weight, vocab_axis) of the LM head: the embedding table [vocab, D] (tied, vocab axis 0) or
    the untied lm_head [D, vocab] (vocab axis 1; 0 once `inputs_last` has moved D last)."""
    if lm_head is None:
        return embed[...], 0
    return lm_head[...], 0 if lm_head.get_metadata().get("inputs_last") else 1


def head_logits(x: jax.Array, weight: jax.Array, vocab_axis: int, rules=None) -> jax.Array:
    """x [batch, time, D] times the LM head `weight` (see `logits_weight`) -> float32 logits
    [batch, time, vocab]: operands in x's dtype, float32 accumulation. `rules`: logical axis rules
    for the logits' constraint (default: the current ones)."""
    spec = "btd,vd->btv" if vocab_axis == 0 else "btd,dv->btv"
    logits = jnp.einsum(spec, x, weight.astype(x.dtype), preferred_element_type=F32)
    return constrain(logits.astype(F32), ("batch", None, "vocab"), rules)


@jax.named_scope("lm_head")
def lm_logits(x: jax.Array, embed: nnx.Param, lm_head: nnx.Param | None, dtype) -> jax.Array:
    """Normalised x [batch, time, D] -> float32 logits [batch, time, vocab], through the embedding
    table (tied) or a separate lm_head [D, vocab]."""
    return head_logits(x.astype(dtype), *logits_weight(embed, lm_head))


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """[batch, time] bool: True where a packed document starts after another in the same row (the
    segment id changes); False at time 0, whose document may continue an earlier call's."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((segment_ids.shape[0], 1), bool), change], axis=1)


def positions_in_documents(segment_ids: jax.Array, offset: jax.Array | int = 0) -> jax.Array:
    """[batch, time] int32 positions that restart at 0 at each document start (`document_starts`).
    The row's first document continues from `offset` ([batch] int or a scalar: its tokens so far)."""
    time = segment_ids.shape[1]
    t = jnp.arange(time, dtype=jnp.int32)
    start = jax.lax.cummax(jnp.where(document_starts(segment_ids), t, 0), axis=1)  # the document's first index
    offset = jnp.asarray(offset, jnp.int32).reshape(-1, 1)
    return jnp.where(start == 0, t + offset, t - start)


def positions_from_mask(pad_mask: jax.Array | None, batch: int, time: int) -> jax.Array:
    """[batch, time] int32 positions: 0, 1, ... from each row's first real token (left padding).

    Pad positions get 0; their values never reach real tokens (k and v are zeroed there)."""
    if pad_mask is None:
        return jnp.broadcast_to(jnp.arange(time, dtype=jnp.int32), (batch, time))
    return jnp.maximum(jnp.cumsum(pad_mask.astype(jnp.int32), axis=1) - 1, 0)
