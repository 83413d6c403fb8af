"""Model configurations: frozen dataclasses with classmethod presets.

`TNLConfig` describes TransNormerLLM (docs/tnl.md); `TransformerConfig` the LLaMA-style baseline with
the same sizes, so that speed and quality compare on equal terms. Both validate every field in
`__post_init__` (errors name the field, the value and what was expected), so a bad override through
`dataclasses.replace(cfg, ...)` fails at once rather than deep inside a jit trace. Both count their
parameters (`num_params`) and their training FLOPs per token (`flops_per_token`, for MFU).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lightning_jax.attention.registry import DEFAULT_BLOCK_SIZE, IMPLEMENTATIONS, next_power_of_2
from lightning_jax.attention.schedules import SCHEDULES
from lightning_jax.checks import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_power_of_two,
    fail,
    is_int,
)

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# None: lightning_attention's default for the backend (registry.default_implementation).
ATTENTION_IMPLEMENTATIONS = (None, *IMPLEMENTATIONS)
SOFTMAX_IMPLEMENTATIONS = (None, "xla", "cudnn")
# TNL's activation on q and k (the official config's "linear_act_fun"): silu in the released
# models; relu and none (identity) for checkpoints trained with those.
ATTENTION_ACTIVATIONS = ("silu", "relu", "none")
# How TNL runs a decoding step: None picks the fused Pallas kernels on a GPU where they cover the
# call (tnl_decode.covers) and XLA otherwise; "pallas" insists on them (interpret mode off a GPU).
DECODE_IMPLEMENTATIONS = (None, "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class _CommonConfig:
    """Fields and checks shared by both model families."""

    vocab_size: int = 256
    num_layers: int = 2
    hidden_dim: int = 64  # D, the residual stream width
    num_heads: int = 4
    # None: hidden_dim // num_heads, resolved at construction (so after dataclasses.replace of
    # hidden_dim or num_heads, pass head_dim=None too if it should follow).
    head_dim: int | None = None
    tie_embeddings: bool = True
    scale_embedding: bool = True  # multiply token embeddings by sqrt(D)
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: matmul operands and activations
    param_dtype: str = "float32"  # storage dtype of the parameters
    scan_layers: bool = False  # lax.scan over stacked identical layers (faster compile, long models)
    remat: str = "none"  # activation checkpointing per layer: one of REMAT_POLICIES

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "hidden_dim", "num_heads"):
            check_int(name, getattr(self, name), minimum=1)
        if self.hidden_dim % self.num_heads:
            fail("num_heads", self.num_heads, f"a divisor of hidden_dim={self.hidden_dim}")
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_dim // self.num_heads)
        check_int("head_dim", self.head_dim, minimum=1)
        for name in ("tie_embeddings", "scale_embedding", "scan_layers"):
            check_bool(name, getattr(self, name))
        check_float("norm_eps", self.norm_eps, low=0.0, open_low=True)
        check_float("init_std", self.init_std, low=0.0, open_low=True)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("param_dtype", self.param_dtype, DTYPES)
        check_choice("remat", self.remat, REMAT_POLICIES)

    @property
    def attention_dim(self) -> int:
        """heads x head_dim: the width of the token mixer's q, k, v (and gate) projections."""
        return self.num_heads * self.head_dim

    def _embedding_params(self) -> int:
        return self.vocab_size * self.hidden_dim * (1 if self.tie_embeddings else 2)


