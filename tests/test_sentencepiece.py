"""SentencePiece tokenizers (TransNormerLLM's tokenizer.model) in the data pipeline, prepare_corpus
and evaluation: a tiny model (300 pieces, pad 0, BOS 1, EOS 2 as TNL's) trained here on the shipped
corpus, offline, in well under a second."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece

from lightning_jax.training import data
from lightning_jax.training.config import ConfigError, TrainConfig
from lightning_jax.training.evaluation import Evaluator
from lightning_jax.training.run import setup_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 300


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A 300-piece BPE SentencePiece model of three Shakespeare works, TNL's special ids."""
    lines = [line for text in data.shakespeare_documents("train")[:3] for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=VOCAB, model_type="bpe",
        pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


def test_sentencepiece_tokenizer(sp_model):
    tok = data.make_tokenizer(f"sp:{sp_model}")
    assert isinstance(tok, data.SentencePieceTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (VOCAB, 0, 1, 2)
    text = "To be, or not to be: that is the question."
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and 0 < len(ids) < len(text) and ids.max() < VOCAB
    assert 1 not in ids and 2 not in ids  # no BOS / EOS added: the pipeline appends EOS itself
    assert tok.decode(list(ids) + [tok.eos_id]) == text
    assert tok.decode(list(ids) + [VOCAB, -1]) == text  # ids outside the vocabulary are dropped


def test_sentencepiece_errors_name_the_tokenizer_field(tmp_path):
    with pytest.raises(data.DataError, match="config.data.tokenizer"):
        data.make_tokenizer(f"sp:{tmp_path / 'missing.model'}")
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(data.DataError, match="config.data.tokenizer.*not a SentencePiece model"):
        data.make_tokenizer(f"sp:{tmp_path / 'bad.model'}")
    with pytest.raises(data.DataError, match="sp:/path/to/tokenizer.model"):
        data.make_tokenizer("sentencepiece")


def test_prepare_corpus_with_sentencepiece(sp_model, tmp_path):
    docs = ["Now is the winter of our discontent.", "Shall I compare thee to a summer's day?"]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    proc = subprocess.run(
        [sys.executable, "train/prepare_corpus.py", "--input", str(tmp_path / "*.txt"), "--split", "validation",
         "--tokenizer", f"sp:{sp_model}", "--out", str(tmp_path / "corpus")],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "corpus" / "meta.json").read_text())
    assert meta == {"dtype": "uint16", "vocab_size": VOCAB, "eos_id": 2}
    stream = np.fromfile(tmp_path / "corpus" / "validation.bin", dtype=np.uint16)
    tok = data.make_tokenizer(f"sp:{sp_model}")
    pieces = np.split(stream, np.where(stream == 2)[0] + 1)[:-1]
    assert [tok.decode(p) for p in pieces] == docs


def test_training_data_and_evaluation_with_sentencepiece(sp_model, tmp_path):
    def config(vocab_size):
        return TrainConfig.from_dict({
            "steps": 1, "workdir": str(tmp_path), "model": {"arch": "tnl", "preset": "tiny", "vocab_size": vocab_size},
            "data": {"tokenizer": f"sp:{sp_model}", "seq_len": 64, "batch_size": 8},
            "eval": {"max_tokens": 1024}, "mesh": {"data": 8},
        })

    with pytest.raises(ConfigError) as e:  # the model must cover the tokenizer's 300 ids
        setup_run(config(257))
    assert e.value.field == "config.model.vocab_size"

    run = setup_run(config(VOCAB))
    assert isinstance(run.tokenizer, data.SentencePieceTokenizer)
    batch = next(iter(data.train_dataset("shakespeare", run.tokenizer, seq_len=64, local_batch_size=8, seed=0)))
    tokens = batch["tokens"]
    assert tokens.shape == (8, 65) and tokens.min() >= 0 and tokens.max() < VOCAB
    result = Evaluator(run)(run.state)
    assert result["eval_tokens"] == 1024
    assert abs(result["eval_loss"] - math.log(VOCAB)) < 1.0  # an untrained model: near uniform
