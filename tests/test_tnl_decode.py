"""TNL's fused decoding kernels (lightning_jax.models.tnl_decode) against the XLA decoding step and
against plain formulas, in Pallas interpret mode; lowered for CUDA as a GPU would run them."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lightning_jax
from lightning_jax import generation
from lightning_jax.attention import decode_step
from lightning_jax.models import TNL, TNLConfig, tnl_decode

F32 = jnp.float32


def small_config(**overrides):
    """2 layers, D 64, 2 heads of 32, glu 96 (not a power of two: the product's input is sliced)."""
    fields = dict(num_layers=2, hidden_dim=64, num_heads=2, glu_dim=96, dtype="bfloat16", param_dtype="bfloat16",
                  init_std=0.1)
    return TNLConfig.tiny(**{**fields, **overrides})


def with_decode(model, choice):
    """A copy of `model` whose layers decode with `choice` (TNLConfig.decode_implementation)."""
    model = nnx.clone(model)
    for _, node in nnx.iter_graph(model):
        if isinstance(getattr(node, "config", None), TNLConfig):
            object.__setattr__(node, "config", dataclasses.replace(node.config, decode_implementation=choice))
    return model


def decode_steps(model, prompt, tokens):
    """Prefill `prompt`, then decode `tokens` [steps, batch] one at a time -> (logits [steps, batch,
    vocab] f32, the final layer states)."""
    _, cache = model.prefill(prompt)
    step = nnx.jit(lambda m, t, c: m.decode(t, c))
    logits = []
    for token in tokens:
        out, cache = step(model, token, cache)
        logits.append(out.astype(F32))
    return jnp.stack(logits), model.layer_states(cache)


@pytest.mark.parametrize("overrides", [
    {},  # as published: silu on q and k, LRPE on layer 0, the output gate
    {"attention_activation": "relu", "output_gate": False},
    {"attention_activation": "none", "lrpe_layers": (0, 1)},
    {"dtype": "float32", "param_dtype": "float32"},
    {"dtype": "bfloat16", "param_dtype": "float32"},  # weights rounded to bf16 as they are read
], ids=["published", "relu-no-gate", "identity-lrpe-everywhere", "fp32", "fp32-params"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fused_step_computes_what_the_xla_step_computes(overrides, batch):
    model = generation.decoding_model(TNL(small_config(**overrides), rngs=nnx.Rngs(batch)))
    rng = np.random.default_rng(batch)
    prompt = jnp.asarray(rng.integers(0, 256, (batch, 5)), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, 256, (3, batch)), jnp.int32)
    want, want_states = decode_steps(with_decode(model, "xla"), prompt, tokens)
    got, got_states = decode_steps(with_decode(model, "pallas"), prompt, tokens)
    # Both round at the same places; silu's bf16 rounding and the order of summation differ.
    tol = 1e-5 if overrides.get("dtype") == "float32" else 1e-2
    scale = float(jnp.max(jnp.abs(want)))
    assert scale > 0.1
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=0)
    for g, w in zip(got_states, want_states):
        np.testing.assert_allclose(g, w, atol=tol * float(jnp.max(jnp.abs(w))), rtol=0)


def test_generate_gives_the_same_tokens_with_either_step():
    model = TNL(small_config(dtype="float32", param_dtype="float32", init_std=0.3), rngs=nnx.Rngs(3))
    prompt = jnp.asarray([[7, 8, 9, 10], [0, 0, 3, 4]], jnp.int32)  # the second row left-padded
    runs = [np.asarray(lightning_jax.generate(with_decode(model, choice), prompt, 6, temperature=0.0,
                                              rng=jax.random.key(0), pad_id=0))
            for choice in ("xla", "pallas")]
    np.testing.assert_array_equal(runs[1], runs[0])


def _rounded(x, dtype):
    return np.asarray(jnp.asarray(x, F32).astype(dtype).astype(F32))


@pytest.mark.parametrize("batch, k_dim, n_dim", [(1, 64, 24), (2, 96, 32), (2, 40, 8)])
def test_projection_kernel_against_the_formula(batch, k_dim, n_dim):
    rng = np.random.default_rng(k_dim)
    x = rng.normal(size=(batch, k_dim)).astype(np.float32)
    w = rng.normal(size=(2 * n_dim, k_dim)).astype(np.float32)
    gate = rng.normal(size=(batch, 4, k_dim)).astype(np.float32)
    residual = rng.normal(size=(batch, n_dim)).astype(np.float32)
    eps = 1e-6
    run = dict(eps=eps, dtype=jnp.dtype(F32), tiles=tnl_decode.DecodeTiles(block_n=8, block_k=16), interpret=True,
               name="test")
    normed = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps)

    got = tnl_decode._project(jnp.asarray(x), jnp.asarray(w[:n_dim]), norm=True, **run)
    np.testing.assert_allclose(got, normed @ w[:n_dim].T, rtol=1e-5, atol=1e-5)

    got = tnl_decode._project(jnp.asarray(x), jnp.asarray(w[:n_dim]), norm=True, gate=jnp.asarray(gate),
                              residual=jnp.asarray(residual), **run)
    np.testing.assert_allclose(got, residual + (gate[:, 3] * normed) @ w[:n_dim].T, rtol=1e-5, atol=1e-5)

    got = tnl_decode._project(jnp.asarray(x), jnp.asarray(w), pair=True, activation=jax.nn.silu, **run)
    h1, h2 = x @ w[:n_dim].T, x @ w[n_dim:].T
    np.testing.assert_allclose(got, h1 / (1 + np.exp(-h1)) * h2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lrpe", [False, True])
@pytest.mark.parametrize("activation", ["silu", "none"])
def test_recurrence_kernel_against_decode_step(lrpe, activation):
    batch, heads, head_dim = 2, 3, 16
    rng = np.random.default_rng(int(lrpe))
    p = jnp.asarray(rng.normal(size=(batch, 4, heads, head_dim)), F32)
    rates = jnp.asarray([0.0, 0.1, 3.0], F32)  # no decay, some, nearly all
    positions = jnp.asarray([0, 1234], jnp.int32)
    dim_k = head_dim * (2 if lrpe else 1)
    state = jnp.asarray(rng.normal(size=(batch, heads, dim_k, head_dim)), F32)
    theta = jnp.asarray(rng.uniform(0, 1, (heads, head_dim)), F32) if lrpe else None
    act = {"silu": jax.nn.silu, "none": None}[activation]
    o, new = tnl_decode._recurrence(p, rates, positions, state, theta, activation=act, dtype=jnp.dtype(F32),
                                    tiles=tnl_decode.DecodeTiles(value_tile=8), interpret=True)

    q, k, v = p[:, 0], p[:, 1], p[:, 2]
    if act is not None:
        q, k = act(q), act(k)
    if lrpe:
        angle = positions[:, None, None].astype(F32) * theta
        q = jnp.concatenate([q * jnp.cos(angle), q * jnp.sin(angle)], -1)
        k = jnp.concatenate([k * jnp.cos(angle), k * jnp.sin(angle)], -1)
    want_o, want_state = decode_step(q, k, v, rates, state)
    np.testing.assert_allclose(new, want_state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(o, want_o, rtol=1e-4, atol=1e-4)


def test_the_default_decodes_with_xla_off_a_gpu():
    model = generation.decoding_model(TNL(small_config(), rngs=nnx.Rngs(0)))
    cache = model.empty_cache(1)
    jaxpr = str(jax.make_jaxpr(lambda t: nnx.merge(*nnx.split(model)).decode(t, cache))(jnp.zeros((1,), jnp.int32)))
    assert "pallas_call" not in jaxpr
    jaxpr = str(jax.make_jaxpr(lambda t: nnx.merge(*nnx.split(with_decode(model, "pallas"))).decode(t, cache))(
        jnp.zeros((1,), jnp.int32)))
    assert "tnl_decode_mixer_in" in jaxpr


def test_pallas_refuses_what_it_cannot_run_and_says_why():
    model = TNL(small_config(decode_implementation="pallas"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decode_implementation.*training layout.*decoding_model"):
        model.decode(jnp.zeros((1,), jnp.int32), model.empty_cache(1))
    laid_out = generation.decoding_model(model)
    batch = tnl_decode.MAX_BATCH + 1
    with pytest.raises(ValueError, match=f"decode_implementation.*batch {batch}"):
        laid_out.decode(jnp.zeros((batch,), jnp.int32), laid_out.empty_cache(batch))
    with pytest.raises(ValueError, match="decode_implementation.*'gpu'"):
        small_config(decode_implementation="gpu")


def test_the_kernels_lower_for_cuda(monkeypatch):
    """TNL-385M's layer shapes (two layers), as the GPU compiles them: four Pallas kernels per layer."""
    from tests.test_pallas import _H100

    config = TNLConfig.tnl_385m(num_layers=2, vocab_size=256, param_dtype="bfloat16", decode_implementation="pallas")
    model = generation.decoding_model(TNL(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    cache = model.empty_cache(1)
    monkeypatch.setattr(tnl_decode, "interpreted", lambda: False)
    mesh = jax.sharding.AbstractMesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), abstract_device=_H100)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c)).trace(
            state, jnp.zeros((1,), jnp.int32), cache).lower(lowering_platforms=("cuda",)).as_text()
    names = re.findall(r"tnl_decode_\w+", text)
    kernels = {"tnl_decode_mixer_in", "tnl_decode_recurrence", "tnl_decode_mixer_out", "tnl_decode_glu_in"}
    assert set(names) == kernels
    assert text.count("__gpu$xla.gpu.triton") == 2 * len(kernels)
