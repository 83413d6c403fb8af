"""TNL and Transformer: cache continuity, scan / remat equivalence, jit / pmap / mesh agreement,
annotated shardings, finite gradients, presets and config validation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightning_jax.models import (
    DEFAULT_RULES,
    TNL,
    TNLConfig,
    Transformer,
    TransformerConfig,
    batch_sharding,
    create_sharded_model,
    make_mesh,
)
from lightning_jax.models.registry import build_model_config
from lightning_jax.models.sharding import partition_specs
from lightning_jax.training.config import ModelSpec

P = jax.P

# O(1)-scale weights, so mismatches are not hidden by tiny logits; block 8 so that lengths up to
# 24 cross several blocks of the block algorithm, with ragged tails.
TNL_TEST = TNLConfig.tiny(init_std=0.2, block_size=8)
# mlp_dim 128 (the preset's is 149, TNL's parameter count): a width the 4-way tensor meshes below split.
TRANSFORMER_TEST = TransformerConfig.tiny(init_std=0.2, mlp_dim=128)


def build(config, seed=0):
    cls = TNL if isinstance(config, TNLConfig) else Transformer
    return cls(config, rngs=nnx.Rngs(seed))


# Compiled entry points: eager op-by-op dispatch would dominate the test time.
forward = nnx.jit(lambda model, tokens: model(tokens))
prefill = nnx.jit(lambda model, tokens: model.prefill(tokens, max_new_tokens=8))
decode = nnx.jit(lambda model, token, cache: model.decode(token, cache))


def random_tokens(batch, time, seed=0, vocab=256):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, time)), jnp.int32)


def assert_close(actual, expected, rtol=2e-5):
    """Relative to the largest |expected|: logits are O(1..10) here."""
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=rtol * scale, rtol=0)


def copy_params_into_layout(source, target):
    """Copies an unscanned model's parameters into a (possibly scanned) model of the same config."""
    target.embed.set_value(source.embed[...])
    for (first, count), group in zip(target.groups_layout, target.groups):
        layers = [nnx.to_pure_dict(nnx.state(source.groups[layer], nnx.Param)) for layer in range(first, first + count)]
        values = layers[0] if count == 1 else jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        state = nnx.state(group, nnx.Param)
        nnx.replace_by_pure_dict(state, values)
        nnx.update(group, state)
    if getattr(source, "final_norm", None) is not None:
        nnx.update(target.final_norm, nnx.state(source.final_norm))
    if source.lm_head is not None:
        target.lm_head.set_value(source.lm_head[...])


# ----------------------------------------------------------------------------------------------
# Prefill + decode == one full forward.


@pytest.mark.parametrize("prefill_len, scan_layers", [(1, False), (5, False), (13, False), (8, True)])
def test_tnl_prefill_then_decode_equals_forward(scan_layers, prefill_len):
    config = dataclasses.replace(TNL_TEST, scan_layers=scan_layers)
    assert config.lrpe_layers == (0,) and config.decay == "tnl"
    model = build(config)
    tokens = random_tokens(2, prefill_len + 4, seed=prefill_len)
    full = forward(model, tokens)

    logits, cache = prefill(model, tokens[:, :prefill_len])
    assert_close(logits, full[:, :prefill_len])
    for t in range(prefill_len, tokens.shape[1]):
        step, cache = decode(model, tokens[:, t], cache)
        assert step.shape == (2, config.vocab_size)
        assert_close(step, full[:, t])
    assert [int(p) for p in cache.position] == [tokens.shape[1]] * 2


def test_tnl_cache_size_is_independent_of_context():
    model = build(TNL_TEST)
    sizes = []
    for time in (3, 40):
        _, cache = prefill(model, random_tokens(2, time))
        states = model.layer_states(cache)
        assert len(states) == TNL_TEST.num_layers
        # LRPE on layer 0 doubles dim_k there.
        assert states[0].shape == (2, 4, 32, 16) and states[1].shape == (2, 4, 16, 16)
        assert all(s.dtype == jnp.float32 for s in states)
        sizes.append(sum(s.size for s in jax.tree.leaves(cache)))
    assert sizes[0] == sizes[1]


