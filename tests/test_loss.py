"""The blocked cross-entropy (lightning_jax/training/loss.py) against the full-logits loss: values and
gradients for both models, tied and untied heads, fp32 and bf16 compute, padding weights, ragged
and oversized blocks, a sharded vocab, pmap and jit evaluation; the knob; the compiled memory."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightning_jax.models import (
    TNL,
    TNLConfig,
    Transformer,
    TransformerConfig,
    create_sharded_model,
    layers,
    make_mesh,
)
from lightning_jax.training import loss as loss_lib
from lightning_jax.training import optim, step as step_lib
from lightning_jax.training.config import ConfigError, OptimConfig, TrainConfig

# O(1)-scale weights, so the logits spread over several nats and mistakes show.
CONFIGS = {
    "tnl": TNLConfig.tiny(init_std=0.2, block_size=8, num_layers=2),
    # mlp_dim 128 (the preset's is 149): a width the 4-way tensor mesh below splits.
    "transformer": TransformerConfig.tiny(init_std=0.2, num_layers=2, mlp_dim=128),
}


def build(name, **overrides):
    config = dataclasses.replace(CONFIGS[name], **overrides)
    cls = TNL if isinstance(config, TNLConfig) else Transformer
    return cls(config, rngs=nnx.Rngs(0))


def batch(rows, time, vocab=256, seed=0):
    """tokens [rows, time + 1] and 0/1 weights [rows, time]: random pads, and the first row's
    last five targets padded (as validation rows pad their tail)."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(0, vocab, (rows, time + 1)), jnp.int32)
    weights = (rng.random((rows, time)) > 0.25).astype(np.float32)
    weights[0, -5:] = 0.0
    return tokens, jnp.asarray(weights)


def mean_loss_and_grads(graphdef, params, rest, tokens, weights, block_tokens):
    def mean_loss(params):
        total, count = step_lib.loss_sums(graphdef, params, rest, tokens, weights, loss_block_tokens=block_tokens)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


def assert_trees_close(actual, expected, rtol):
    """Leaf by leaf, relative to the leaf's largest |expected|."""
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        scale = float(jnp.max(jnp.abs(e)))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(e, np.float32), atol=rtol * scale, rtol=0)


# ----------------------------------------------------------------------------------------------
# Same loss and gradients as the full logits.


@pytest.mark.parametrize("name", ["tnl", "transformer"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocked_loss_and_gradients_equal_the_full_logits(name, tie, dtype):
    model = build(name, tie_embeddings=tie, dtype=dtype, param_dtype="float32", num_layers=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens, weights = batch(3, 37)  # 111 tokens
    loss, grads = mean_loss_and_grads(graphdef, params, rest, tokens, weights, 0)
    # 20 tokens: blocks of 6 time steps, the last one slid back (37 = 6 x 6 + 1); 7: blocks of 2;
    # 1000: one block, longer than the batch.
    for block_tokens in (20, 7, 1000):
        blocked_loss, blocked_grads = mean_loss_and_grads(graphdef, params, rest, tokens, weights, block_tokens)
        assert float(blocked_loss) == pytest.approx(float(loss), rel=1e-6)
        # bf16: the blocked loss multiplies d_logits in bf16 (autodiff of the full logits in
        # float32), and d_hidden is rounded to bf16 (2^-8 relative) from float32 sums that run in
        # another order for another block shape, so an element can land a bf16 step or two apart and
        # carry that through the layers' bf16 backward (measured up to 1.3e-2 of the largest
        # gradient, in 2 of 8,192 elements).
        assert_trees_close(blocked_grads, grads, rtol=1e-5 if dtype == "float32" else 2.5e-2)
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(blocked_grads))


def test_cross_entropy_sum_matches_optax_per_block_layout():
    # The function on its own: hidden / weight in both layouts, ragged blocks, gradient in weight only
    # where the vocab is used, and no gradient leaking into padded tokens' hidden states.
    import optax

    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 13, 16)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(50, 16)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 50, (2, 13)), jnp.int32)
    weights = jnp.ones((2, 13), jnp.float32).at[1, 10:].set(0.0)

    def full(hidden, weight):
        logits = jnp.einsum("btd,vd->btv", hidden, weight)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)

    expected, (dh, dw) = jax.value_and_grad(full, argnums=(0, 1))(hidden, weight)
    for vocab_axis, w in ((0, weight), (1, weight.T)):
        blocked = functools.partial(loss_lib.cross_entropy_sum, vocab_axis=vocab_axis, targets=targets,
                                    loss_weights=weights, block_tokens=6)
        value, (bh, bw) = jax.jit(jax.value_and_grad(blocked, argnums=(0, 1)))(hidden, w)
        assert float(value) == pytest.approx(float(expected), rel=1e-6)
        np.testing.assert_allclose(bh, dh, atol=1e-6)
        np.testing.assert_allclose(bw if vocab_axis == 0 else bw.T, dw, atol=1e-5)
        assert not np.any(np.asarray(bh[1, 10:]))


