"""Sampling from the command line (train/generate.py, issue 17's `python -m lightning_jax.generate`)
from a tiny trained workdir and from a tiny TransNormerLLM directory (save_hf_tnl + a tiny
SentencePiece model), and what it relies on: token ids checked at the model's entry points,
last-position prefill logits, chunked TNL prefill, `Sampler` = `generate`."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
from flax import nnx
from test_train import DEMO, ROOT, demo_config

import lightning_jax as lj
from lightning_jax.checks import ArgumentError
from lightning_jax.models import TNL, TNLConfig, Transformer, TransformerConfig, load_hf_tnl, save_hf_tnl
from lightning_jax.training import data
from lightning_jax.training.loop import load_model, saved_config, train_and_evaluate

_spec = importlib.util.spec_from_file_location("generate_cli", os.path.join(ROOT, "train", "generate.py"))
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)

# The run: demo's model with 1 layer, 1 step of 8 x 32 tokens (the training context is 32).
RUN = {"model": {"num_layers": 1}, "data": {"seq_len": 32, "batch_size": 8},
       "checkpoint": {"every_steps": 2}, "eval": {"every_steps": 0, "max_tokens": 256},
       "log": {"every_steps": 1, "progress_bar": False}}
HF_VOCAB = 300


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = cli.main([str(a) for a in argv], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("run")
    train_and_evaluate(demo_config(path, steps=1, **RUN))
    return str(path)


@pytest.fixture(scope="module")
def trained(workdir):
    """The workdir's newest checkpoint, loaded as the library would."""
    return load_model(saved_config(workdir))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A TNL in the official format with a 300-piece SentencePiece tokenizer.model beside it."""
    path = tmp_path_factory.mktemp("hf") / "tnl"
    model = TNL(TNLConfig.tiny(vocab_size=HF_VOCAB, num_layers=2, init_std=0.1), rngs=nnx.Rngs(0))
    save_hf_tnl(model, str(path))
    lines = [line for line in data.shakespeare_documents("train")[0].splitlines()[:3000] if line.strip()]
    sp = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=sp, vocab_size=HF_VOCAB, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    (path / "tokenizer.model").write_bytes(sp.getvalue())
    return str(path)


def left_padded(rows: list[list[int]]):
    width = max(map(len, rows))
    tokens = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):], mask[i, width - len(r):] = r, True
    return jnp.asarray(tokens), jnp.asarray(mask)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_from_workdir_equals_generate(workdir, trained):
    tok = data.ByteTokenizer()
    model = trained
    prompt = "ROMEO.\n"
    status, out, err = run_cli("--workdir", workdir, "--prompt", prompt, "--max-new-tokens", 12,
                               "--temperature", 0, "--ignore-eos")
    assert status == 0, err
    expected = lj.generate(model, jnp.asarray(tok.encode(prompt))[None], 12, temperature=0.0, rng=jax.random.key(0))
    assert out == prompt + tok.decode(np.asarray(expected[0])) + "\n"
    assert "prefill: 1 prompt(s), 7 tokens" in err and "tokens/s" in err and "decode: 1 x 10 tokens" in err

    # A prompt longer than the training context (32), prefilled 16 tokens at a time, the model built
    # from the config file (as train/main.py --mode=eval) rather than the saved config.
    long_prompt = "KING HENRY.\nWhat say you, lords? " * 3
    status, out, err = run_cli("--config", DEMO, f"--config.workdir={workdir}", "--config.model.num_layers=1",
                               "--prompt", long_prompt, "--max-new-tokens", 6, "--temperature", 0,
                               "--ignore-eos", "--prefill-chunk", 16, "--no-echo")
    assert status == 0, err
    expected = lj.generate(model, jnp.asarray(tok.encode(long_prompt))[None], 6, temperature=0.0,
                           rng=jax.random.key(0))
    assert out == tok.decode(np.asarray(expected[0])) + "\n"
    assert f"prefill: 1 prompt(s), {len(long_prompt)} tokens" in err and "in chunks of 16" in err


def test_cli_sampling_is_seeded_and_equals_generate(trained):
    """The command line's sampling (`sample`, on the loaded model: loading is tested above)."""
    prompts = ["ROMEO.", "JULIET.\nO Romeo"]
    tok = data.ByteTokenizer()

    def sample(seed):
        args = cli._parser().parse_args(["--max-new-tokens", "8", "--temperature", "1.0", "--top-k", "50",
                                         "--ignore-eos", "--seed", str(seed)])
        out, err = io.StringIO(), io.StringIO()
        rows = cli.sample(trained, tok, prompts, args, out=out, err=err)
        return rows, out.getvalue()

    rows, out = sample(3)
    assert sample(3) == (rows, out)
    assert sample(4)[0] != rows
    tokens, mask = left_padded([list(tok.encode(p)) for p in prompts])
    expected = lj.generate(trained, tokens, 8, temperature=1.0, top_k=50, rng=jax.random.key(3), pad_mask=mask)
    assert rows == np.asarray(expected).tolist()
    assert out == (prompts[0] + tok.decode(rows[0]) + "\n" + "-" * 40 + "\n" + prompts[1] + tok.decode(rows[1]) + "\n")