def test_tnl_decode_accepts_batch_by_one_tokens():
    model = build(TNL_TEST)
    tokens = random_tokens(2, 6)
    _, cache = prefill(model, tokens[:, :5])
    a, _ = decode(model, tokens[:, 5], cache)
    b, _ = decode(model, tokens[:, 5:6], cache)
    assert b.shape == (2, 1, 256)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b[:, 0]))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_transformer_prefill_then_decode_equals_forward(scan_layers):
    config = dataclasses.replace(TRANSFORMER_TEST, scan_layers=scan_layers)
    model = build(config)
    tokens = random_tokens(2, 12)
    full = forward(model, tokens)
    logits, cache = prefill(model, tokens[:, :7])
    assert_close(logits, full[:, :7])
    for t in range(7, 12):
        step, cache = decode(model, tokens[:, t], cache)
        assert_close(step, full[:, t])


@pytest.mark.parametrize("config", [TNL_TEST, TRANSFORMER_TEST], ids=["tnl", "transformer"])
def test_left_padding_is_exact(config):
    """A left-padded row gives, at its real positions, the logits of the row alone."""
    model = build(config)
    row = random_tokens(1, 9, seed=3)
    padded = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), row], axis=1)
    mask = jnp.arange(13)[None] >= 4
    padded_logits = nnx.jit(lambda m, t, mask: m(t, pad_mask=mask))(model, padded, mask)
    assert_close(padded_logits[:, 4:], forward(model, row))


# ----------------------------------------------------------------------------------------------
# Layer scan and remat change nothing numerically.


@pytest.mark.parametrize("config", [TNL_TEST, TRANSFORMER_TEST], ids=["tnl", "transformer"])
def test_scan_and_remat_match_plain_layers(config):
    plain = build(config)
    tokens = random_tokens(2, 11)

    def loss(model):
        logits = model(tokens)
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])

    value_and_grad = nnx.jit(nnx.value_and_grad(loss))
    expected_loss, expected_grads = value_and_grad(plain)
    for overrides in (dict(remat="full"), dict(scan_layers=True, remat="dots_no_batch")):
        variant = build(dataclasses.replace(config, **overrides), seed=1)
        copy_params_into_layout(plain, variant)
        assert_close(forward(variant, tokens), forward(plain, tokens))
        value, grads = value_and_grad(variant)
        np.testing.assert_allclose(float(value), float(expected_loss), rtol=1e-5)
        if not overrides.get("scan_layers"):
            jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-4),
                         nnx.state(grads, nnx.Param), nnx.state(expected_grads, nnx.Param))


def test_scan_groups_lrpe_layer_apart():
    config = dataclasses.replace(TNL_TEST, num_layers=4, scan_layers=True)
    model = build(config)
    assert model.groups_layout == ((0, 1), (1, 3))
    assert model.groups[1].mixer.qkvu.shape == (3, 64, 4, 4, 16)
    assert model.groups[1].mixer.lrpe is None and model.groups[0].mixer.lrpe is not None


# ----------------------------------------------------------------------------------------------
# jit, pmap, and a 2 x 4 mesh agree; parameters land where annotated.


@pytest.mark.parametrize("config", [TNL_TEST, TRANSFORMER_TEST], ids=["tnl", "transformer"])
def test_forward_under_jit_pmap_and_mesh(config):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    model = build(config)
    tokens = random_tokens(8, 13)
    expected = forward(model, tokens)
    graphdef, state = nnx.split(model)

    pmapped = jax.pmap(lambda t: nnx.merge(graphdef, state)(t))(tokens.reshape(8, 1, 13))
    assert_close(pmapped.reshape(expected.shape), expected)

    mesh = make_mesh(2, 1, 4)  # 2 x 4: data x tensor
    sharded = create_sharded_model(lambda: build(config), mesh)
    with jax.set_mesh(mesh):
        logits = forward(sharded, jax.device_put(tokens, batch_sharding(mesh)))
    assert_close(logits, expected)
    assert logits.sharding.spec[0] == "data"


def test_attention_runs_per_shard_under_a_mesh():
    mesh = make_mesh(2, 1, 4)
    model = create_sharded_model(lambda: build(TNL_TEST), mesh)
    tokens = random_tokens(8, 13)
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(model)
        jaxpr = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
    assert jaxpr.count("shard_map") >= TNL_TEST.num_layers
    # Without a mesh, no shard_map.
    jaxpr = str(jax.make_jaxpr(lambda t: build(TNL_TEST)(t))(tokens))
    assert "shard_map" not in jaxpr


@pytest.mark.parametrize("config", [dataclasses.replace(TNL_TEST, scan_layers=True, tie_embeddings=False),
                                    TRANSFORMER_TEST], ids=["tnl", "transformer"])