@dataclasses.dataclass(frozen=True)
class TNLConfig(_CommonConfig):
    """TransNormerLLM: pre-norm blocks of a gated lightning-attention token mixer and an SGLU.

    Sizes: D = `hidden_dim`; the mixer projects D -> 4 x `num_heads` x `head_dim` (q, k, v, gate u)
    and back; the SGLU is D -> `glu_dim` (twice) -> D. `lrpe_layers` lists the layers whose q and k
    get LRPE (doubling their head dim); the released models use layer 0 only. `decay` names the
    per-layer rate schedule (lightning_jax.SCHEDULES); rates are fixed, not trained.
    `attention_activation` is applied to q and k (one of ATTENTION_ACTIVATIONS; "none": identity).
    `output_gate`: the mixer multiplies its normed output by the gate u (as published); False drops
    u and its projection (the paper's "without gate" ablation: D x heads x head_dim fewer per layer).
    `attention_implementation` / `block_size` are passed to `lightning_attention` (None: its default).
    `decode_implementation` runs the decoding step of generation (one of DECODE_IMPLEMENTATIONS):
    "xla", "pallas" (each layer in five fused kernels, `lightning_jax.models.tnl_decode`; the model
    must be in the decoding layout, as `generation.decoding_model` returns it), or None: "pallas" on
    a GPU where it covers the call (batch <= 2, one device), "xla" otherwise.
    """

    glu_dim: int = 128
    lrpe_layers: tuple[int, ...] = (0,)
    decay: str = "tnl"
    attention_activation: str = "silu"
    output_gate: bool = True
    attention_implementation: str | None = None
    block_size: int | None = None
    decode_implementation: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int("glu_dim", self.glu_dim, minimum=1)
        if not isinstance(self.lrpe_layers, tuple) or any(
            not is_int(l) or not 0 <= l < self.num_layers for l in self.lrpe_layers
        ):
            fail("lrpe_layers", self.lrpe_layers, f"a tuple of layer indices in [0, num_layers={self.num_layers})")
        if len(set(self.lrpe_layers)) != len(self.lrpe_layers):
            fail("lrpe_layers", self.lrpe_layers, "no repeated layer")
        check_choice("decay", self.decay, tuple(SCHEDULES))
        check_choice("attention_activation", self.attention_activation, ATTENTION_ACTIVATIONS)
        check_bool("output_gate", self.output_gate)
        check_choice("attention_implementation", self.attention_implementation, ATTENTION_IMPLEMENTATIONS)
        check_power_of_two("block_size", self.block_size, allow_none=True)
        check_choice("decode_implementation", self.decode_implementation, DECODE_IMPLEMENTATIONS)

    # Presets ---------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides) -> "TNLConfig":
        """Byte-level toy model for CPU tests: 3 layers, D 64, 4 heads of 16, fp32 compute."""
        fields = dict(vocab_size=256, num_layers=3, hidden_dim=64, num_heads=4, glu_dim=128)
        return cls(**{**fields, **overrides})

    @classmethod
    def tnl_385m(cls, **overrides) -> "TNLConfig":
        """TNL-385M (released config defaults): 24 layers, D 1024, 8 heads of 128, glu 2816, vocab
        64000, LRPE on layer 0, tied embeddings. About 0.399 B parameters."""
        fields = dict(
            vocab_size=64000, num_layers=24, hidden_dim=1024, num_heads=8, head_dim=128, glu_dim=2816,
            dtype="bfloat16",
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def tnl_15b(cls, **overrides) -> "TNLConfig":
        """TNL3-15B: 42 layers, D 5120, 40 heads of 128. The vocab (~100K in the report) and glu_dim
        (2.75 x D, the 385M ratio) are our choices: verify against a checkpoint before loading one."""
        fields = dict(
            vocab_size=100352, num_layers=42, hidden_dim=5120, num_heads=40, head_dim=128, glu_dim=14080,
            dtype="bfloat16",
        )
        return cls(**{**fields, **overrides})

    # Derived quantities ----------------------------------------------------------------------

    def uses_lrpe(self, layer: int) -> bool:
        return layer in self.lrpe_layers

    def key_dim(self, layer: int) -> int:
        """dim_k of layer `layer`'s attention: LRPE concatenates cos and sin parts, doubling it."""
        return 2 * self.head_dim if self.uses_lrpe(layer) else self.head_dim

    def rates(self, layer: int) -> np.ndarray:
        """Decay rates of layer `layer`: float32 numpy [num_heads], a constant (never trained)."""
        return SCHEDULES[self.decay](self.num_heads, layer, self.num_layers)

    @property
    def mixer_projections(self) -> int:
        """The token mixer's input projections: q, k, v and the gate u (3 without `output_gate`)."""
        return 4 if self.output_gate else 3

    def _layer_matmul_params(self) -> int:
        mixer = self.hidden_dim * self.mixer_projections * self.attention_dim + self.attention_dim * self.hidden_dim
        glu = 3 * self.hidden_dim * self.glu_dim
        return mixer + glu

    def num_params(self) -> int:
        """Parameters: embeddings (+ untied lm_head), per-layer projections, LRPE thetas. Norms
        (SRMSNorm) have none."""
        lrpe = len(self.lrpe_layers) * self.attention_dim
        return self._embedding_params() + self.num_layers * self._layer_matmul_params() + lrpe

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

        6 x (matmul parameters, lm_head included, the embedding lookup not) plus lightning attention
        counted with its chunked cost, which does not grow with `seq_len` beyond the block: per head
        and token, forward ~ 2 C (dim_k + dim_v) (intra-block, C = block size) + 4 dim_k dim_v
        (inter-block), backward about twice that. Not the T^2 of softmax attention.
        """
        check_int("seq_len", seq_len, minimum=1)
        matmul = self.num_layers * self._layer_matmul_params() + self.vocab_size * self.hidden_dim
        # The block size the op would use: the config's, else the implementations' default; a
        # sequence shorter than that fills one block of the next power of two.
        block = min(self.block_size or DEFAULT_BLOCK_SIZE, next_power_of_2(seq_len))
        attention = 0
        for layer in range(self.num_layers):
            dk, dv = self.key_dim(layer), self.head_dim
            attention += 3 * self.num_heads * (2 * block * (dk + dv) + 4 * dk * dv)
        return float(6 * matmul + attention)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(_CommonConfig):
    """LLaMA-style baseline: pre-norm blocks of RMSNorm (learned weight), RoPE causal softmax
    attention (jax.nn.dot_product_attention; cuDNN flash attention on GPU) and a SwiGLU MLP.

    `mlp_dim` is the SwiGLU width (TNL's glu_dim plays the same role). The presets (`tiny`,
    `transformer_385m`, `transformer_15b`) mirror a TNL preset ("the same sizes") and set it so that
    both models have the same parameter count (`matched_mlp_dim`; TNL's gate projection u and LRPE
    angles are paid for with a wider MLP); an explicit `mlp_dim` (also as a preset override) wins,
    and `mlp_dim=None` given to a preset means the matched width. The bare dataclass default (128)
    matches nothing. `attention_implementation`
    is passed to jax.nn.dot_product_attention; None picks cuDNN flash attention on a GPU for bf16 /
    fp16 (`transformer.default_softmax_implementation`), XLA's otherwise.
    """

    mlp_dim: int = 128
    rope_theta: float = 10000.0
    scale_embedding: bool = False  # LLaMA does not scale its embeddings
    tie_embeddings: bool = True  # as TNL, so the two compare on equal terms
    attention_implementation: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_int("mlp_dim", self.mlp_dim, minimum=1)
        check_float("rope_theta", self.rope_theta, low=0.0, open_low=True)
        if self.head_dim % 2:
            fail("head_dim", self.head_dim, "an even number (RoPE rotates pairs)")
        check_choice("attention_implementation", self.attention_implementation, SOFTMAX_IMPLEMENTATIONS)

    @classmethod
    def tiny(cls, **overrides) -> "TransformerConfig":
        """Byte-level toy model with the sizes and parameter count of `TNLConfig.tiny()` (given the
        same overrides): 3 layers, D 64, 4 heads of 16, mlp_dim 149 (TNL's glu_dim is 128)."""
        return same_size_transformer(TNLConfig.tiny, overrides)

    @classmethod
    def transformer_385m(cls, **overrides) -> "TransformerConfig":
        """The sizes of TNL-385M (24 layers, D 1024, 8 heads of 128, vocab 64000) and its parameter
        count: mlp_dim 3136 (TNL's glu_dim is 2816; the multiple of 64 nearest the exact match,
        0.4 % fewer parameters than TNL-385M)."""
        return same_size_transformer(TNLConfig.tnl_385m, overrides, multiple_of=64)

    @classmethod
    def transformer_15b(cls, **overrides) -> "TransformerConfig":
        """The sizes and parameter count of our TNL 15B preset (42 layers, D 5120, 40 heads of 128)."""
        return same_size_transformer(TNLConfig.tnl_15b, overrides, multiple_of=64)

    def _layer_matmul_params(self) -> int:
        attention = 4 * self.hidden_dim * self.attention_dim  # q, k, v, o
        return attention + 3 * self.hidden_dim * self.mlp_dim

    def num_params(self) -> int:
        """Parameters: embeddings (+ untied lm_head), per-layer projections, RMSNorm weights."""
        norms = (2 * self.num_layers + 1) * self.hidden_dim
        return self._embedding_params() + self.num_layers * self._layer_matmul_params() + norms

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul parameters (lm_head included) plus causal softmax
        attention, 6 x layers x heads x head_dim x seq_len (QK^T and PV over on average seq_len / 2
        keys, forward and backward)."""
        check_int("seq_len", seq_len, minimum=1)
        matmul = self.num_layers * self._layer_matmul_params() + self.vocab_size * self.hidden_dim
        attention = 6 * self.num_layers * self.attention_dim * seq_len
        return float(6 * matmul + attention)


# The fields a Transformer preset takes from its TNL counterpart ("the same sizes"). Not
# scale_embedding (LLaMA does not scale) nor attention_implementation (another set of choices).
SHARED_FIELDS = ("vocab_size", "num_layers", "hidden_dim", "num_heads", "head_dim", "tie_embeddings", "norm_eps",
                 "init_std", "dtype", "param_dtype", "scan_layers", "remat")


def matched_mlp_dim(tnl: TNLConfig, multiple_of: int = 1, **fields) -> int:
    """The SwiGLU width at which a Transformer with `tnl`'s sizes (and `fields`, any other
    TransformerConfig fields) has `tnl`'s parameter count: the multiple of `multiple_of` nearest the
    exact match (at least `multiple_of`).

    Per layer TNL has 5 D x heads x head_dim mixer weights (q, k, v, gate u, out) against the
    Transformer's 4 (q, k, v, o), plus LRPE angles; the Transformer has learned norm weights. The
    difference goes to the MLP, 3 x D weights per unit of width per layer."""
    if not isinstance(tnl, TNLConfig):
        fail("tnl", type(tnl).__name__, "a TNLConfig")
    check_int("multiple_of", multiple_of, minimum=1)
    shared = {name: getattr(tnl, name) for name in SHARED_FIELDS}
    base = TransformerConfig(**{**shared, **fields, "mlp_dim": 1})
    per_unit = 3 * base.hidden_dim * base.num_layers
    exact = 1 + (tnl.num_params() - base.num_params()) / per_unit
    return max(multiple_of, multiple_of * round(exact / multiple_of))


def same_size_transformer(tnl_preset, overrides: dict, multiple_of: int = 1) -> TransformerConfig:
    """The Transformer with the sizes of `tnl_preset(**shared overrides)` and, unless `overrides`
    give an `mlp_dim` (not None), its parameter count (`matched_mlp_dim`)."""
    shared = {k: v for k, v in overrides.items() if k in SHARED_FIELDS}
    own = {k: v for k, v in overrides.items() if k not in SHARED_FIELDS}
    tnl = tnl_preset(**shared)
    fields = {**{name: getattr(tnl, name) for name in SHARED_FIELDS}, **own}
    if fields.get("mlp_dim") is None:
        rest = {k: v for k, v in fields.items() if k not in SHARED_FIELDS and k != "mlp_dim"}
        fields["mlp_dim"] = matched_mlp_dim(tnl, multiple_of, **rest)
    return TransformerConfig(**fields)
