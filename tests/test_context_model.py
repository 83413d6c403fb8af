"""TNL trained with each sequence split over the mesh's `context` axis (context parallelism): the loss
and gradients of a train step equal one device's, LRPE positions stay global, the blocked loss never
gathers the hidden states, memory per device falls with the context size, and the config errors.
Runs on the eight fake CPU devices of tests/conftest.py."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightning_jax.models import TNL, TNLConfig, create_sharded_model, make_mesh
from lightning_jax.training import step as step_lib
from lightning_jax.training.config import ConfigError, TrainConfig
from oracles import assert_trees_close

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs the eight fake CPU devices of conftest.py")

# O(1)-scale weights so mistakes show; LRPE on layer 0 (the default lrpe_layers).
CONFIG = TNLConfig.tiny(init_std=0.2, block_size=8, num_layers=2)
assert CONFIG.lrpe_layers == (0,)


def mesh_of(data=1, fsdp=1, tensor=1, context=1):
    n = data * fsdp * tensor * context
    return make_mesh(data, fsdp, tensor, context, devices=jax.devices()[:n])


def tokens_of(rows, time, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (rows, time + 1)), jnp.int32)


def loss_and_grads(mesh, config, tokens, block_tokens, compiled_text=False):
    """(loss, grads) of the mean next-token loss (the train step's), jitted on `mesh`; with the
    compiled HLO text if asked."""
    model = create_sharded_model(lambda: TNL(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights = jnp.ones((tokens.shape[0], tokens.shape[1] - 1), jnp.float32)

    def mean_loss(params, tokens, weights):
        total, count = step_lib.loss_sums(graphdef, params, rest, tokens, weights, loss_block_tokens=block_tokens)
        return total / count

    with jax.set_mesh(mesh):
        batch = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))  # as global_batch: time whole
        tokens, weights = jax.device_put((tokens, weights), batch)
        fn = jax.jit(jax.value_and_grad(mean_loss))
        out = jax.device_get(fn(params, tokens, weights))
        text = fn.lower(params, tokens, weights).compile().as_text() if compiled_text else None
    return out, text


MESHES = [dict(context=2), dict(data=2, context=2), dict(context=4), dict(context=8)]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
@pytest.mark.parametrize("block_tokens", [16, 0], ids=["blocked_loss", "full_logits"])
def test_train_step_loss_and_grads_equal_one_device(mesh_shape, block_tokens):
    tokens = tokens_of(4, 64)  # 64 time steps: 8 per device on 8 context devices
    expected, _ = loss_and_grads(mesh_of(), CONFIG, tokens, block_tokens)
    actual, _ = loss_and_grads(mesh_of(**mesh_shape), CONFIG, tokens, block_tokens)
    assert float(actual[0]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert_trees_close(actual[1], expected[1], rtol=2e-5)  # fp32 round-off (~5e-6 measured)


def test_scanned_remat_layers_with_lrpe_everywhere_equal_one_device():
    # LRPE positions are computed from the global [batch, time] positions before the shard_map, so
    # every slice rotates by its global offset (per-device positions would break this equality).
    config = dataclasses.replace(CONFIG, num_layers=3, lrpe_layers=(0, 1, 2), scan_layers=True, remat="full")
    tokens = tokens_of(2, 48, seed=1)
    expected, _ = loss_and_grads(mesh_of(), config, tokens, 16)
    actual, _ = loss_and_grads(mesh_of(data=2, context=4), config, tokens, 16)
    assert float(actual[0]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert_trees_close(actual[1], expected[1], rtol=2e-5)


def test_lrpe_hidden_states_use_global_positions():
    config = dataclasses.replace(CONFIG, lrpe_layers=(0, 1))
    tokens = tokens_of(2, 32, seed=2)[:, :-1]
    outs = {}
    for context in (1, 4):
        mesh = mesh_of(context=context)
        model = create_sharded_model(lambda: TNL(config, rngs=nnx.Rngs(0)), mesh)
        with jax.set_mesh(mesh):
            outs[context] = np.asarray(jax.jit(lambda m, t: m.hidden_states(t))(model, tokens))
    # LRPE scores depend on t - s only: per-device (local) positions would rotate a slice's queries
    # against the state of earlier slices by the wrong offset, and these would differ.
    np.testing.assert_allclose(outs[4], outs[1], rtol=0, atol=1e-5 * np.max(np.abs(outs[1])))


def test_loss_never_gathers_the_hidden_states():
    # The only all-gathers in the compiled step are the op's: one fp32 state per layer (and the
    # transposes of nothing else). A gather of [batch, time, D] activations would show here.
    _, text = loss_and_grads(mesh_of(data=2, context=2), CONFIG, tokens_of(4, 64), 16, compiled_text=True)
    gathers = [line for line in text.splitlines() if re.search(r"= \S+ all-gather(-start)?\(", line)]
    assert gathers
    for line in gathers:
        assert "token_mixer/attention/shard_map" in line, line


def test_compiled_temp_memory_per_device_falls_with_context():
    config = dataclasses.replace(CONFIG, num_layers=2, hidden_dim=128, glu_dim=256)
    tokens = tokens_of(1, 4096, seed=3)
    temp = {}
    for context in (1, 2, 4):
        mesh = mesh_of(context=context)
        model = create_sharded_model(lambda: TNL(config, rngs=nnx.Rngs(0)), mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def mean_loss(params, tokens):
            weights = jnp.ones((1, tokens.shape[1] - 1), jnp.float32)
            total, count = step_lib.loss_sums(graphdef, params, rest, tokens, weights, loss_block_tokens=512)
            return total / count

        with jax.set_mesh(mesh):
            tokens_in = jax.device_put(tokens, jax.NamedSharding(mesh, jax.P()))
            compiled = jax.jit(jax.value_and_grad(mean_loss)).lower(params, tokens_in).compile()
        temp[context] = compiled.memory_analysis().temp_size_in_bytes
    assert temp[2] < 0.75 * temp[1] and temp[4] < 0.75 * temp[2], temp


# ----------------------------------------------------------------------------------------------
# The run: config checks, and a train step through setup_run / global_batch.


def config_dict(tmp_path, arch="tnl", seq_len=32, **mesh):
    return {"steps": 2, "workdir": str(tmp_path), "model": {"arch": arch, "preset": "tiny", "vocab_size": 257},
            "data": {"seq_len": seq_len, "batch_size": 8}, "mesh": mesh}


def test_transformer_with_context_is_a_named_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^config\.mesh\.context: got 2, expected 1 for model\.arch='transformer'"):
        TrainConfig.from_dict(config_dict(tmp_path, "transformer", context=2))
    TrainConfig.from_dict(config_dict(tmp_path, "transformer", context=1))


def test_seq_len_not_a_multiple_of_context_is_a_named_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^config\.data\.seq_len: got 30, expected a multiple of mesh\.context=4"):
        TrainConfig.from_dict(config_dict(tmp_path, seq_len=30, context=4))
    with pytest.raises(ConfigError, match=r"^config\.mesh\.context: got 0"):
        TrainConfig.from_dict(config_dict(tmp_path, context=0))


def test_run_trains_on_a_context_mesh_like_on_a_data_mesh(tmp_path):
    from lightning_jax.training.run import global_batch, setup_run

    tokens = np.random.default_rng(4).integers(0, 257, (8, 33)).astype(np.int32)
    metrics = {}
    for mesh in ({"data": 8}, {"data": 2, "context": 4}):
        run = setup_run(TrainConfig.from_dict(config_dict(tmp_path, **mesh)))
        assert run.mesh.shape == {"data": 8, "fsdp": 1, "tensor": 1, "context": 1, **mesh}
        step = step_lib.make_train_step(run.graphdef, run.tx, run.schedule,
                                        loss_block_tokens=run.config.optim.loss_block_tokens)
        with jax.set_mesh(run.mesh):
            _, metrics[len(mesh)] = step_lib.jit_train_step(step, run.state)(run.state, global_batch(run, tokens, 8))
    assert float(metrics[2]["loss"]) == pytest.approx(float(metrics[1]["loss"]), rel=1e-6)
    assert float(metrics[2]["grad_norm"]) == pytest.approx(float(metrics[1]["grad_norm"]), rel=1e-5)