def test_parameters_land_with_annotated_shardings(config):
    mesh = make_mesh(1, 2, 4)
    model = create_sharded_model(lambda: build(config), mesh)
    specs = partition_specs(model)
    params = nnx.state(model, nnx.Param)
    for (path, spec), (_, variable) in zip(nnx.to_flat_state(specs), nnx.to_flat_state(params)):
        expected = jax.sharding.NamedSharding(mesh, spec.get_value() if isinstance(spec, nnx.Variable) else spec)
        value = variable[...]
        assert value.sharding.is_equivalent_to(expected, value.ndim), (path, value.sharding, expected)
    # Spot checks of the rules: embed -> fsdp, heads / mlp / vocab -> tensor, layers unsharded.
    if isinstance(config, TNLConfig):
        assert model.embed[...].sharding.spec == P("tensor", "fsdp")
        assert model.lm_head[...].sharding.spec == P("fsdp", "tensor")
        assert model.groups[1].mixer.qkvu[...].sharding.spec == P(None, "fsdp", None, "tensor")
        assert model.groups[1].glu.w3[...].sharding.spec == P(None, "tensor", "fsdp")
        assert model.groups[0].mixer.lrpe.theta[...].sharding.spec == P("tensor")
        assert model.groups[0].mixer.lrpe.theta.get_metadata()["out_sharding"] == ("heads", None)


def test_optimizer_state_follows_parameter_shardings_without_a_rules_context():
    import optax

    mesh = make_mesh(1, 2, 4)
    model = create_sharded_model(lambda: build(TNL_TEST), mesh)
    with jax.set_mesh(mesh):  # no nnx.logical_axis_rules here: the rules travel with each Param
        optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    mu = optimizer.opt_state[0].mu
    assert mu["embed"][...].sharding.spec == P("tensor", "fsdp")
    assert mu["groups"][1]["glu"]["w12"][...].sharding.spec == P("fsdp", None, "tensor")


def test_explicit_mesh_is_refused_with_a_clear_error():
    mesh = jax.make_mesh((2, 1, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    with pytest.raises(ValueError, match="mesh: got Explicit axes"):
        create_sharded_model(lambda: build(TNL_TEST), mesh)


def test_every_parameter_is_annotated():
    for model in (build(dataclasses.replace(TNL_TEST, scan_layers=True, tie_embeddings=False)), build(TRANSFORMER_TEST)):
        for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            names = variable.get_metadata().get("out_sharding")
            assert names is not None and len(names) == variable[...].ndim, path
            assert set(names) <= {None, *dict(DEFAULT_RULES)}, (path, names)


# ----------------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize("config", [TNL_TEST, TRANSFORMER_TEST], ids=["tnl", "transformer"])
def test_gradients_are_finite_and_reach_every_parameter(config):
    mesh = make_mesh(2, 1, 4)
    model = create_sharded_model(lambda: build(dataclasses.replace(config, remat="full")), mesh)
    tokens = random_tokens(8, 17)

    @nnx.jit
    def grads_of(model, tokens):
        def loss(model):
            logits = model(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        return nnx.grad(loss)(model)

    with jax.set_mesh(mesh):
        grads = grads_of(model, jax.device_put(tokens, batch_sharding(mesh)))
    for path, g in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
        g = np.asarray(g[...])
        assert np.all(np.isfinite(g)), path
        assert np.any(g != 0), path  # LRPE thetas included


def test_bfloat16_forward():
    model = build(dataclasses.replace(TNLConfig.tiny(), dtype="bfloat16"))
    logits = forward(model, random_tokens(2, 20))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))


# ----------------------------------------------------------------------------------------------
# Presets, parameter counts, FLOPs, config validation.


def abstract_param_count(config):
    model = nnx.eval_shape(lambda: build(config))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("config", [
    TNLConfig.tiny(), TNLConfig.tiny(tie_embeddings=False, lrpe_layers=(0, 2)), TNLConfig.tnl_385m(),
    TNLConfig.tnl_15b(), TransformerConfig.tiny(), TransformerConfig.transformer_385m(),
    TNLConfig.tiny(output_gate=False),
], ids=["tnl-tiny", "tnl-tiny-untied", "tnl-385m", "tnl-15b", "transformer-tiny", "transformer-385m",
        "tnl-tiny-no-gate"])
def test_num_params_counts_the_built_model(config):
    assert config.num_params() == abstract_param_count(config)


def test_without_the_output_gate_the_mixer_output_is_not_multiplied_by_u(tmp_path):
    from lightning_jax.attention import lightning_attention
    from lightning_jax.models import layers, save_hf_tnl
    from lightning_jax.models.hf_tnl import CheckpointFormatError

    gated_config = TNLConfig.tiny(init_std=0.2)
    gated = TNL(gated_config, rngs=nnx.Rngs(0))
    plain = TNL(dataclasses.replace(gated_config, output_gate=False), rngs=nnx.Rngs(0))
    assert gated_config.num_params() - plain.config.num_params() == 3 * 64 * 64  # one D x A projection per layer
    # The same weights without u: q, k, v slices of the gated model's fused projection.
    for g_block, p_block in zip(gated.groups, plain.groups):
        p_block.mixer.qkvu[...] = g_block.mixer.qkvu[...][:, :3]
        p_block.mixer.out[...] = g_block.mixer.out[...]
        p_block.glu = g_block.glu
    plain.embed[...] = gated.embed[...]
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 24)), jnp.int32)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 24, 64)), jnp.float32)
    rates = gated_config.rates(1)
    positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
    g_mixer, p_mixer = gated.groups[1].mixer, plain.groups[1].mixer
    q, k, v, u = g_mixer._project(x, positions, None)
    normed = layers.srms_norm(lightning_attention(q, k, v, rates, implementation="reference"), gated_config.norm_eps,
                              axes=(-2, -1))
    w_out = g_mixer.out[...]
    np.testing.assert_allclose(p_mixer(x, rates, positions)[0], jnp.einsum("bthk,hkd->btd", normed, w_out),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_mixer(x, rates, positions)[0], jnp.einsum("bthk,hkd->btd", u * normed, w_out),
                               rtol=1e-4, atol=1e-4)
    assert np.isfinite(plain(tokens)).all()
    with pytest.raises(CheckpointFormatError, match=r"output_gate: got False, expected True"):
        save_hf_tnl(plain, str(tmp_path / "hf"))