def test_hidden_states_times_logits_weight_are_the_logits():
    tokens = batch(2, 11)[0][:, :-1]
    pad_mask = jnp.ones(tokens.shape, bool).at[0, :3].set(False)
    for name in ("tnl", "transformer"):
        for tie in (True, False):
            model = build(name, tie_embeddings=tie)
            hidden = model.hidden_states(tokens, pad_mask=pad_mask)
            assert hidden.shape == (*tokens.shape, model.config.hidden_dim)
            logits = layers.head_logits(hidden, *model.logits_weight())
            np.testing.assert_array_equal(logits, model(tokens, pad_mask=pad_mask))


# ----------------------------------------------------------------------------------------------
# Meshes, pmap, the train step and evaluation.


def test_sharded_vocab_on_a_mesh_equals_the_full_logits():
    # data 2 x fsdp 2 x tensor 2: the embedding's vocab axis over tensor, its D over fsdp, the batch
    # over data x fsdp (one row per device).
    mesh = make_mesh(2, 2, 2)
    results = {}
    for tie in (True, False):
        model = create_sharded_model(functools.partial(build, "tnl", tie_embeddings=tie), mesh)
        assert model.embed[...].sharding.spec == jax.P("tensor", "fsdp")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        tokens, weights = batch(4, 37)
        with jax.set_mesh(mesh):
            tokens, weights = jax.device_put((tokens, weights), jax.NamedSharding(mesh, jax.P(("data", "fsdp"))))
            full = mean_loss_and_grads(graphdef, params, rest, tokens, weights, 0)
            blocked = mean_loss_and_grads(graphdef, params, rest, tokens, weights, 6)  # 6 steps per block
        assert float(blocked[0]) == pytest.approx(float(full[0]), rel=1e-6)
        assert_trees_close(blocked[1], full[1], rtol=1e-5)
        results[tie] = float(full[0])
    assert results[True] != results[False]


def test_train_step_on_a_tensor_mesh_equals_the_full_logits_step():
    # bf16 compute on fp32 master weights, 2 microbatches, data 2 x tensor 4 (the vocab over tensor).
    mesh = make_mesh(2, 1, 4)
    tx = optim.make_optimizer(OptimConfig(warmup_steps=0), total_steps=10)
    schedule = optim.learning_rate_schedule(OptimConfig(warmup_steps=0), 10)
    tokens = batch(4, 33)[0]
    metrics = {}
    for block_tokens in (0, 16):  # 16: 1 row per device and microbatch, blocks of 16 time steps
        model = create_sharded_model(lambda: build("transformer", dtype="bfloat16", param_dtype="float32"), mesh)
        with jax.set_mesh(mesh):
            graphdef, state = step_lib.init_train_state(model, tx, seed=0)
            step = step_lib.make_train_step(graphdef, tx, schedule, 2, loss_block_tokens=block_tokens)
            state, metrics[block_tokens] = step_lib.jit_train_step(step, state)(
                state, jax.device_put(tokens, jax.NamedSharding(mesh, jax.P("data"))))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    assert float(metrics[16]["loss"]) == pytest.approx(float(metrics[0]["loss"]), rel=1e-6)
    assert float(metrics[16]["grad_norm"]) == pytest.approx(float(metrics[0]["grad_norm"]), rel=1e-3)


