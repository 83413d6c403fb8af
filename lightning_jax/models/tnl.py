"""TransNormerLLM in Flax NNX (docs/tnl.md): gated lightning-attention token mixer, SGLU, pre-norm.

    x = embed(tokens) * sqrt(D)
    for each layer:  x = x + TokenMixer(SRMSNorm(x));  x = x + SGLU(SRMSNorm(x))
    logits = SRMSNorm(x) @ embed^T      (or an untied lm_head)

Generation: `prefill` runs the block algorithm and keeps each layer's fp32 state [batch, heads,
dim_k, dim_v]; `decode` advances one token with the recurrence S = lambda S + k^T v, o = q S. The
cache never grows with the context. Left-padded batches are exact: k and v are zeroed at pad
positions, so the state stays zero until a row's first real token, and positions (for LRPE) count
from that token.

The layers live in a `LayerStack` (models/stack.py) at `self.groups`; each TNLBlock is one layer.
Named scopes make profiles read tnl/embed, tnl/layers/layer_<i>/{token_mixer/attention,
channel_mixer} (layers_<first>_<last>/... for a scanned group), tnl/lm_head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lightning_jax.attention import decode_step, lightning_attention
from lightning_jax.attention.api import check_segment_ids
from lightning_jax.checks import ArgumentError, check_choice, check_instance, check_int
from lightning_jax.models import layers, tnl_decode
from lightning_jax.models.config import TNLConfig
from lightning_jax.models.sharding import constrain, context_axis_of, logical_to_spec, sharded_call
from lightning_jax.models.stack import LayerStack

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TNLCache:
    """Decoding state: its size depends on batch and model, never on the context length.

    states: one fp32 array per layer group (see `LayerStack`): [batch, heads, dim_k, dim_v]
      for a single layer, [count, batch, heads, dim_k, dim_v] for a scanned stack. dim_k is
      2 x head_dim on LRPE layers. Use `TNL.layer_states(cache)` for a per-layer list.
    position: [batch] int32, the position of the next token of each row (real tokens so far).
    """

    states: tuple[jax.Array, ...]
    position: jax.Array

    def reset_rows(self, rows: jax.Array) -> "TNLCache":
        """The cache with the rows where `rows` ([batch] bool) is True back at the start of a
        sequence (zero states, position 0), e.g. where a new document begins. Differentiable: the
        reset rows pass no gradient to the old states."""

        def reset(state):  # [batch, ...] or [count, batch, ...]: the batch axis is 4th from the end
            return jnp.where(rows[:, None, None, None], jnp.zeros((), state.dtype), state)

        return TNLCache(tuple(reset(s) for s in self.states), jnp.where(rows, 0, self.position))


class LRPE(nnx.Module):
    """Linearised relative positional encoding: x -> [x cos(t theta), x sin(t theta)].

    q'.k' = sum q k cos((t - s) theta), so only relative positions matter; the absolute offset is
    still needed when decoding. theta [heads, head_dim] is learned, initialised to
    10000^(-2i / (heads x head_dim)) over the flattened (head, channel) index i."""

    def __init__(self, num_heads: int, head_dim: int, *, param_dtype, rngs: nnx.Rngs):
        width = num_heads * head_dim

        def init(key, shape, dtype):
            del key
            return (10000.0 ** (-2.0 * jnp.arange(width, dtype=F32) / width)).reshape(shape).astype(dtype)

        self.theta = layers.param(rngs, (num_heads, head_dim), ("heads", None), param_dtype, 0.0, init=init)

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [batch, time, heads, head_dim]; positions: [batch, time] -> [batch, time, heads, 2 head_dim]."""
        angle = positions.astype(F32)[:, :, None, None] * self.theta[...].astype(F32)
        x32 = x.astype(F32)
        return jnp.concatenate([x32 * jnp.cos(angle), x32 * jnp.sin(angle)], axis=-1).astype(x.dtype)