@pytest.mark.parametrize("tnl, transformer", [
    (TNLConfig.tiny, TransformerConfig.tiny),
    (TNLConfig.tnl_385m, TransformerConfig.transformer_385m),
    (TNLConfig.tnl_15b, TransformerConfig.transformer_15b),
], ids=["tiny", "385m", "15b"])
@pytest.mark.parametrize("overrides", [{}, {"vocab_size": 257}, {"num_layers": 2, "hidden_dim": 128, "num_heads": 2},
                                       {"tie_embeddings": False}], ids=["preset", "vocab", "sizes", "untied"])
def test_same_size_transformer_presets_match_tnl_parameter_count(tnl, transformer, overrides):
    # "The same sizes" means the same parameter count: the Transformer's MLP pays for TNL's gate u
    # and LRPE angles. Counted on the built (abstract) models, within 1 %.
    t, b = tnl(**overrides), transformer(**overrides)
    assert (b.num_layers, b.hidden_dim, b.num_heads, b.head_dim, b.vocab_size) == (
        t.num_layers, t.hidden_dim, t.num_heads, t.head_dim, t.vocab_size)
    assert b.mlp_dim > t.glu_dim
    if tnl is TNLConfig.tiny:  # CPU-sized: build them
        assert abs(abstract_param_count(b) / abstract_param_count(t) - 1) < 0.01
    assert abs(b.num_params() / t.num_params() - 1) < 0.01
    # One unit of width fewer or more is further from TNL's count (the nearest multiple of 64
    # for the GPU presets, of 1 for tiny).
    step = 1 if tnl is TNLConfig.tiny else 64
    for other in (b.mlp_dim - step, b.mlp_dim + step):
        assert abs(dataclasses.replace(b, mlp_dim=other).num_params() - t.num_params()) >= abs(
            b.num_params() - t.num_params())


def test_explicit_transformer_mlp_dim_wins_over_the_matched_default():
    assert TransformerConfig.tiny(mlp_dim=128).mlp_dim == 128
    assert TransformerConfig.transformer_385m(mlp_dim=2816).mlp_dim == 2816
    assert TransformerConfig.tiny(mlp_dim=None) == TransformerConfig.tiny()  # None: the matched width
    spec = ModelSpec("transformer", "tiny", {"mlp_dim": 100, "hidden_dim": 32})
    assert (build_model_config(spec).mlp_dim, build_model_config(spec).hidden_dim) == (100, 32)
    with pytest.raises(ValueError, match="mlp_dim"):
        TransformerConfig.tiny(mlp_dim=0)