def test_pmap_and_jit_evaluation_of_blocked_and_full_loss_agree(tmp_path):
    from lightning_jax.training.evaluation import Evaluator
    from lightning_jax.training.run import setup_run

    config = TrainConfig.from_dict({
        "steps": 1, "workdir": str(tmp_path), "model": {"arch": "tnl", "preset": "tiny", "vocab_size": 257},
        "data": {"seq_len": 37, "batch_size": 16}, "eval": {"max_tokens": 1000, "batch_size": 16},
        "mesh": {"data": 4, "fsdp": 1, "tensor": 2},
    })
    losses = {}
    for block_tokens in (0, 12):  # 12: 4 rows per device, 3 time steps per block (pmap: 2 rows, 6)
        cfg = dataclasses.replace(config, optim=dataclasses.replace(config.optim, loss_block_tokens=block_tokens))
        run = setup_run(cfg)
        for pmap in (False, True):
            losses[block_tokens, pmap] = Evaluator(run, pmap=pmap)(run.state)
    reference = losses[0, False]
    assert reference["eval_tokens"] == 1000
    for key, row in losses.items():
        assert row["eval_tokens"] == 1000
        assert row["eval_loss"] == pytest.approx(reference["eval_loss"], rel=1e-6), key


# ----------------------------------------------------------------------------------------------
# The knob and the memory.


def test_loss_block_tokens_knob_is_checked():
    assert OptimConfig().loss_block_tokens == 4096
    assert OptimConfig(loss_block_tokens=None).loss_block_tokens == 0
    with pytest.raises(ConfigError, match=r"^config\.optim\.loss_block_tokens: got -1") as info:
        TrainConfig.from_dict({"steps": 1, "workdir": "x", "optim": {"loss_block_tokens": -1}})
    assert info.value.field == "config.optim.loss_block_tokens"
    with pytest.raises(ConfigError, match=r"^config\.optim\.loss_block_tokens: got 2\.5"):
        OptimConfig(loss_block_tokens=2.5)
    with pytest.raises(ValueError, match="^block_tokens: got 0"):
        loss_lib.cross_entropy_sum(jnp.zeros((1, 2, 4)), jnp.zeros((8, 4)), 0, jnp.zeros((1, 2), jnp.int32),
                                   jnp.ones((1, 2)), block_tokens=0)


def test_train_step_temp_memory_does_not_hold_the_logits():
    # 8192 tokens of a vocab of 8192: the float32 logits alone are 256 MiB; a block of 512 tokens
    # holds 16 MiB of them. The loss's share of the compiled step's temporaries (temp bytes minus
    # those of the same model with a 256-word vocab) must follow the block, not vocab x tokens.
    tokens = jax.ShapeDtypeStruct((1, 8193), jnp.int32)
    tx = optim.make_optimizer(OptimConfig(), total_steps=10)
    schedule = optim.learning_rate_schedule(OptimConfig(), 10)
    temp = {}
    for vocab in (8192, 256):
        config = dataclasses.replace(CONFIGS["tnl"], vocab_size=vocab, num_layers=1, block_size=64)
        graphdef, state = step_lib.init_train_state(TNL(config, rngs=nnx.Rngs(0)), tx, seed=0)
        for block_tokens in (0, 512):
            step = step_lib.make_train_step(graphdef, tx, schedule, loss_block_tokens=block_tokens)
            compiled = step_lib.jit_train_step(step, state).lower(state, tokens).compile()
            temp[vocab, block_tokens] = compiled.memory_analysis().temp_size_in_bytes
    full, blocked = (temp[8192, b] - temp[256, b] for b in (0, 512))
    logits_bytes, block_bytes = 8192 * 8192 * 4, 512 * 8192 * 4
    print(f"train step temp bytes at vocab 8192, 8192 tokens: full logits {temp[8192, 0] / 2**20:.0f} MiB "
          f"(loss share {full / 2**20:.0f}), blocks of 512 {temp[8192, 512] / 2**20:.0f} MiB (loss share "
          f"{blocked / 2**20:.0f})")
    assert full >= logits_bytes
    assert blocked <= 4 * block_bytes  # = logits_bytes / 4
