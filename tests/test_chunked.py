"""Training a sequence a chunk of time at a time (training/chunked.py, TNL.extend): the loss,
gradients and evaluation sums equal the whole-sequence step's, for ragged lengths, scanned and
remat layers, LRPE on every layer, the full-logits loss, a context mesh axis; the train step and the
config reach it; the Transformer is refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightning_jax.checks import ArgumentError
from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig, create_sharded_model, make_mesh
from lightning_jax.training import chunked, step as step_lib
from lightning_jax.training.config import ConfigError, TrainConfig
from oracles import assert_trees_close

# O(1)-scale weights so mistakes show; LRPE on layer 0 (the default lrpe_layers).
CONFIG = TNLConfig.tiny(init_std=0.2, block_size=8, num_layers=2)


def tokens_of(rows, time, seed=0, vocab=CONFIG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (rows, time + 1)), jnp.int32)


def split(config, seed=0):
    return nnx.split(TNL(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def whole_loss_and_grad(graphdef, params, rest, tokens, weights, block_tokens):
    def mean_loss(params):
        total, count = step_lib.loss_sums(graphdef, params, rest, tokens, weights, loss_block_tokens=block_tokens)
        return total / count

    return jax.jit(jax.value_and_grad(mean_loss))(params)


def test_extend_chunk_by_chunk_equals_hidden_states():
    model = TNL(dataclasses.replace(CONFIG, lrpe_layers=(0, 1)), rngs=nnx.Rngs(1))
    tokens = tokens_of(3, 40, seed=2)[:, :-1]
    whole = model.hidden_states(tokens)
    cache, pieces = model.empty_cache(3), []
    for start, stop in ((0, 7), (7, 23), (23, 24), (24, 40)):  # odd lengths, a single token
        hidden, cache = model.extend(tokens[:, start:stop], cache)
        pieces.append(hidden)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0, atol=2e-5 * float(np.abs(whole).max()))
    np.testing.assert_array_equal(cache.position, [40, 40, 40])
    # The cache after the chunks is prefill's.
    _, prefill = model.prefill(tokens)
    for a, b in zip(model.layer_states(cache), model.layer_states(prefill), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.abs(b).max()))


def test_extend_names_a_bad_position():
    model = TNL(CONFIG, rngs=nnx.Rngs(0))
    cache = dataclasses.replace(model.empty_cache(2), position=jnp.zeros((3,), jnp.int32))
    with pytest.raises(ArgumentError, match=r"^cache\.position: got shape \(3,\)"):
        model.extend(tokens_of(2, 8)[:, :-1], cache)


CASES = {
    # name: (config changes, rows, time, chunk, loss block)
    "even": ({}, 2, 48, 16, 16),
    "ragged_last_chunk": ({}, 3, 45, 16, 8),
    "chunk_smaller_than_block": ({}, 1, 40, 4, 16),
    "full_logits": ({}, 2, 37, 12, 0),
    "scan_remat_lrpe_everywhere": (dict(num_layers=3, lrpe_layers=(0, 1, 2), scan_layers=True, remat="full"),
                                   2, 50, 16, 16),
    "untied_head": (dict(tie_embeddings=False), 2, 33, 8, 8),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_chunked_loss_and_grad_equal_the_whole_sequence(case):
    changes, rows, time, chunk, block = CASES[case]
    graphdef, params, rest = split(dataclasses.replace(CONFIG, **changes))
    tokens = tokens_of(rows, time, seed=3)
    # Weights that are not all ones (padding-like zeros) so the normalisation is tested too.
    weights = jnp.asarray(np.random.default_rng(4).integers(0, 2, (rows, time)), jnp.float32).at[:, 0].set(1.0)
    expected_loss, expected_grads = whole_loss_and_grad(graphdef, params, rest, tokens, weights, block)
    loss, grads = jax.jit(lambda p: chunked.chunked_loss_and_grad(
        graphdef, p, rest, tokens, weights, chunk_tokens=chunk, loss_block_tokens=block))(params)
    assert float(loss) == pytest.approx(float(expected_loss), rel=1e-6)
    assert_trees_close(grads, expected_grads, rtol=2e-5)
    total, count = jax.jit(lambda p: chunked.chunked_loss_sums(
        graphdef, p, rest, tokens, weights, chunk_tokens=chunk, loss_block_tokens=block))(params)
    assert float(total / count) == pytest.approx(float(expected_loss), rel=1e-6)
    assert float(count) == float(jnp.sum(weights))


def test_train_step_uses_chunks_only_for_longer_sequences():
    import optax

    graphdef, params, rest = split(CONFIG)
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    tokens = tokens_of(2, 48, seed=5)
    whole = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, loss_block_tokens=16))
    chunks = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, loss_block_tokens=16, time_chunk_tokens=16))
    (expected, m1), (actual, m2) = whole(state, tokens), chunks(state, tokens)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert_trees_close(actual["params"], expected["params"], rtol=2e-5)
    # The chunked program is a different one (a scan over 3 chunks); at or below the chunk it is not.
    lowered = lambda fn, t: fn.lower(state, t).as_text()  # noqa: E731
    assert lowered(chunks, tokens) != lowered(whole, tokens)
    short = tokens_of(2, 16, seed=6)
    assert lowered(chunks, short) == lowered(whole, short)


def test_gradient_accumulation_with_chunks():
    import optax

    graphdef, params, rest = split(CONFIG)
    tx, schedule = optax.sgd(0.1), optax.constant_schedule(0.1)
    state = {"params": params, "rest": rest, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    tokens = tokens_of(4, 40, seed=7)
    whole = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, 2, loss_block_tokens=8))
    chunks = jax.jit(step_lib.make_train_step(graphdef, tx, schedule, 2, loss_block_tokens=8, time_chunk_tokens=16))
    (expected, m1), (actual, m2) = whole(state, tokens), chunks(state, tokens)
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert_trees_close(actual["params"], expected["params"], rtol=2e-5)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs the eight fake CPU devices of conftest.py")
@pytest.mark.parametrize("mesh_shape", [dict(context=2), dict(data=2, context=4)], ids=["context2", "data2-context4"])
def test_chunks_split_over_a_context_axis_equal_one_device(mesh_shape):
    tokens = tokens_of(2, 64, seed=8)
    weights = jnp.ones((2, 64), jnp.float32)

    def run(mesh, chunk):
        model = create_sharded_model(lambda: TNL(CONFIG, rngs=nnx.Rngs(0)), mesh)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        with jax.set_mesh(mesh):
            batch = jax.NamedSharding(mesh, jax.P(("data", "fsdp")))
            t, w = jax.device_put((tokens, weights), batch)
            if not chunk:
                return jax.device_get(whole_loss_and_grad(graphdef, params, rest, t, w, 16))
            return jax.device_get(jax.jit(lambda p: chunked.chunked_loss_and_grad(
                graphdef, p, rest, t, w, chunk_tokens=chunk, loss_block_tokens=16))(params))

    n = int(np.prod(list(mesh_shape.values())))
    mesh = make_mesh(mesh_shape.get("data", 1), 1, 1, mesh_shape["context"], devices=jax.devices()[:n])
    expected = run(make_mesh(1, 1, 1, 1, devices=jax.devices()[:1]), 0)
    actual = run(mesh, 16)
    assert float(actual[0]) == pytest.approx(float(expected[0]), rel=1e-6)
    assert_trees_close(actual[1], expected[1], rtol=2e-5)


def test_transformer_is_refused_by_name():
    config = TransformerConfig.tiny() if hasattr(TransformerConfig, "tiny") else TransformerConfig()
    graphdef, params, rest = nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)
    tokens = tokens_of(1, 16, vocab=config.vocab_size)
    with pytest.raises(ArgumentError, match=r"^optim\.time_chunk_tokens: .*Transformer"):
        chunked.chunked_loss_and_grad(graphdef, params, rest, tokens, jnp.ones((1, 16)), chunk_tokens=8,
                                      loss_block_tokens=8)


def config_dict(tmp_path, arch="tnl", **optim):
    return {"steps": 4, "workdir": str(tmp_path), "model": {"arch": arch, "preset": "tiny", "vocab_size": 257},
            "data": {"seq_len": 64, "batch_size": 8}, "optim": optim,
            "checkpoint": {"enabled": False}, "eval": {"every_steps": 0, "max_tokens": 2048},
            "log": {"every_steps": 2, "progress_bar": False}}


def test_config_checks_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"^config\.optim\.time_chunk_tokens: got 16, expected 0 for "
                                          r"model\.arch='transformer'"):
        TrainConfig.from_dict(config_dict(tmp_path, "transformer", time_chunk_tokens=16))
    with pytest.raises(ConfigError, match=r"^config\.optim\.time_chunk_tokens: got -1"):
        TrainConfig.from_dict(config_dict(tmp_path, time_chunk_tokens=-1))
    bad_context = {**config_dict(tmp_path, time_chunk_tokens=6), "mesh": {"context": 4}}
    with pytest.raises(ConfigError, match=r"^config\.optim\.time_chunk_tokens: got 6, expected a multiple of "
                                          r"mesh\.context=4"):
        TrainConfig.from_dict(bad_context)


def test_a_run_with_chunks_logs_the_same_losses_as_without(tmp_path):
    import json

    from lightning_jax.training.loop import train_and_evaluate

    losses = {}
    for chunk in (0, 16):
        workdir = tmp_path / f"chunk{chunk}"
        result = train_and_evaluate(TrainConfig.from_dict(config_dict(workdir, time_chunk_tokens=chunk)))
        rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
        losses[chunk] = [r["loss"] for r in rows if "loss" in r] + [result["eval_loss"]]
    assert len(losses[16]) == 3
    np.testing.assert_allclose(losses[16], losses[0], rtol=2e-5)


def test_pmap_and_jit_evaluation_with_chunks_equal_whole_sequences(tmp_path):
    from lightning_jax.training.evaluation import Evaluator
    from lightning_jax.training.run import setup_run

    results = {}
    for chunk in (0, 16):
        cfg = config_dict(tmp_path, time_chunk_tokens=chunk)
        cfg["mesh"] = {"data": 8}
        cfg["eval"] = {"max_tokens": 3000, "batch_size": 16}
        run = setup_run(TrainConfig.from_dict(cfg))
        results[chunk] = [Evaluator(run, pmap=pmap)(run.state)["eval_loss"] for pmap in (False, True)]
    np.testing.assert_allclose(results[16], results[0][0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], results[0][0], rtol=1e-6)