def test_tnl_385m_preset():
    config = TNLConfig.tnl_385m()
    assert (config.num_layers, config.hidden_dim, config.num_heads, config.head_dim) == (24, 1024, 8, 128)
    assert (config.vocab_size, config.glu_dim, config.lrpe_layers, config.tie_embeddings) == (64000, 2816, (0,), True)
    assert 0.38e9 < config.num_params() < 0.41e9
    model = nnx.eval_shape(lambda: TNL(config, rngs=nnx.Rngs(0)))
    assert model.groups[0].mixer.qkvu.shape == (1024, 4, 8, 128)
    assert model.groups[0].mixer.lrpe.theta.shape == (8, 128)
    assert model.groups[1].glu.w12.shape == (1024, 2, 2816)
    assert TNLConfig.tnl_15b().num_params() > 14e9


def test_flops_per_token():
    tnl, transformer = TNLConfig.tnl_385m(), TransformerConfig.transformer_385m()
    matmul = 24 * (5 * 1024 * 1024 + 3 * 1024 * 2816) + 64000 * 1024
    # Lightning attention's cost stops growing once the sequence exceeds the block.
    assert tnl.flops_per_token(2048) == tnl.flops_per_token(65536) > 6 * matmul
    assert tnl.flops_per_token(2048) < 1.05 * 6 * matmul
    # Softmax attention grows linearly per token with T. The baseline's MLP is wider than TNL's
    # SGLU (mlp_dim 3136, not 2816): its preset matches TNL-385M's parameter count.
    t_matmul = 24 * (4 * 1024 * 1024 + 3 * 1024 * transformer.mlp_dim) + 64000 * 1024
    assert transformer.flops_per_token(2048) == 6 * t_matmul + 6 * 24 * 1024 * 2048
    assert transformer.flops_per_token(65536) > 3 * tnl.flops_per_token(65536)


@pytest.mark.parametrize("cls", [TNLConfig, TransformerConfig])
@pytest.mark.parametrize("field, value", [
    ("num_heads", 5),  # does not divide hidden_dim 64
    ("hidden_dim", -64),
    ("vocab_size", 0),
    ("num_layers", -1),
    ("dtype", "int8"),
    ("param_dtype", "float64"),
    ("remat", "sometimes"),
    ("scan_layers", "yes"),
    ("attention_implementation", "cuda"),
])
def test_bad_config_values_name_the_field(cls, field, value):
    with pytest.raises(ValueError, match=field) as info:
        dataclasses.replace(cls.tiny(), **{field: value})
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("field, value", [
    ("decay", "linear"), ("lrpe_layers", (7,)), ("lrpe_layers", [0]), ("glu_dim", 0), ("block_size", 48),
])
def test_bad_tnl_config_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TNLConfig.tiny(), **{field: value})