class TokenMixer(nnx.Module):
    """Gated linear attention ("NormLinearAttention"): fused q/k/v/u projection, silu on q and k
    (`config.attention_activation`: silu, relu or none), optional LRPE, lightning attention with
    this layer's fixed rates (no 1/sqrt(d) scale), SRMSNorm over the whole heads x head_dim, gate u
    (no sigmoid; left out with `config.output_gate=False`), output projection."""

    def __init__(self, config: TNLConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        self.config = c
        # q, k, v and the gate u in one [D, 4, heads, head_dim] weight (q, k, v only without the gate).
        self.qkvu = layers.param(rngs, (c.hidden_dim, c.mixer_projections, c.num_heads, c.head_dim),
                                 ("embed", None, "heads", None), c.param_dtype, c.init_std, inputs=1)
        self.out = layers.param(rngs, (c.num_heads, c.head_dim, c.hidden_dim), ("heads", None, "embed"),
                                c.param_dtype, c.init_std, inputs=2)
        self.lrpe = (LRPE(c.num_heads, c.head_dim, param_dtype=c.param_dtype, rngs=rngs)
                     if c.uses_lrpe(layer) else None)

    def _project(self, x, positions, pad_mask):
        dtype = jnp.dtype(self.config.dtype)
        q, k, v, *u = layers.project("btd,dfhk->fbthk", x, self.qkvu, dtype)
        u = u[0] if u else None  # None: no output gate
        activation = layers.ACTIVATIONS[self.config.attention_activation]
        if activation is not None:
            q, k = activation(q), activation(k)
        if self.lrpe is not None:
            q, k = self.lrpe(q, positions), self.lrpe(k, positions)
        if pad_mask is not None:  # zero k and v at pads: exact for left padding (state stays 0)
            keep = pad_mask[:, :, None, None]
            k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
        return q, k, v, u

    def _output(self, o, u):
        dtype = jnp.dtype(self.config.dtype)
        o = layers.srms_norm(o, self.config.norm_eps, axes=(-2, -1)).astype(dtype)
        return layers.project("bthk,hkd->btd", o if u is None else u * o, self.out, dtype)

    @jax.named_scope("token_mixer")
    def __call__(self, x, rates, positions, pad_mask=None, *, initial_state=None, return_state=False,
                 time: str | None = "time", segment_ids=None):
        """x: [batch, time, D]; rates: [heads]; positions, pad_mask, segment_ids (packed documents:
        the state resets where the id changes): [batch, time]; initial_state: None (zeros) or fp32
        [batch, heads, dim_k, dim_v], for each row's first document. `time`: the logical name of the time axis:
        "time" splits it over the mesh's context axis (if any), and each device runs the op on its
        slice with context_axis= (one all-gather of fp32 states per call); None keeps it whole.

        Returns (y [batch, time, D], final state fp32 [batch, heads, dim_k, dim_v] or None)."""
        q, k, v, u = self._project(x, positions, pad_mask)
        c = self.config
        bthd, bhde = ("batch", time, "heads", None), ("batch", "heads", None, None)
        context_axis = context_axis_of(logical_to_spec(bthd, q.shape))

        def attend(q, k, v, rates, initial_state, segment_ids):
            return lightning_attention(
                q, k, v, jax.lax.stop_gradient(rates), initial_state=initial_state, return_final_state=True,
                block_size=c.block_size, implementation=c.attention_implementation, context_axis=context_axis,
                segment_ids=segment_ids,
            )

        with jax.named_scope("attention"):
            o, state = sharded_call(attend, (q, k, v, rates, initial_state, segment_ids),
                                    (bthd, bthd, bthd, ("heads",), bhde, ("batch", time)), (bthd, bhde))
        return self._output(o, u), (state if return_state else None)

    @jax.named_scope("token_mixer")
    def decode(self, x, rates, positions, state):
        """One token: x [batch, 1, D], positions [batch, 1], state fp32 [batch, heads, dim_k, dim_v]."""
        q, k, v, u = self._project(x, positions, None)
        with jax.named_scope("attention"):
            o, state = decode_step(q[:, 0], k[:, 0], v[:, 0], rates, state)
        return self._output(o[:, None], u), state


class TNLBlock(nnx.Module):
    """Pre-norm block: x + TokenMixer(SRMSNorm(x)), then x + SGLU(SRMSNorm(x))."""

    def __init__(self, config: TNLConfig, layer: int, *, rngs: nnx.Rngs):
        self.config = config
        self.mixer = TokenMixer(config, layer, rngs=rngs)
        self.glu = layers.GatedMLP(config.hidden_dim, config.glu_dim, activation=None, dtype=config.dtype,
                                   param_dtype=config.param_dtype, init_std=config.init_std, rngs=rngs)

    def _norm(self, x):
        return layers.srms_norm(x, self.config.norm_eps).astype(x.dtype)

    def _decode_path(self, batch: int) -> str:
        """How a decoding step runs: "xla", "kernels" (tnl_decode's, compiled) or "interpreted"
        (tnl_decode's in Pallas interpret mode)."""
        choice = self.config.decode_implementation
        on_gpu = not tnl_decode.interpreted()
        if choice == "xla" or (choice is None and not on_gpu):
            return "xla"
        reason = tnl_decode.covers(self, batch)
        if reason is None:
            return "kernels" if on_gpu else "interpreted"
        if choice == "pallas":
            raise ValueError(f"decode_implementation: got 'pallas', but the fused decoding kernels cannot run "
                             f"this step: {reason}")
        return "xla"

    def __call__(self, x, rates, positions, pad_mask=None, *, initial_state=None, return_state=False,
                 time: str | None = "time", segment_ids=None):
        h, state = self.mixer(self._norm(x), rates, positions, pad_mask, initial_state=initial_state,
                              return_state=return_state, time=time, segment_ids=segment_ids)
        x = x + h.astype(x.dtype)
        x = x + self.glu(self._norm(x)).astype(x.dtype)
        return constrain(x, ("batch", time, None)), state

    def decode(self, x, rates, positions, state):
        """One token: x [batch, 1, D] -> (x, the new state); positions [batch, 1]; state fp32
        [batch, heads, dim_k, head_dim]. Five fused kernels or XLA (`config.decode_implementation`)."""
        path = self._decode_path(x.shape[0])
        if path != "xla":
            return tnl_decode.block_decode(self, x, rates, positions, state, interpret=path == "interpreted")
        h, state = self.mixer.decode(self._norm(x), rates, positions, state)
        x = x + h.astype(x.dtype)
        return x + self.glu(self._norm(x)).astype(x.dtype), state


class TNL(nnx.Module):
    """TransNormerLLM decoder.

    `model(tokens [batch, time] int32, pad_mask=None) -> logits [batch, time, vocab] float32`.
    `pad_mask` [batch, time] bool (True at real tokens) supports left-padded batches;
    `segment_ids` [batch, time] int (non-decreasing along each row) keeps packed documents apart:
    attention's state resets where the id changes and LRPE positions restart (each document gives
    what it gives alone). Token ids
    outside [0, vocab_size) raise ArgumentError naming `tokens` when concrete; traced ids (under
    `jit`) are trusted (`layers.check_token_range`).
    """

    def __init__(self, config: TNLConfig, *, rngs: nnx.Rngs):
        c = self.config = check_instance("config", config, TNLConfig)
        self.embed = layers.param(rngs, (c.vocab_size, c.hidden_dim), ("vocab", "embed"), c.param_dtype, c.init_std)
        # LRPE layers have an extra parameter, so they never share a scanned group with others.
        self.groups = LayerStack(c.num_layers, lambda layer, r: TNLBlock(c, layer, rngs=r), kind=c.uses_lrpe,
                                 scan=c.scan_layers, remat=c.remat, rngs=rngs)
        self.lm_head = (None if c.tie_embeddings else
                        layers.param(rngs, (c.hidden_dim, c.vocab_size), ("embed", "vocab"), c.param_dtype, c.init_std,
                                     inputs=1))

    @property
    def groups_layout(self) -> tuple[tuple[int, int], ...]:
        """(first_layer, count) of each layer group: `self.groups.layout`."""
        return self.groups.layout

    # Pieces ----------------------------------------------------------------------------------

    def _rates(self) -> tuple:
        """Per-group decay rates: [heads] for one layer, [count, heads] for a scanned group. Numpy
        constants, never trained."""
        return self.groups.per_layer(self.config.rates)

    def _embed(self, tokens, time=None):
        return layers.embed_tokens(self.embed, tokens, self.config.dtype, scale=self.config.scale_embedding, time=time)

    def _final_norm(self, x):
        """The last SRMSNorm, in the compute dtype: what the LM head multiplies."""
        return layers.srms_norm(x, self.config.norm_eps).astype(self.config.dtype)

    def _logits(self, x):
        return self._head(self._final_norm(x))

    @jax.named_scope("tnl")
    def _run(self, tokens, pad_mask, return_states: bool, logits: bool = True, segment_ids=None):
        """-> (logits [batch, time, vocab] float32, or the normed hidden states [batch, time, D] if not
        `logits`; per-group final states (None unless return_states))."""
        layers.check_tokens(tokens, pad_mask)
        batch, time = tokens.shape
        segment_ids = _check_segment_ids(segment_ids, tokens, pad_mask)
        positions = (layers.positions_from_mask(pad_mask, batch, time) if segment_ids is None
                     else layers.positions_in_documents(segment_ids))
        # Training and evaluation split time over the mesh's context axis (if any); prefill keeps it
        # whole. The embedding's output is split like the blocks'.
        time_axis = None if return_states else "time"

        def layer(block, x, rates):
            return block(x, rates, positions, pad_mask, return_state=return_states, time=time_axis,
                         segment_ids=segment_ids)

        x = self._embed(tokens, time=time_axis)
        x, states = self.groups(layer, x, self._rates())
        return (self._logits(x) if logits else self._final_norm(x)), states

    # Public API ------------------------------------------------------------------------------

    def __call__(self, tokens: jax.Array, *, pad_mask: jax.Array | None = None,
                 segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, time] int -> logits [batch, time, vocab] float32."""
        return self._run(tokens, pad_mask, return_states=False, segment_ids=segment_ids)[0]

    def hidden_states(self, tokens: jax.Array, *, pad_mask: jax.Array | None = None,
                      segment_ids: jax.Array | None = None) -> jax.Array:
        """tokens [batch, time] int -> the final normed hidden states [batch, time, D] in the compute
        dtype. The logits are `layers.head_logits(hidden, *self.logits_weight())`; the training loss
        computes them block by block from here (lightning_jax/training/loss.py)."""
        return self._run(tokens, pad_mask, return_states=False, logits=False, segment_ids=segment_ids)[0]

    def empty_cache(self, batch: int) -> TNLCache:
        """The cache at the start of `batch` sequences: zero states, position 0."""
        c = self.config

        def zeros(layer):
            dim_k = c.head_dim * (2 if c.uses_lrpe(layer) else 1)
            return jnp.zeros((batch, c.num_heads, dim_k, c.head_dim), F32)

        return TNLCache(states=self.groups.per_layer(zeros), position=jnp.zeros((batch,), jnp.int32))

    def extend(self, tokens: jax.Array, cache: TNLCache, *, pad_mask: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, TNLCache]:
        """Continues each row's sequence from `cache` with `tokens` [batch, time] int: the final
        normed hidden states [batch, time, D] in the compute dtype, and the cache after these tokens.

        `pad_mask` [batch, time] bool (True at real tokens) is for left padding only: a row's pads
        must come before its first real token of the whole sequence (while its state is still
        zero). Pads leave the state and `cache.position` as they were, as in `prefill`; a pad after
        a real token would still decay the state.

        Feeding a sequence through `extend` a chunk at a time, from `empty_cache`, gives the hidden
        states of one `hidden_states` call over the whole sequence: each layer's state carries
        everything earlier tokens contribute, so memory follows the chunk, not the sequence
        (training/chunked.py trains this way). Differentiable in the parameters and in
        `cache.states`. Time is split over the mesh's context axis (if any), as in training.

        `segment_ids` [batch, time] (packed documents, as in `__call__`): a row's first document
        continues the cache's sequence, later ones start from zero. A document that starts at this
        call's first token needs its row reset first (`cache.reset_rows`)."""
        return self._extend(tokens, cache, pad_mask, time_axis="time", segment_ids=segment_ids)

    @jax.named_scope("tnl")
    def _extend(self, tokens, cache, pad_mask, time_axis: str | None, segment_ids=None):
        """`extend`, the time axis named `time_axis` ("time": split over the context axis; None: whole)."""
        layers.check_tokens(tokens, pad_mask)
        batch, time = tokens.shape
        if cache.position.shape != (batch,):
            raise ArgumentError("cache.position", f"got shape {cache.position.shape}, expected [batch] = ({batch},)")
        segment_ids = _check_segment_ids(segment_ids, tokens, pad_mask)
        if segment_ids is not None:
            positions = layers.positions_in_documents(segment_ids, cache.position)
            position = positions[:, -1] + 1
        else:
            positions = cache.position[:, None] + layers.positions_from_mask(pad_mask, batch, time)
            position = cache.position + (time if pad_mask is None else jnp.sum(pad_mask.astype(jnp.int32), axis=1))

        def layer(block, x, rates_and_state):
            rates, state = rates_and_state
            return block(x, rates, positions, pad_mask, initial_state=state, return_state=True, time=time_axis,
                         segment_ids=segment_ids)

        x = self._embed(tokens, time=time_axis)
        x, states = self.groups(layer, x, tuple(zip(self._rates(), cache.states, strict=True)))
        return self._final_norm(x), TNLCache(states, position)

    def logits_weight(self) -> tuple[jax.Array, int]:
        """(weight, vocab_axis) of the LM head: the embedding [vocab, D] (tied) or lm_head [D, vocab]."""
        return layers.logits_weight(self.embed, self.lm_head)

    def prefill(self, tokens: jax.Array, *, pad_mask: jax.Array | None = None, max_new_tokens: int | None = None,
                logits: str = "all", chunk: int | None = None) -> tuple[jax.Array, TNLCache]:
        """Forward over a (left-padded) prompt, keeping each layer's final state.

        Args:
          tokens: [batch, time] int; pad_mask: [batch, time] bool, True at real tokens (left padding).
          max_new_tokens: accepted for a common interface with `Transformer.prefill` and ignored:
            this cache never grows.
          logits: "all": logits at every position, [batch, time, vocab] float32; "last": only at the
            last position (every row's last real token, with left padding), [batch, vocab] float32:
            what sampling needs, without the [batch, time, vocab] array.
          chunk: None runs the prompt in one call. An int (static) runs a prompt longer than `chunk`
            through `extend`, `chunk` tokens at a time (the first piece takes the remainder),
            carrying every layer's state, so activations follow the chunk, not the prompt. Exact,
            left-padded batches included; the results match the one-call prefill to rounding.

        Returns (logits as above, cache)."""
        check_choice("logits", logits, ("all", "last"))
        if chunk is not None:
            check_int("chunk", chunk, minimum=1)
        if chunk is None or tokens.shape[1] <= chunk:
            hidden, states = self._run(tokens, pad_mask, return_states=True, logits=False)
            if pad_mask is None:
                position = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
            else:
                position = jnp.sum(pad_mask.astype(jnp.int32), axis=1)
            cache = TNLCache(states=states, position=position)
        else:
            hidden, cache = self._prefill_chunks(tokens, pad_mask, chunk, keep_all=logits == "all")
        if logits == "last":
            return self._head(hidden[:, -1:])[:, 0], cache
        return self._head(hidden), cache

    def _head(self, hidden):
        """Normed hidden states [batch, time, D] (compute dtype) -> logits [batch, time, vocab] float32."""
        with jax.named_scope("tnl"):
            return layers.lm_logits(hidden, self.embed, self.lm_head, self.config.dtype)

    def _prefill_chunks(self, tokens, pad_mask, chunk: int, keep_all: bool):
        """`prefill` through `extend`: the first time % chunk tokens, then a `lax.scan` over chunks,
        time kept whole on each device (as the one-call prefill). -> (normed hidden [batch, time, D]
        if keep_all else the last position's [batch, 1, D], cache)."""
        layers.check_tokens(tokens, pad_mask)
        batch, time = tokens.shape
        count, rest = divmod(time, chunk)
        cache = self.empty_cache(batch)
        first = None
        if rest:
            first, cache = self._extend(tokens[:, :rest], cache, None if pad_mask is None else pad_mask[:, :rest],
                                        time_axis=None)

        def split(x):  # [batch, count * chunk] -> [count, batch, chunk]
            return x[:, rest:].reshape(batch, count, chunk).swapaxes(0, 1)

        def step(cache, piece):
            piece_tokens, piece_mask = piece
            hidden, cache = self._extend(piece_tokens, cache, piece_mask, time_axis=None)
            return cache, (hidden if keep_all else hidden[:, -1:])

        masks = None if pad_mask is None else split(pad_mask)
        cache, hidden = jax.lax.scan(step, cache, (split(tokens), masks))
        if not keep_all:
            return hidden[-1], cache
        hidden = hidden.swapaxes(0, 1).reshape(batch, count * chunk, hidden.shape[-1])
        return (hidden if first is None else jnp.concatenate([first, hidden], axis=1)), cache

    @jax.named_scope("tnl")
    def decode(self, token: jax.Array, cache: TNLCache) -> tuple[jax.Array, TNLCache]:
        """One step: token [batch] or [batch, 1] int -> (logits [batch, vocab] or [batch, 1, vocab]
        float32, the advanced cache)."""
        squeeze = token.ndim == 1
        tokens = token[:, None] if squeeze else token
        if tokens.ndim != 2 or tokens.shape[1] != 1:
            raise ValueError(f"token: got shape {token.shape}, expected [batch] or [batch, 1]")
        positions = cache.position[:, None]

        def layer(block, x, rates_and_state):
            rates, state = rates_and_state
            return block.decode(x, rates, positions, state)

        x, states = self.groups.decode(layer, self._embed(tokens), tuple(zip(self._rates(), cache.states)))
        logits = self._logits(x)
        return (logits[:, 0] if squeeze else logits), TNLCache(states, cache.position + 1)

    def layer_states(self, cache: TNLCache) -> list[jax.Array]:
        """The cache's states as one fp32 [batch, heads, dim_k, dim_v] array per layer."""
        return self.groups.unstack(cache.states)


def _check_segment_ids(segment_ids, tokens, pad_mask):
    """None, or `segment_ids` as int32 [batch, time] (tokens' shape, non-decreasing rows; the op's
    check) when there is no pad_mask."""
    if segment_ids is None:
        return None
    if pad_mask is not None:
        raise ArgumentError("segment_ids", "got segment_ids together with pad_mask, expected one of them: "
                                           "left padding and packed documents do not mix")
    return check_segment_ids(segment_ids, *tokens.shape, like="tokens")
