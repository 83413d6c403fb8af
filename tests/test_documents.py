"""Packed documents kept apart (`data.document_mask`): TNL with segment ids gives each document what
it gives alone (logits, LRPE positions, chunked states); the loss skips the target across each
boundary and equals the sum of the documents' own losses; gradients, gradient accumulation,
chunked training and jit / pmap evaluation agree with the plain paths; the data pipeline finds the
documents; the config names what it refuses."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lightning_jax.checks import ArgumentError
from lightning_jax.models import TNL, TNLConfig, layers
from lightning_jax.training import chunked, data, step as step_lib
from lightning_jax.training.config import ConfigError, TrainConfig
from oracles import assert_trees_close

# O(1)-scale weights so mistakes show; fp32; LRPE on every layer (positions must restart).
CONFIG = TNLConfig.tiny(init_std=0.2, block_size=8, num_layers=3, lrpe_layers=(0, 1, 2))


def packed(lengths_per_row, seed=0, vocab=CONFIG.vocab_size):
    """Rows of documents packed back to back: (tokens [rows, T + 1], segment_ids [rows, T + 1],
    documents: per row the list of its documents' token arrays). Ids start anywhere and skip."""
    rng = np.random.default_rng(seed)
    tokens, ids, docs = [], [], []
    for lengths in lengths_per_row:
        row_docs = [rng.integers(0, vocab, n) for n in lengths]
        first = int(rng.integers(0, 5))
        tokens.append(np.concatenate(row_docs))
        ids.append(np.concatenate([np.full(n, first + 3 * i) for i, n in enumerate(lengths)]))
        docs.append(row_docs)
    return jnp.asarray(np.stack(tokens), jnp.int32), jnp.asarray(np.stack(ids), jnp.int32), docs


def split(config=CONFIG, seed=0):
    return nnx.split(TNL(config, rngs=nnx.Rngs(seed)), nnx.Param, ...)


def test_positions_restart_at_each_document():
    ids = jnp.asarray([[4, 4, 4, 7, 7, 9], [1, 2, 2, 2, 2, 2]])
    np.testing.assert_array_equal(layers.document_starts(ids), [[0, 0, 0, 1, 0, 1], [0, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(layers.positions_in_documents(ids), [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]])
    # The first document continues from an offset (a cache's position); the others restart.
    np.testing.assert_array_equal(layers.positions_in_documents(ids, jnp.asarray([10, 3])),
                                  [[10, 11, 12, 0, 1, 0], [3, 0, 1, 2, 3, 4]])
    np.testing.assert_array_equal(layers.positions_in_documents(ids[:, :1], 5), [[5], [5]])


@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scanned"])
def test_each_document_gives_what_it_gives_alone(scan):
    model = TNL(dataclasses.replace(CONFIG, scan_layers=scan), rngs=nnx.Rngs(1))
    tokens, ids, docs = packed([[5, 11, 1, 7], [24]], seed=2)
    logits = model(tokens, segment_ids=ids)
    for row, row_docs in enumerate(docs):
        alone = jnp.concatenate([model(jnp.asarray(d)[None])[0] for d in row_docs])
        np.testing.assert_allclose(logits[row], alone, rtol=0, atol=1e-5 * float(np.abs(alone).max()))
    # Without segment ids the later documents see the earlier ones: the test can fail.
    assert float(jnp.max(jnp.abs(model(tokens)[0, 5:] - logits[0, 5:]))) > 1e-2


def test_extend_carries_a_document_across_calls_and_resets_a_new_one():
    model = TNL(CONFIG, rngs=nnx.Rngs(3))
    tokens, ids, _ = packed([[6, 10, 8], [3, 3, 18]], seed=4)
    whole = model.hidden_states(tokens, segment_ids=ids)
    cache, pieces = model.empty_cache(2), []
    for start, stop in ((0, 4), (4, 6), (6, 7), (7, 16), (16, 24)):  # row 1: a document starts at 6
        if start:
            cache = cache.reset_rows(ids[:, start] != ids[:, start - 1])
        hidden, cache = model.extend(tokens[:, start:stop], cache, segment_ids=ids[:, start:stop])
        pieces.append(hidden)
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), whole, rtol=0, atol=2e-5 * float(np.abs(whole).max()))
    np.testing.assert_array_equal(cache.position, [8, 18])  # tokens of each row's last document


def test_segment_ids_are_checked_by_name():
    model = TNL(CONFIG, rngs=nnx.Rngs(0))
    tokens, ids, _ = packed([[4, 4]])
    with pytest.raises(ArgumentError, match=r"^segment_ids: got shape \(1, 7\) dtype int32, expected shape \(1, 8\) .* to match tokens"):
        model(tokens, segment_ids=ids[:, :-1])
    with pytest.raises(ArgumentError, match=r"^segment_ids: got segment_ids together with pad_mask"):
        model(tokens, segment_ids=ids, pad_mask=jnp.ones(tokens.shape, bool))
    with pytest.raises(ArgumentError, match=r"^segment_ids: got a decrease in row 0 at time 4"):
        model(tokens, segment_ids=ids.at[0, 4].set(-1))


def document_loss_sums(graphdef, params, rest, docs):
    """The documents' own losses, each document alone (its last token predicts nothing)."""
    total = count = 0.0
    for row_docs in docs:
        for doc in row_docs:
            if len(doc) < 2:
                continue
            t = jnp.asarray(doc)[None]
            s, n = step_lib.loss_sums(graphdef, params, rest, t, jnp.ones((1, len(doc) - 1)), loss_block_tokens=8)
            total, count = total + float(s), count + float(n)
    return total, count


@pytest.mark.parametrize("block", [8, 0], ids=["blocked_loss", "full_logits"])
def test_the_loss_is_the_sum_of_the_documents_losses(block):
    graphdef, params, rest = split()
    tokens, ids, docs = packed([[9, 1, 14], [6, 18]], seed=5)
    weights = jnp.ones((2, tokens.shape[1] - 1))
    total, count = step_lib.loss_sums(graphdef, params, rest, tokens, weights, ids, loss_block_tokens=block)
    expected_total, expected_count = document_loss_sums(graphdef, params, rest, docs)
    assert float(count) == expected_count == 24 - 3 + 24 - 2  # one target fewer per document
    np.testing.assert_allclose(float(total), expected_total, rtol=2e-6)


def loss_and_grad(graphdef, params, rest, tokens, ids, time_chunk_tokens=0):
    weights = step_lib.document_weights(jnp.ones((tokens.shape[0], tokens.shape[1] - 1)), ids)
    if time_chunk_tokens:
        return jax.jit(lambda p: chunked.chunked_loss_and_grad(graphdef, p, rest, tokens, weights, ids,
                                                               chunk_tokens=time_chunk_tokens,
                                                               loss_block_tokens=8))(params)

    def mean(p):
        total, count = step_lib.loss_sums(graphdef, p, rest, tokens, weights, ids, loss_block_tokens=8)
        return total / count

    return jax.jit(jax.value_and_grad(mean))(params)


@pytest.mark.parametrize("chunk", [8, 5], ids=["boundaries_on_chunk_starts", "boundaries_inside_chunks"])
def test_chunked_training_keeps_documents_apart(chunk):
    graphdef, params, rest = split(dataclasses.replace(CONFIG, scan_layers=True))
    # Documents start at 8 and 16 in row 0 (chunk starts for chunk 8), at 3 and 13 in row 1.
    tokens, ids, _ = packed([[8, 8, 9], [3, 10, 12]], seed=6)
    loss, grads = loss_and_grad(graphdef, params, rest, tokens, ids)
    chunk_loss, chunk_grads = loss_and_grad(graphdef, params, rest, tokens, ids, time_chunk_tokens=chunk)
    np.testing.assert_allclose(float(chunk_loss), float(loss), rtol=2e-6)
    assert_trees_close(chunk_grads, grads, rtol=2e-4)
    # The masked gradient is not the unmasked one: the documents' separation reaches the gradient.
    _, plain = loss_and_grad(graphdef, params, rest, tokens, None)
    assert float(optax_norm_diff(plain, grads)) > 1e-3


def optax_norm_diff(a, b):
    return jnp.sqrt(sum(jnp.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_train_step_with_documents_and_gradient_accumulation():
    import optax

    graphdef, params, rest = split()
    state = {"params": params, "rest": rest, "step": jnp.zeros((), jnp.int32)}
    tx = optax.sgd(0.1)
    state["opt_state"] = tx.init(params)
    tokens, ids, _ = packed([[9, 15], [4, 20], [24], [12, 12]], seed=7)
    results = {}
    for k in (1, 2):
        step = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(0.1), k, loss_block_tokens=8))
        new_state, metrics = step(state, tokens, ids)
        results[k] = (metrics["loss"], new_state["params"])
    np.testing.assert_allclose(float(results[2][0]), float(results[1][0]), rtol=2e-6)
    assert_trees_close(results[2][1], results[1][1], rtol=1e-5)
    _, plain = jax.jit(step_lib.make_train_step(graphdef, tx, optax.constant_schedule(0.1), loss_block_tokens=8))(
        state, tokens)
    assert abs(float(plain["loss"]) - float(results[1][0])) > 1e-3


def test_segment_ids_from_eos():
    eos = 9
    tokens = np.array([[1, 2, 9, 3, 9, 9, 4], [9, 5, 6, 7, 8, 1, 2]])
    np.testing.assert_array_equal(data.segment_ids_from_eos(tokens, eos), [[0, 0, 0, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]])
    # The target after each EOS is across a boundary.
    ids = data.segment_ids_from_eos(tokens, eos)
    weights = step_lib.document_weights(jnp.ones((2, 6)), jnp.asarray(ids))
    np.testing.assert_array_equal(weights, (tokens[:, :-1] != eos).astype(np.float32))


def test_text_corpus_rows_number_their_pieces():
    tok = data.ByteTokenizer()
    dataset = data.train_dataset("shakespeare", tok, seq_len=16383, local_batch_size=2, seed=0, document_ids=True)
    batch = next(iter(dataset))
    tokens, ids = batch["tokens"], batch["segment_ids"]
    assert ids.shape == tokens.shape == (2, 16384) and ids.dtype == np.int32
    assert (np.diff(ids, axis=1) >= 0).all()
    # Every segment that lies wholly inside a row is exactly one shuffled piece of a training
    # document (with EOS after a document's last piece): the ids change at piece boundaries only.
    pieces = set()
    for text in data.documents("shakespeare", "train"):
        for piece in data.split_into_pieces(text):
            ids_ = tok.encode(piece.text).tolist() + ([tok.eos_id] if piece.last else [])
            pieces.add(tuple(ids_))
    inner = 0
    for row_tokens, row_ids in zip(tokens, ids):
        values = np.unique(row_ids)
        for value in values[1:-1]:
            assert tuple(row_tokens[row_ids == value].tolist()) in pieces
            inner += 1
    assert inner >= 2


def test_token_corpus_rows_split_at_eos(tmp_path):
    tok = data.ByteTokenizer()
    data.write_token_split(["abc", "defgh", "ij"] * 50, tok, str(tmp_path), "train")
    data.write_token_split(["xyz"], tok, str(tmp_path), "validation")
    batch = next(iter(data.train_dataset(str(tmp_path), tok, seq_len=15, local_batch_size=3, seed=0,
                                         document_ids=True)))
    np.testing.assert_array_equal(batch["segment_ids"], data.segment_ids_from_eos(batch["tokens"], tok.eos_id))
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["eos_id"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(data.DataError, match=r"^config\.data\.document_mask: .*meta\.json has no integer 'eos_id'"):
        data.open_corpus(str(tmp_path)).eos_id(tok)


def config_dict(tmp_path, arch="tnl", **data_fields):
    return {"steps": 4, "workdir": str(tmp_path), "model": {"arch": arch, "preset": "tiny", "vocab_size": 257},
            "data": {"seq_len": 64, "batch_size": 8, **data_fields}, "optim": {"time_chunk_tokens": 0},
            "checkpoint": {"enabled": False}, "eval": {"every_steps": 0, "max_tokens": 2048},
            "log": {"every_steps": 2, "progress_bar": False}}


def test_config_refuses_what_does_not_mask(tmp_path):
    with pytest.raises(ConfigError, match=r"^config\.data\.document_mask: got True, expected False for "
                                          r"model\.arch='transformer'"):
        TrainConfig.from_dict(config_dict(tmp_path, "transformer", document_mask=True))


def small_corpus(path):
    """A byte-token corpus of short documents (many boundaries in every row)."""
    rng = np.random.default_rng(0)
    words = ["the ", "king ", "is ", "dead", ". ", "long ", "live ", "queen", "\n"]
    docs = ["".join(rng.choice(words, int(rng.integers(3, 30)))) for _ in range(400)]
    data.write_token_split(docs[:360], data.ByteTokenizer(), str(path), "train")
    data.write_token_split(docs[360:], data.ByteTokenizer(), str(path), "validation")
    return str(path)


def test_a_run_with_document_masks_trains_and_evaluates_alike_by_jit_pmap_and_chunks(tmp_path):
    from lightning_jax.training.evaluation import Evaluator
    from lightning_jax.training.loop import train_and_evaluate
    from lightning_jax.training.run import setup_run

    corpus = small_corpus(tmp_path / "corpus")
    result = train_and_evaluate(TrainConfig.from_dict(config_dict(tmp_path / "run", corpus=corpus,
                                                                  document_mask=True)))
    plain = train_and_evaluate(TrainConfig.from_dict(config_dict(tmp_path / "plain", corpus=corpus)))
    # One target fewer per document boundary in the held-out rows.
    assert np.isfinite(result["eval_loss"]) and plain["eval_tokens"] - result["eval_tokens"] >= 30
    losses = {}
    for chunk in (0, 16):
        cfg = config_dict(tmp_path, corpus=corpus, document_mask=True)
        cfg["optim"]["time_chunk_tokens"] = chunk
        cfg["mesh"] = {"data": 8}
        cfg["eval"] = {"max_tokens": -1, "batch_size": 16}
        run = setup_run(TrainConfig.from_dict(cfg))
        losses[chunk] = [Evaluator(run, pmap=pmap)(run.state)["eval_loss"] for pmap in (False, True)]
    np.testing.assert_allclose(losses[0][1], losses[0][0], rtol=1e-6)
    np.testing.assert_allclose(losses[16], losses[0][0], rtol=1e-5)


def test_document_masks_with_the_sequence_split_over_a_context_axis(tmp_path):
    """mesh.context=4 (each row's 64 tokens over 4 devices, documents crossing the slices): the same
    evaluation loss and training losses as one device per sequence, whole and in chunks of 32."""
    import json as json_lib

    from lightning_jax.training.evaluation import Evaluator
    from lightning_jax.training.loop import train_and_evaluate
    from lightning_jax.training.run import setup_run

    corpus = small_corpus(tmp_path / "corpus")
    losses = {}
    for context, chunk in ((1, 0), (4, 0), (4, 32)):
        cfg = config_dict(tmp_path / f"run{context}_{chunk}", corpus=corpus, document_mask=True)
        cfg["optim"]["time_chunk_tokens"] = chunk
        cfg["mesh"] = {"data": 8 // context, "context": context}
        cfg["eval"] = {"every_steps": 0, "max_tokens": 2000, "batch_size": 8}
        run = setup_run(TrainConfig.from_dict(cfg))
        evaluated = Evaluator(run)(run.state)["eval_loss"]
        train_and_evaluate(TrainConfig.from_dict(cfg))
        rows = [json_lib.loads(line) for line in open(tmp_path / f"run{context}_{chunk}" / "metrics.jsonl")]
        losses[(context, chunk)] = [evaluated] + [r["loss"] for r in rows if "loss" in r]
    np.testing.assert_allclose(losses[(4, 0)], losses[(1, 0)], rtol=2e-5)
    np.testing.assert_allclose(losses[(4, 32)], losses[(1, 0)], rtol=2e-5)