def test_config_overrides_and_schedules():
    config = dataclasses.replace(TNLConfig.tiny(), decay="minimax", num_layers=4)
    assert config.num_layers == 4 and config.decay == "minimax"
    assert config.rates(0).shape == (4,)
    assert TNLConfig.tiny(num_heads=8).head_dim == 8
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_layers = 3  # type: ignore[misc]
    with pytest.raises(TypeError, match="config"):
        TNL(TransformerConfig.tiny(), rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------
# Checkpoint layout: state paths (and shapes) are pinned, so a refactor cannot silently move
# parameters that checkpoints, sharding rules and optimizer masks address by path.


def _tnl_layer(group, lrpe=False, stacked=()):
    leaves = {
        "glu/w12": (64, 2, 128), "glu/w3": (128, 64), "mixer/out": (4, 16, 64), "mixer/qkvu": (64, 4, 4, 16),
    }
    if lrpe:
        leaves["mixer/lrpe/theta"] = (4, 16)
    return {("groups", group, *name.split("/")): (*stacked, *shape) for name, shape in leaves.items()}


def _transformer_layer(group):
    # mlp 149, not TNL's 128: the tiny preset matches TNLConfig.tiny()'s parameter count.
    leaves = {
        "attention/out": (4, 16, 64), "attention/qkv": (64, 3, 4, 16), "attention_norm/weight": (64,),
        "mlp/w12": (64, 2, 149), "mlp/w3": (149, 64), "mlp_norm/weight": (64,),
    }
    return {("groups", group, *name.split("/")): shape for name, shape in leaves.items()}


PINNED_STATE = {
    "tnl-tiny": (TNLConfig.tiny(), {
        ("embed",): (256, 64), **_tnl_layer(0, lrpe=True), **_tnl_layer(1), **_tnl_layer(2),
    }),
    "tnl-tiny-scan": (TNLConfig.tiny(scan_layers=True), {
        ("embed",): (256, 64), **_tnl_layer(0, lrpe=True), **_tnl_layer(1, stacked=(2,)),
    }),
    "tnl-tiny-untied": (TNLConfig.tiny(tie_embeddings=False), {
        ("embed",): (256, 64), ("lm_head",): (64, 256),
        **_tnl_layer(0, lrpe=True), **_tnl_layer(1), **_tnl_layer(2),
    }),
    "transformer-tiny": (TransformerConfig.tiny(), {
        ("embed",): (256, 64), ("final_norm", "weight"): (64,),
        **_transformer_layer(0), **_transformer_layer(1), **_transformer_layer(2),
    }),
}


@pytest.mark.parametrize("name", sorted(PINNED_STATE))
def test_state_paths_are_pinned(name):
    config, expected = PINNED_STATE[name]
    model = nnx.eval_shape(lambda: build(config))
    # Every variable is a Param (no other state to checkpoint); group indices are int keys.
    actual = {tuple(path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(model))}
    assert actual == expected
    assert len(nnx.to_flat_state(nnx.state(model, nnx.Param))) == len(expected)


# ----------------------------------------------------------------------------------------------
# Named scopes reach the compiled program, through jit, scan and remat.


@pytest.mark.parametrize("config, prefix", [
    (dataclasses.replace(TNL_TEST, num_layers=4, scan_layers=True, remat="full"), "tnl"),
    (dataclasses.replace(TRANSFORMER_TEST, remat="dots"), "transformer"),
], ids=["tnl-scan-remat", "transformer-remat"])
def test_named_scopes_reach_the_lowered_program(config, prefix):
    import re

    graphdef, state = nnx.split(build(config))
    lowered = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, random_tokens(2, 8))
    names = "\n".join(re.findall(r'loc\("([^"]*)"', lowered.as_text(debug_info=True)))
    assert f"{prefix}/embed/" in names and f"{prefix}/lm_head/" in names
    # Remat and scan add their own levels (checkpoint/, while/body/) between the layer and its parts.
    groups = ("layer_0", "layers_1_3") if config.scan_layers else ("layer_0", "layer_2")
    for group in groups:
        for scope in ("token_mixer/attention", "channel_mixer"):
            assert re.search(f"{prefix}/layers/{group}/(.*/)?{scope}/", names), (group, scope)


# ----------------------------------------------------------------------------------------------
# Argument checks.


@pytest.mark.parametrize("config", [TNL_TEST, TRANSFORMER_TEST], ids=["tnl", "transformer"])
@pytest.mark.parametrize("shape", [(2, 0), (0, 3)])
def test_empty_tokens_are_refused_naming_tokens(config, shape):
    model = build(config)
    with pytest.raises(ValueError, match=r"^tokens: got shape") as info:
        model(jnp.zeros(shape, jnp.int32))
    assert info.value.field == "tokens"
    with pytest.raises(ValueError, match=r"^tokens: "):
        model.prefill(jnp.zeros(shape, jnp.int32), max_new_tokens=2)


def test_attention_implementations_follow_the_registry():
    from lightning_jax.attention.registry import IMPLEMENTATIONS
    from lightning_jax.models.config import ATTENTION_IMPLEMENTATIONS

    assert ATTENTION_IMPLEMENTATIONS == (None, *IMPLEMENTATIONS)
    for name in ATTENTION_IMPLEMENTATIONS:
        assert TNLConfig.tiny(attention_implementation=name).attention_implementation == name


