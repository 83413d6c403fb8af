"""LLaMA-style Transformer baseline in Flax NNX, with TNL's conventions and sizes.

    x = embed(tokens) (* sqrt(D) if scale_embedding)
    for each layer:  x = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))
    logits = RMSNorm(x) @ embed^T      (or an untied lm_head)

Attention is causal softmax with RoPE through `jax.nn.dot_product_attention` (cuDNN flash
attention on a GPU by default, see `default_softmax_implementation`). Generation keeps a KV cache of
prompt + max_new_tokens positions, allocated by `prefill`.

The layers live in a `LayerStack` (models/stack.py) at `self.groups`, as in TNL; profiles read
transformer/layers/layer_<i>/{token_mixer/attention, channel_mixer}, as TNL's (named scopes).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lightning_jax.checks import check_choice, check_instance
from lightning_jax.models import layers
from lightning_jax.models.config import TransformerConfig
from lightning_jax.models.sharding import constrain
from lightning_jax.models.stack import LayerStack

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TransformerCache:
    """KV cache. keys / values: one array per layer group, [batch, length, heads, head_dim] (with a
    leading [count] for scanned stacks); key_mask: [batch, length] bool, True at filled real
    positions; index: int32 scalar, the next column to write; position: [batch] int32, the RoPE
    position of each row's next token."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    key_mask: jax.Array
    index: jax.Array
    position: jax.Array


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, half-split layout. x: [batch, time, heads, head_dim]; positions [batch, time]."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=F32) / half)
    angle = positions.astype(F32)[:, :, None, None] * freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    x1, x2 = x[..., :half].astype(F32), x[..., half:].astype(F32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm with a learned weight [D] (initialised to 1), computed in fp32."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.weight = layers.param(rngs, (config.hidden_dim,), ("embed",), config.param_dtype, 0.0,
                                   init=nnx.initializers.ones)

    def __call__(self, x):
        y = layers.srms_norm(x, self.config.norm_eps) * self.weight[...].astype(F32)
        return y.astype(self.config.dtype)


def default_softmax_implementation(dtype, head_dim: int, *, masked: bool, backend: str | None = None) -> str:
    """What `attention_implementation=None` runs: cuDNN flash attention on a GPU for causal bf16 /
    fp16 attention with a head dim it supports (a multiple of 8, at most 256), else XLA's.

    XLA's own softmax attention materialises the [time, time] scores: on a GPU it runs out of
    memory at 32 x 2,048 tokens for the 385M model. Padded batches (generation) keep XLA's path:
    they pass an explicit mask."""
    backend = backend or jax.default_backend()
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if backend == "gpu" and half and not masked and head_dim % 8 == 0 and head_dim <= 256:
        return "cudnn"
    return "xla"