def test_cli_from_hf_dir_equals_generate(hf_dir, tmp_path):
    tok = data.make_tokenizer(f"sp:{os.path.join(hf_dir, 'tokenizer.model')}")
    prompts = ["To be, or not to be", "Now is the winter of our discontent"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    status, out, err = run_cli("--hf-dir", hf_dir, "--prompts-file", tmp_path / "prompts.txt",
                               "--max-new-tokens", 6, "--temperature", 0, "--ignore-eos")
    assert status == 0, err
    tokens, mask = left_padded([list(tok.encode(p)) for p in prompts])
    expected = lj.generate(load_hf_tnl(hf_dir), tokens, 6, temperature=0.0, rng=jax.random.key(0), pad_mask=mask)
    rows = out.rstrip("\n").split("\n" + "-" * 40 + "\n")
    assert len(rows) == 2
    for row, prompt, ids in zip(rows, prompts, np.asarray(expected)):
        assert row.startswith(prompt) and row[len(prompt):].lstrip() == tok.decode(ids).lstrip()
    assert "prefill: 2 prompt(s)" in err and "decode: 2 x 4 tokens" in err


def test_cli_script_streams_from_hf_dir(hf_dir):
    """The script itself, in a fresh process on one device; the tokenizer found in the directory."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "train/generate.py", "--hf-dir", hf_dir, "--prompt", "Shall I compare thee",
         "--max-new-tokens", "5", "--temperature", "0.7", "--top-p", "0.9", "--bos"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Shall I compare thee") and proc.stdout.endswith("\n")
    assert "prefill: 1 prompt(s)" in proc.stderr and "tokens/s" in proc.stderr


@pytest.mark.parametrize("argv, field", [
    (["--prompt", "x", "--top-p", 1.5], "--top-p"),
    (["--prompt", "x", "--max-new-tokens", 0], "--max-new-tokens"),
    (["--prompt", "x"], "--workdir"),
    (["--workdir", "w"], "--prompt"),
    (["--prompt", "x", "--config", "no/such/config.py"], "--config"),
])
def test_cli_errors_are_one_line_naming_the_flag(argv, field):
    status, out, err = run_cli(*argv)
    assert status == 2 and out == ""
    assert err.startswith(f"error: {field}") and err.count("\n") == 1, err


def test_cli_hf_dir_without_tokenizer_names_the_flag(hf_dir, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(hf_dir):
        if name != "tokenizer.model":
            (bare / name).write_bytes(open(os.path.join(hf_dir, name), "rb").read())
    status, _, err = run_cli("--hf-dir", bare, "--prompt", "x")
    assert status == 2 and err.startswith("error: --tokenizer: missing")


# ----------------------------------------------------------------------------------------------
# The library pieces


@pytest.mark.parametrize("model_cls, config", [
    (TNL, TNLConfig.tiny(num_layers=2)), (Transformer, TransformerConfig.tiny(num_layers=2)),
], ids=["tnl", "transformer"])
def test_out_of_range_token_ids_are_an_error_naming_tokens(model_cls, config):
    model = model_cls(config, rngs=nnx.Rngs(0))
    good = jnp.asarray([[3, 4, 5]], jnp.int32)
    cache = model.empty_cache(1) if model_cls is TNL else model.prefill(good, max_new_tokens=2)[1]
    calls = {
        "__call__": lambda t: model(t),
        "hidden_states": lambda t: model.hidden_states(t),
        "prefill": lambda t: model.prefill(t, max_new_tokens=2),
        "decode": lambda t: model.decode(t[:, 1], cache),
    }
    if model_cls is TNL:
        calls["extend"] = lambda t: model.extend(t, model.empty_cache(1))
    for bad in (256, -1):
        tokens = good.at[0, 1].set(bad)
        for name, call in calls.items():
            with pytest.raises(ArgumentError, match=f"tokens: got ids .*{bad} at index") as e:
                call(tokens)
            assert e.value.field == "tokens", name
        with pytest.raises(ArgumentError) as e:  # generate never returns zeros for NaN logits
            lj.generate(model, tokens, 2, rng=jax.random.key(0))
        assert e.value.field == "prompt_tokens"
    if model_cls is Transformer:
        return
    # Pad positions may hold any id: they are masked (and embedded as 0).
    padded = jnp.asarray([[-1, -1, 3, 4, 5]], jnp.int32)
    mask = padded >= 0
    np.testing.assert_array_equal(
        np.asarray(lj.generate(model, padded, 1, temperature=0.0, rng=jax.random.key(0), pad_mask=mask)),
        np.asarray(lj.generate(model, good, 1, temperature=0.0, rng=jax.random.key(0))))


def _prompts(vocab: int):
    """Three rows of 23 tokens, left-padded with 0, 5 and 17 pads."""
    tokens = jax.random.randint(jax.random.key(1), (3, 23), 1, vocab)
    mask = jnp.arange(23)[None] >= jnp.asarray([[0], [5], [17]])
    return jnp.where(mask, tokens, 0), mask


@pytest.mark.parametrize("model_cls, config", [
    (TNL, TNLConfig.tiny(num_layers=2, init_std=0.2, block_size=4)),
    (Transformer, TransformerConfig.tiny(num_layers=2, init_std=0.2)),
], ids=["tnl", "transformer"])
def test_last_only_prefill_logits_equal_the_full_prefill_last_row(model_cls, config):
    model = model_cls(config, rngs=nnx.Rngs(0))
    tokens, mask = _prompts(config.vocab_size)
    prefill = nnx.jit(lambda m, t, p, which: m.prefill(t, pad_mask=p, max_new_tokens=2, logits=which),
                      static_argnums=3)
    full, full_cache = prefill(model, tokens, mask, "all")
    last, last_cache = prefill(model, tokens, mask, "last")
    assert full.shape == (3, 23, config.vocab_size) and last.shape == (3, config.vocab_size)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1]), rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(full_cache), jax.tree.leaves(last_cache)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ArgumentError, match="logits: got 'first'"):
        model.prefill(tokens, logits="first")


def test_chunked_tnl_prefill_equals_one_call():
    # Scanned layers: the chunk loop (a lax.scan) wraps the layer scan.
    config = TNLConfig.tiny(num_layers=3, lrpe_layers=(0,), scan_layers=True, init_std=0.2, block_size=4)
    model = TNL(config, rngs=nnx.Rngs(0))
    tokens, mask = _prompts(config.vocab_size)
    prefill = nnx.jit(lambda m, t, p, which, chunk: m.prefill(t, pad_mask=p, logits=which, chunk=chunk),
                      static_argnums=(3, 4))

    def check(mask, chunk, which):
        logits, cache = prefill(model, tokens, mask, "all", None)
        got, got_cache = prefill(model, tokens, mask, which, chunk)
        if which == "all":
            real = np.ones(tokens.shape, bool) if mask is None else np.asarray(mask)
            np.testing.assert_allclose(np.asarray(got)[real], np.asarray(logits)[real], rtol=1e-4, atol=1e-4)
        else:
            np.testing.assert_allclose(np.asarray(got), np.asarray(logits[:, -1]), rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(got_cache.position), np.asarray(cache.position))
        for a, b in zip(model.layer_states(got_cache), model.layer_states(cache)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(jnp.abs(b).max()))

    # 23 tokens = 3 + 4 x 5 = 7 + 2 x 8: a remainder first, then whole chunks; rows with 0, 5 and
    # 17 pads (pads spanning several chunks), and no pad_mask.
    # (generate and the command line with chunks: test_cli_from_workdir_equals_generate.)
    check(mask, 5, "all")
    check(mask, 8, "last")
    check(None, 8, "all")


def test_prefill_chunk_is_refused_for_the_transformer():
    model = Transformer(TransformerConfig.tiny(num_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ArgumentError, match="prefill_chunk: got 8, expected None for a Transformer"):
        lj.generate(model, jnp.ones((1, 4), jnp.int32), 2, rng=jax.random.key(0), prefill_chunk=8)


def test_a_saved_config_is_fitted_to_this_machine(tmp_path):
    """A run made elsewhere: its mesh does not fit these 8 devices and its corpus is not here."""
    saved = demo_config(tmp_path, mesh={"data": 3}, data={"corpus": str(tmp_path / "gone"), "batch_size": 6},
                        eval={"batch_size": 6})
    fitted = cli._fit_to_devices(saved)
    assert (fitted.mesh.data, fitted.mesh.fsdp, fitted.data.batch_size, fitted.eval.batch_size) == (-1, 1, 8, 0)
    assert fitted.data.corpus == "shakespeare" and fitted.model == saved.model
    assert cli._fit_to_devices(demo_config(tmp_path)) == demo_config(tmp_path)  # fits: unchanged


def test_cli_decodes_a_scanned_model_unscanned(monkeypatch):
    """A model with scanned layers (as a scan_layers=True run loads) is converted once after loading
    (the scanned copy not kept for sampling); the tokens are those of generate on the scanned model."""
    from lightning_jax.models.stack import is_stacked

    tok = data.ByteTokenizer()
    model = TNL(TNLConfig.tiny(num_layers=4, lrpe_layers=(0,), scan_layers=True, init_std=0.2), rngs=nnx.Rngs(0))
    assert is_stacked(model)
    monkeypatch.setattr(cli, "load", lambda args, config_args: (model, tok))
    sampled = []
    sample = cli.sample
    monkeypatch.setattr(cli, "sample", lambda m, *a, **k: sampled.append(m) or sample(m, *a, **k))
    prompt = "ROMEO.\n"
    status, out, err = run_cli("--workdir", "unused", "--prompt", prompt, "--max-new-tokens", 8,
                               "--temperature", 0, "--ignore-eos")
    assert status == 0, err
    assert len(sampled) == 1 and not is_stacked(sampled[0]) and sampled[0].config.scan_layers is False
    expected = lj.generate(model, jnp.asarray(tok.encode(prompt))[None], 8, temperature=0.0, rng=jax.random.key(0))
    assert out == prompt + tok.decode(np.asarray(expected[0])) + "\n"