def test_layer_stack_carries_per_layer_values_through_groups():
    from lightning_jax.models.stack import LayerStack

    stack = LayerStack(4, lambda layer, rngs: nnx.Linear(2, 2, rngs=rngs), kind=lambda layer: layer == 0,
                       scan=True, rngs=nnx.Rngs(0))
    assert stack.layout == ((0, 1), (1, 3)) and len(stack) == 2 and stack[1].kernel.shape == (3, 2, 2)
    per_group = stack.per_layer(lambda layer: np.full((2,), layer, np.float32))
    assert per_group[0].shape == (2,) and per_group[1].shape == (3, 2)
    # Each layer adds its input and returns it: the outputs come back per group, in layer order.
    x, outputs = nnx.jit(lambda s, x, xs: s(lambda m, x, v: (x + v, v), x, xs))(stack, jnp.zeros((2,)), per_group)
    assert float(x[0]) == 0 + 1 + 2 + 3
    assert [float(v[0]) for v in stack.unstack(outputs)] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="inputs: got 1 per-group values"):
        stack(lambda m, x, v: (x, None), jnp.zeros((2,)), per_group[:1])


# ----------------------------------------------------------------------------------------------
# relayout: the same model with scanned layer groups or one group per layer.


def _flat(model):
    return [(tuple(path), var) for path, var in nnx.to_flat_state(nnx.state(model))]


@pytest.mark.parametrize("config", [
    dataclasses.replace(TNL_TEST, num_layers=4, scan_layers=True),  # groups (0, 1), (1, 3)
    dataclasses.replace(TNL_TEST, num_layers=5, lrpe_layers=(0, 3), scan_layers=True, tie_embeddings=False),
    dataclasses.replace(TRANSFORMER_TEST, scan_layers=True),  # one group of 3
], ids=["tnl", "tnl-lrpe-0-3-untied", "transformer"])
def test_relayout_unstacks_and_restacks_the_same_model(config):
    from lightning_jax.models import relayout
    from lightning_jax.models.stack import is_stacked

    scanned = build(config)
    before = [(path, np.asarray(var[...])) for path, var in _flat(scanned)]
    plain = relayout(scanned, scan=False)
    assert plain.config == dataclasses.replace(config, scan_layers=False) and not is_stacked(plain)
    assert plain.groups_layout == tuple((layer, 1) for layer in range(config.num_layers))
    # Paths, shapes and Variable metadata (no "layers" axis) are those of a model built unscanned.
    built = nnx.eval_shape(lambda: build(dataclasses.replace(config, scan_layers=False)))
    for (path, var), (built_path, built_var) in zip(_flat(plain), _flat(built), strict=True):
        assert path == built_path and var.shape == built_var.shape and type(var) is type(built_var)
        assert var.get_metadata() == built_var.get_metadata()
    # Layer l of the unscanned model is slice l - first of its scanned group.
    for first, count in scanned.groups_layout:
        for layer in range(first, first + count):
            got = nnx.to_pure_dict(nnx.state(plain.groups[layer]))
            want = nnx.to_pure_dict(nnx.state(scanned.groups[scanned.groups_layout.index((first, count))]))
            if count > 1:
                want = jax.tree.map(lambda x, i=layer - first: x[i], want)
            jax.tree.map(np.testing.assert_array_equal, got, want)

    tokens = random_tokens(2, 13)
    expected = forward(scanned, tokens)
    assert_close(forward(plain, tokens), expected, rtol=1e-5)
    # Back to the scanned layout: bit for bit the original state; the original is untouched.
    again = relayout(plain, scan=True)
    assert again.groups_layout == scanned.groups_layout and relayout(scanned, scan=True) is scanned
    for (path, var), (before_path, value) in zip(_flat(again), before, strict=True):
        assert path == before_path
        np.testing.assert_array_equal(np.asarray(var[...]), value)
    for (path, var), (_, value) in zip(_flat(scanned), before, strict=True):
        np.testing.assert_array_equal(np.asarray(var[...]), value)
    assert [v.get_metadata() for _, v in _flat(again)] == [v.get_metadata() for _, v in _flat(scanned)]


def test_relayout_keeps_shardings():
    from lightning_jax.models import relayout

    config = dataclasses.replace(TNL_TEST, num_layers=4, scan_layers=True)
    mesh = make_mesh(2, 2, 2)  # data x fsdp x tensor
    scanned = create_sharded_model(lambda: build(config), mesh)
    plain = relayout(scanned, scan=False)
    built = create_sharded_model(lambda: build(dataclasses.replace(config, scan_layers=False)), mesh)
    for (path, var), (_, built_var) in zip(_flat(plain), _flat(built), strict=True):
        assert var[...].sharding == built_var[...].sharding, path
    again = relayout(plain, scan=True)
    for (path, var), (_, scanned_var) in zip(_flat(again), _flat(scanned), strict=True):
        assert var[...].sharding == scanned_var[...].sharding, path
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(scanned_var[...]))