class Attention(nnx.Module):
    """Causal multi-head softmax attention with RoPE; fused q/k/v projection [D, 3, heads, head_dim]."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.qkv = layers.param(rngs, (c.hidden_dim, 3, c.num_heads, c.head_dim), ("embed", None, "heads", None),
                                c.param_dtype, c.init_std, inputs=1)
        self.out = layers.param(rngs, (c.num_heads, c.head_dim, c.hidden_dim), ("heads", None, "embed"),
                                c.param_dtype, c.init_std, inputs=2)

    def _project(self, x, positions):
        c = self.config
        q, k, v = layers.project("btd,dfhk->fbthk", x, self.qkv, c.dtype)
        return rope(q, positions, c.rope_theta), rope(k, positions, c.rope_theta), v

    def _attend(self, q, k, v, mask=None, is_causal=False):
        c = self.config
        implementation = c.attention_implementation
        if implementation is None:
            implementation = default_softmax_implementation(q.dtype, c.head_dim, masked=mask is not None)
        with jax.named_scope("attention"):
            o = jax.nn.dot_product_attention(
                q, k, v, mask=mask, is_causal=is_causal, scale=1.0 / math.sqrt(c.head_dim),
                implementation=implementation,
            )
        return layers.project("bthk,hkd->btd", o, self.out, c.dtype)

    @jax.named_scope("token_mixer")
    def __call__(self, x, positions, pad_mask=None):
        """x [batch, time, D] -> (y [batch, time, D], (k, v) [batch, time, heads, head_dim])."""
        q, k, v = self._project(x, positions)
        if pad_mask is None:
            return self._attend(q, k, v, is_causal=True), (k, v)
        time = x.shape[1]
        causal = jnp.tril(jnp.ones((time, time), bool))
        # Pads are never attended to; every query sees itself, so no softmax row is empty.
        mask = (causal & pad_mask[:, None, None, :]) | jnp.eye(time, dtype=bool)
        return self._attend(q, k, v, mask=mask), (k, v)

    @jax.named_scope("token_mixer")
    def decode(self, x, positions, keys, values, key_mask, index):
        """x [batch, 1, D]; keys/values [batch, length, heads, head_dim]; key_mask [batch, length]
        already True at `index`. Returns (y, keys, values) with this token written at `index`."""
        q, k, v = self._project(x, positions)
        keys = jax.lax.dynamic_update_slice_in_dim(keys, k.astype(keys.dtype), index, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(values, v.astype(values.dtype), index, axis=1)
        y = self._attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask=key_mask[:, None, None, :])
        return y, keys, values


class TransformerBlock(nnx.Module):
    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config, rngs=rngs)
        self.attention = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config, rngs=rngs)
        self.mlp = layers.GatedMLP(config.hidden_dim, config.mlp_dim, activation=jax.nn.silu, dtype=config.dtype,
                                   param_dtype=config.param_dtype, init_std=config.init_std, rngs=rngs)

    def __call__(self, x, positions, pad_mask=None):
        h, kv = self.attention(self.attention_norm(x), positions, pad_mask)
        x = x + h.astype(x.dtype)
        x = x + self.mlp(self.mlp_norm(x)).astype(x.dtype)
        return constrain(x, ("batch", None, None)), kv

    def decode(self, x, positions, keys, values, key_mask, index):
        h, keys, values = self.attention.decode(self.attention_norm(x), positions, keys, values, key_mask, index)
        x = x + h.astype(x.dtype)
        return x + self.mlp(self.mlp_norm(x)).astype(x.dtype), keys, values


class Transformer(nnx.Module):
    """LLaMA-style decoder: `model(tokens [batch, time] int, pad_mask=None) -> logits [batch, time,
    vocab] float32`; `prefill` / `decode` as TNL's, with a KV cache. Token ids are checked as TNL's
    (concrete ids outside [0, vocab_size) raise ArgumentError naming `tokens`; traced ones are
    trusted)."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        c = self.config = check_instance("config", config, TransformerConfig)
        self.embed = layers.param(rngs, (c.vocab_size, c.hidden_dim), ("vocab", "embed"), c.param_dtype, c.init_std)
        self.groups = LayerStack(c.num_layers, lambda layer, r: TransformerBlock(c, rngs=r), scan=c.scan_layers,
                                 remat=c.remat, rngs=rngs)
        self.final_norm = RMSNorm(c, rngs=rngs)
        self.lm_head = (None if c.tie_embeddings else
                        layers.param(rngs, (c.hidden_dim, c.vocab_size), ("embed", "vocab"), c.param_dtype, c.init_std,
                                     inputs=1))

    @property
    def groups_layout(self) -> tuple[tuple[int, int], ...]:
        """(first_layer, count) of each layer group: `self.groups.layout`."""
        return self.groups.layout

    def _embed(self, tokens):
        return layers.embed_tokens(self.embed, tokens, self.config.dtype, scale=self.config.scale_embedding)

    def _logits(self, x):
        return self._head(self.final_norm(x))

    def _head(self, hidden):
        """Normed hidden states [batch, time, D] -> logits [batch, time, vocab] float32."""
        with jax.named_scope("transformer"):
            return layers.lm_logits(hidden, self.embed, self.lm_head, self.config.dtype)

    @jax.named_scope("transformer")
    def _run(self, tokens, pad_mask, keep_kv: bool, logits: bool = True):
        """-> (logits [batch, time, vocab] float32, or the normed hidden states [batch, time, D] if not
        `logits`; per-group (k, v) [(count,) batch, time, heads, head_dim] (None unless keep_kv))."""
        layers.check_tokens(tokens, pad_mask)
        batch, time = tokens.shape
        positions = layers.positions_from_mask(pad_mask, batch, time)

        def layer(block, x, _):
            x, kv = block(x, positions, pad_mask)
            return x, (kv if keep_kv else None)

        x, kvs = self.groups(layer, self._embed(tokens))
        return (self._logits(x) if logits else self.final_norm(x)), kvs

    def __call__(self, tokens: jax.Array, *, pad_mask: jax.Array | None = None) -> jax.Array:
        """tokens [batch, time] int -> logits [batch, time, vocab] float32."""
        return self._run(tokens, pad_mask, keep_kv=False)[0]

    def hidden_states(self, tokens: jax.Array, *, pad_mask: jax.Array | None = None) -> jax.Array:
        """tokens [batch, time] int -> the final normed hidden states [batch, time, D] in the compute
        dtype, as TNL's (the logits are `layers.head_logits(hidden, *self.logits_weight())`)."""
        return self._run(tokens, pad_mask, keep_kv=False, logits=False)[0]

    def logits_weight(self) -> tuple[jax.Array, int]:
        """(weight, vocab_axis) of the LM head: the embedding [vocab, D] (tied) or lm_head [D, vocab]."""
        return layers.logits_weight(self.embed, self.lm_head)

    def prefill(self, tokens: jax.Array, *, pad_mask: jax.Array | None = None, max_new_tokens: int | None = None,
                logits: str = "all") -> tuple[jax.Array, TransformerCache]:
        """Forward over the prompt tokens [batch, time] (left-padded, pad_mask [batch, time] True at
        real tokens); returns (logits, cache with room for `max_new_tokens` (static) more tokens).

        `logits`: "all" gives [batch, time, vocab] float32; "last" only the last position's (every
        row's last real token), [batch, vocab] float32, what sampling needs."""
        check_choice("logits", logits, ("all", "last"))
        batch, time = tokens.shape
        extra = int(max_new_tokens or 0)
        hidden, kvs = self._run(tokens, pad_mask, keep_kv=True, logits=False)
        if logits == "last":
            out = self._head(hidden[:, -1:])[:, 0]
        else:
            out = self._head(hidden)
        pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 3) + [(0, extra), (0, 0), (0, 0)])
        keys = tuple(pad(k) for k, _ in kvs)
        values = tuple(pad(v) for _, v in kvs)
        real = jnp.ones((batch, time), bool) if pad_mask is None else pad_mask.astype(bool)
        key_mask = jnp.pad(real, ((0, 0), (0, extra)))
        position = jnp.sum(real.astype(jnp.int32), axis=1)
        return out, TransformerCache(keys, values, key_mask, jnp.asarray(time, jnp.int32), position)

    @jax.named_scope("transformer")
    def decode(self, token: jax.Array, cache: TransformerCache) -> tuple[jax.Array, TransformerCache]:
        """One step: token [batch] or [batch, 1] -> (logits [batch, vocab] or [batch, 1, vocab], cache).
        The cache must have room (see `prefill`'s max_new_tokens)."""
        squeeze = token.ndim == 1
        tokens = token[:, None] if squeeze else token
        positions = cache.position[:, None]
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            cache.key_mask, jnp.ones((tokens.shape[0], 1), bool), cache.index, axis=1)

        def layer(block, x, kv):
            x, k, v = block.decode(x, positions, kv[0], kv[1], key_mask, cache.index)
            return x, (k, v)

        x, kvs = self.groups.decode(layer, self._embed(tokens), tuple(zip(cache.keys, cache.values)))
        logits = self._logits(x)
        keys = tuple(k for k, _ in kvs)
        values = tuple(v for _, v in kvs)
        cache = TransformerCache(keys, values, key_mask, cache.index + 1, cache.position + 1)
        return (logits[:, 0] if squeeze else logits), cache
