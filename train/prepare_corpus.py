"""Tokenize a text corpus once, offline, into the pre-tokenized format training memory-maps.

    python train/prepare_corpus.py --input 'tinystories/train/*.jsonl' --split train \
        --tokenizer hf:gpt2/tokenizer.json --out data/tinystories_gpt2
    python train/prepare_corpus.py --input 'tinystories/valid/*.jsonl' --split validation \
        --tokenizer hf:gpt2/tokenizer.json --out data/tinystories_gpt2
    python train/main.py --config train/configs/demo.py --config.data.corpus=data/tinystories_gpt2 \
        --config.model.vocab_size=50304

    python train/prepare_corpus.py --input 'fineweb/*.parquet' --split train \
        --tokenizer sp:TransNormerLLM-385M/tokenizer.model --out data/fineweb_tnl

Input files: *.txt (one document per file), *.jsonl (one {"text": ...} per line) or *.parquet with a
"text" column (needs pyarrow). Output: <out>/<split>.bin (token ids, EOS after each document) and
<out>/meta.json. See docs/training.md.
"""

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lightning_jax.training import data  # noqa: E402


def documents(paths):
    for path in paths:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield json.loads(line)["text"]
        elif path.endswith(".parquet"):
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
                yield from batch.column("text").to_pylist()
        else:
            raise SystemExit(f"error: --input: {path} is not .txt, .jsonl or .parquet")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="glob of input files")
    parser.add_argument("--split", required=True, choices=["train", "validation"])
    parser.add_argument("--tokenizer", default="byte",
                        help="'byte', 'hf:/path/to/tokenizer.json' or 'sp:/path/to/tokenizer.model' (SentencePiece)")
    parser.add_argument("--out", required=True, help="output corpus directory")
    args = parser.parse_args()
    paths = sorted(glob.glob(args.input))
    if not paths:
        print(f"error: --input: no files match {args.input}", file=sys.stderr)
        return 2
    try:
        tokenizer = data.make_tokenizer(args.tokenizer)
        count = data.write_token_split(documents(paths), tokenizer, args.out, args.split)
    except data.DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}/{args.split}.bin: {count} tokens from {len(paths)} files (vocab {tokenizer.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