# ----------------------------------------------------------------------------------------------
# Projection weights with their input axes last (layers.inputs_last, the decoding layout).

INPUTS_LAST = {
    # name -> (leading axes contracted with the input, permutation of a weight with them last)
    "qkvu": (1, (1, 2, 3, 0)), "qkv": (1, (1, 2, 3, 0)), "out": (2, (2, 0, 1)), "w12": (1, (1, 2, 0)),
    "w3": (1, (1, 0)), "lm_head": (1, (1, 0)),
}


@pytest.mark.parametrize("config", [
    dataclasses.replace(TNL_TEST, lrpe_layers=(0,), tie_embeddings=False),
    dataclasses.replace(TNL_TEST, output_gate=False, attention_activation="relu"),
    TRANSFORMER_TEST,
    dataclasses.replace(TRANSFORMER_TEST, tie_embeddings=False),
], ids=["tnl-lrpe-untied", "tnl-no-gate", "transformer", "transformer-untied"])
def test_inputs_last_transposes_projections_and_computes_the_same_function(config):
    from lightning_jax.models.layers import inputs_last

    model = build(config)
    before = {path: np.asarray(var[...]) for path, var in _flat(model)}
    moved = inputs_last(model)
    names = set()
    for (path, var), (_, original) in zip(_flat(moved), _flat(model), strict=True):
        name = path[-1]
        if name in INPUTS_LAST:
            names.add(name)
            inputs, perm = INPUTS_LAST[name]
            assert var.get_metadata()["input_axes"] == original.get_metadata()["input_axes"]
            assert len(original.get_metadata()["input_axes"]) == inputs and var.get_metadata()["inputs_last"]
            np.testing.assert_array_equal(np.asarray(var[...]), np.transpose(before[path], perm))
            assert var.get_metadata()["out_sharding"] == tuple(original.get_metadata()["out_sharding"][a] for a in perm)
        else:  # norms, LRPE thetas, the embedding: the same arrays, not copies
            assert "inputs_last" not in var.get_metadata() and var[...] is original[...]
    assert names >= {"out", "w12", "w3"} and ("lm_head" in names) == (not config.tie_embeddings)
    for path, var in _flat(model):  # the original is untouched
        np.testing.assert_array_equal(np.asarray(var[...]), before[path])
    assert inputs_last(moved) is moved

    tokens = random_tokens(2, 13)
    assert_close(forward(moved, tokens), forward(model, tokens), rtol=1e-5)
    logits, cache = prefill(model, tokens)
    moved_logits, moved_cache = prefill(moved, tokens)
    assert_close(moved_logits, logits, rtol=1e-5)
    token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    assert_close(decode(moved, token, moved_cache)[0], decode(model, token, cache)[0], rtol=1e-5)


def test_inputs_last_keeps_shardings_with_permuted_axes():
    from lightning_jax.models.layers import inputs_last

    config = dataclasses.replace(TNL_TEST, tie_embeddings=False)
    mesh = make_mesh(2, 2, 2)  # data x fsdp x tensor
    model = create_sharded_model(lambda: build(config), mesh)
    moved = inputs_last(model)
    checked = 0
    for (path, var), (_, original) in zip(_flat(moved), _flat(model), strict=True):
        sharding = original[...].sharding
        if path[-1] in INPUTS_LAST:
            spec = tuple(sharding.spec) + (None,) * (var.ndim - len(sharding.spec))
            want = P(*(spec[a] for a in INPUTS_LAST[path[-1]][1]))
            assert var[...].sharding == jax.NamedSharding(mesh, want), path
            checked += any(axis is not None for axis in want)
        else:
            assert var[...].sharding == sharding, path
    assert checked >= 4  # sharded weights were moved, not only replicated ones
    tokens = random_tokens(4, 13)
    with jax.set_mesh(mesh):
        assert_close(forward(moved, tokens), forward(model, tokens), rtol=1e-5)


def test_relayout_refuses_a_model_laid_out_for_decoding():
    from lightning_jax.models import relayout
    from lightning_jax.models.layers import inputs_last

    moved = inputs_last(build(TNL_TEST))
    with pytest.raises(ValueError, match="model: got a model laid out for decoding"):
        relayout(moved, scan=True)
