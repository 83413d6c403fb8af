"""Sample from a model on the command line: a training workdir's newest checkpoint, or a converted
TransNormerLLM checkpoint directory (Hugging Face layout). This is issue 17's
`python -m lightning_jax.generate`; like every command line of the project it lives in `train/`,
so that importing the library runs nothing.

    python train/generate.py --workdir runs/demo --prompt "ROMEO." --max-new-tokens 200 --temperature 0.8 --top-k 40
    python train/generate.py --config train/configs/demo.py --prompt "ROMEO."        # config.workdir, as --mode=eval
    python train/generate.py --hf-dir TransNormerLLM-385M --prompt "The capital of France is" --temperature 0
    python train/generate.py --hf-dir TransNormerLLM-385M --prompts-file prompts.txt --max-new-tokens 64

Where the model comes from (one of):
  --workdir DIR        the newest checkpoint of a training run (`--step N` for another), built with the
                       configuration the run saved in its checkpoints (its mesh if it fits this
                       machine's devices, else all devices on the data axis).
  --config FILE        a config file as for train/main.py, with `--config.a.b=value` overrides; the
                       workdir is config.workdir unless --workdir is given.
  --hf-dir DIR         a TransNormerLLM checkpoint directory (`load_hf_tnl`; `--dtype` to convert),
                       with its tokenizer.model (SentencePiece) unless --tokenizer is given.

Prompts: `--prompt TEXT` (repeatable) and/or `--prompts-file FILE` (one prompt per line) form one
batch, left-padded to the longest. One prompt streams its text as it is generated; a batch prints
each row when done. Generation stops at `--max-new-tokens` or when every row has produced the
tokenizer's EOS (`--ignore-eos` to go on). Sampling: `--temperature` (0: greedy), `--top-k`,
`--top-p`, `--seed`; the tokens are those `lightning_jax.generate` returns for the same arguments.
The model is converted once after loading to the decoding layout
(`lightning_jax.generation.decoding_model`): one layer group per layer where it was trained with
scanned layers (about twice as fast at large batches), and projection weights with their input
axes last (about 1.7x as fast at batch 1); the same function.
Prompts may be longer than the training context: TNL's state does not grow, and `--prefill-chunk`
(default 32768 for TNL) runs a long prompt through the model a chunk at a time, so prefill memory
follows the chunk. Prefill and decode tokens/s go to stderr at the end.

A bad argument, config, path or checkpoint prints one line naming it and exits with status 2.
Single process only (no jax.distributed).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time

DEFAULT_PREFILL_CHUNK = 32768
log = logging.getLogger("generate")


class UsageError(Exception):
    """One line for stderr, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/generate.py", description="Sample from a training workdir or a TransNormerLLM checkpoint.",
        epilog="--config FILE and --config.a.b=value overrides work as in train/main.py.")
    source = p.add_argument_group("model")
    source.add_argument("--workdir", help="training workdir: its newest checkpoint and saved config")
    source.add_argument("--step", type=int, help="checkpoint step of the workdir (default: the newest)")
    source.add_argument("--hf-dir", help="TransNormerLLM checkpoint directory (config.json + weights)")
    source.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="with --hf-dir: parameter and compute dtype (default: as stored)")
    source.add_argument("--tokenizer", help="byte, hf:PATH/tokenizer.json or sp:PATH/tokenizer.model "
                                            "(default: the run's, or the directory's tokenizer.model)")
    prompts = p.add_argument_group("prompts")
    prompts.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: a batch)")
    prompts.add_argument("--prompts-file", help="a file of prompts, one per line (empty lines skipped)")
    prompts.add_argument("--bos", action="store_true", help="start each prompt with the tokenizer's BOS token")
    prompts.add_argument("--echo", action=argparse.BooleanOptionalAction, default=True,
                         help="print each prompt before its continuation (default: yes)")
    sampling = p.add_argument_group("sampling")
    sampling.add_argument("--max-new-tokens", type=int, default=100)
    sampling.add_argument("--temperature", type=float, default=1.0, help="0: greedy (default 1.0)")
    sampling.add_argument("--top-k", type=int, help="keep the k most likely tokens")
    sampling.add_argument("--top-p", type=float, help="nucleus sampling: keep this much probability")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    sampling.add_argument("--prefill-chunk", type=int,
                          help=f"TNL: prefill long prompts this many tokens at a time (default {DEFAULT_PREFILL_CHUNK}; "
                               "0: the whole prompt at once)")
    return p


def split_config_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(--config / --config.a.b=v / --noconfig.a.b arguments, the others). `--config FILE` may take
    its value as the next argument; overrides take theirs after `=`."""
    config_args, rest = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if name == "config" or name.startswith(("config.", "noconfig.")):
            config_args.append(arg)
            if name == "config" and "=" not in arg and i + 1 < len(argv):
                config_args.append(argv[i + 1])
                i += 1
        else:
            rest.append(arg)
        i += 1
    return config_args, rest


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def load_config_file(config_args: list[str]):
    """`--config FILE` with its overrides (ml_collections, as train/main.py), as a dict (None
    without a file)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["generate.py", *config_args]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=values, lock_config=True,
                                    sys_argv=argv)  # where it looks for the overrides
    try:
        values(argv)
        config = values.config
        # A file that failed to load is an object that raises when used: use it here.
        return None if config is None else config.to_dict()
    # Any failure to read the file or an override is a usage error.
    except Exception as e:  # noqa: BLE001
        raise UsageError(f"--config: {_one_line(e)}") from None


def _fit_to_devices(config):
    """A saved config for generation on this machine: its mesh if it fits the devices here, else all
    devices on the data axis (parameters replicated), with batch sizes that divide it; the shipped
    corpus when the run's is not here (generation reads no data; the setup only checks it)."""
    import jax

    from lightning_jax.models import make_mesh
    from lightning_jax.training import data as data_lib
    from lightning_jax.training.config import MeshConfig

    m = config.mesh
    try:
        make_mesh(m.data, m.fsdp, m.tensor, m.context)
    except ValueError:
        log.warning(f"the run's mesh (data {m.data}, fsdp {m.fsdp}, tensor {m.tensor}, context {m.context}) does "
                    f"not fit the {jax.device_count()} devices here: using all of them on the data axis")
        rows = jax.device_count() * config.optim.grad_accum_steps
        config = dataclasses.replace(config, mesh=MeshConfig(), eval=dataclasses.replace(config.eval, batch_size=0),
                                     data=dataclasses.replace(config.data, batch_size=rows))
    try:
        data_lib.check_corpus(config.data.corpus)
    except data_lib.DataError:
        log.warning(f"the run's corpus {config.data.corpus} is not here; generation does not read it")
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, corpus="shakespeare"))
    return config


def load(args, config_args):
    """(model, tokenizer) from --hf-dir, --config or --workdir."""
    from lightning_jax.training import data as data_lib

    if args.hf_dir:
        if args.workdir or config_args or args.step is not None:
            raise UsageError("--hf-dir: got it with --workdir / --config / --step, expected one model source")
        from lightning_jax.models import load_hf_tnl

        spec = args.tokenizer
        if spec is None:
            path = os.path.join(args.hf_dir, "tokenizer.model")
            if not os.path.isfile(path):
                raise UsageError(f"--tokenizer: missing, and {args.hf_dir} has no tokenizer.model; expected e.g. "
                                 "--tokenizer sp:/path/to/tokenizer.model")
            spec = f"sp:{path}"
        tokenizer = data_lib.make_tokenizer(spec)
        return load_hf_tnl(args.hf_dir, dtype=args.dtype), tokenizer

    if args.dtype:
        raise UsageError(f"--dtype: got {args.dtype!r} without --hf-dir, expected it only with --hf-dir "
                         "(for a workdir: --config ... --config.model.dtype=...)")
    from lightning_jax.training.loop import load_model, saved_config
    from lightning_jax.training.run import as_config

    if config_args:
        config = load_config_file(config_args)
        if config is None:
            raise UsageError("--config: missing the file, e.g. --config train/configs/demo.py")
        config = as_config(config, args.workdir)
    elif args.workdir:
        config = _fit_to_devices(saved_config(args.workdir, step=args.step))
    else:
        raise UsageError("--workdir: missing, expected --workdir DIR, --config FILE or --hf-dir DIR")
    tokenizer = data_lib.make_tokenizer(args.tokenizer or config.data.tokenizer)
    return load_model(config, step=args.step, tokenizer=tokenizer), tokenizer


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            with open(args.prompts_file, encoding="utf-8") as f:
                prompts += [line.rstrip("\r\n") for line in f if line.strip()]
        except OSError as e:
            raise UsageError(f"--prompts-file: cannot read {args.prompts_file} ({e.strerror})") from None
    if not prompts:
        raise UsageError("--prompt: missing, expected --prompt TEXT (repeatable) or --prompts-file FILE")
    return prompts


def check_arguments(args) -> None:
    """The sampling flags, named as on the command line, before anything loads."""
    from lightning_jax import checks

    checks.check_int("--max-new-tokens", args.max_new_tokens, minimum=1)
    checks.check_float("--temperature", args.temperature, low=0.0)
    if args.top_k is not None:
        checks.check_int("--top-k", args.top_k, minimum=1)
    if args.top_p is not None:
        checks.check_float("--top-p", args.top_p, low=0.0, high=1.0, open_low=True)
    if args.prefill_chunk is not None:
        checks.check_int("--prefill-chunk", args.prefill_chunk, minimum=0)
    if args.step is not None:
        checks.check_int("--step", args.step, minimum=0)


def encode_batch(prompts: list[str], tokenizer, bos: bool):
    """-> (token lists, tokens [batch, width] int32 left-padded with 0, pad_mask [batch, width])."""
    import numpy as np

    start = []
    if bos:
        bos_id = getattr(tokenizer, "bos_id", -1)
        if bos_id is None or bos_id < 0:
            raise UsageError(f"--bos: the tokenizer ({type(tokenizer).__name__}) has no BOS token")
        start = [int(bos_id)]
    encoded = [start + [int(t) for t in tokenizer.encode(p)] for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise UsageError(f"--prompt: prompt {i} ({prompts[i]!r}) encodes to no tokens; give text, or --bos")
    width = max(map(len, encoded))
    tokens = np.zeros((len(encoded), width), np.int32)
    mask = np.zeros((len(encoded), width), bool)
    for row, ids in enumerate(encoded):
        tokens[row, width - len(ids):], mask[row, width - len(ids):] = ids, True
    return encoded, tokens, mask


class TextStream:
    """The text of a continuation, decoded with the tokens before it in front (so that tokenizers
    that drop a leading space decode it in context). `text(ids)`: the text of `ids` after the prompt;
    `push(ids)`: the text of these next tokens, holding back an unfinished UTF-8 character until it
    completes (or `final`). Each call decodes a few tokens, not everything so far."""

    CONTEXT = 16  # tokens decoded in front of the new ones

    def __init__(self, tokenizer, prompt_ids: list[int]):
        self.tokenizer, self.context, self.pending = tokenizer, list(prompt_ids[-self.CONTEXT:]), []

    def _after(self, context: list[int], ids: list[int]) -> str:
        base, full = self.tokenizer.decode(context), self.tokenizer.decode(context + ids)
        return full[len(base):] if full.startswith(base) else self.tokenizer.decode(ids)

    def text(self, ids: list[int]) -> str:
        return self._after(self.context, list(ids))

    def push(self, ids: list[int], final: bool = False) -> str:
        self.pending += list(ids)
        text = self._after(self.context, self.pending)
        if text.endswith("\ufffd") and not final:
            return ""
        self.context, self.pending = (self.context + self.pending)[-self.CONTEXT:], []
        return text


def _until_eos(ids: list[int], eos: int | None) -> list[int]:
    return ids[: ids.index(eos)] if eos is not None and eos in ids else ids


def _show(out, text: str) -> None:
    if text:
        out.write(text)
        out.flush()


def sample(model, tokenizer, prompts: list[str], args, out=sys.stdout, err=sys.stderr) -> list[list[int]]:
    """Samples, prints the text (streamed for one prompt) to `out` and the speeds to `err`; returns
    each row's new token ids (up to and including EOS, if it came)."""
    import jax
    import numpy as np

    from lightning_jax.generation import Sampler

    encoded, tokens, mask = encode_batch(prompts, tokenizer, args.bos)
    chunk = args.prefill_chunk
    if chunk is None:
        chunk = DEFAULT_PREFILL_CHUNK if hasattr(model, "extend") else 0
    eos = None if args.ignore_eos else getattr(tokenizer, "eos_id", None)
    sampler = Sampler(model, tokens, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, rng=jax.random.key(args.seed), pad_mask=mask, prefill_chunk=chunk or None)
    batch = len(prompts)
    stream = TextStream(tokenizer, encoded[0]) if batch == 1 else None
    if stream is not None and args.echo:
        _show(out, prompts[0])

    start = time.perf_counter()
    token, cache = sampler.prefill()
    new = [np.asarray(token)]
    prefill_seconds = time.perf_counter() - start
    done = np.zeros(batch, bool)
    decode_start, timed_steps = None, 0
    for i in range(1, args.max_new_tokens + 1):
        if stream is not None and not done[0] and new[-1][0] != eos:
            _show(out, stream.push([int(new[-1][0])]))
        if eos is not None:
            done |= new[-1] == eos
        if done.all() or i == args.max_new_tokens:
            break
        token, cache = sampler.decode(token, cache, i)
        new.append(np.asarray(token))
        if decode_start is None:  # the first step compiles: time from the second on
            decode_start = time.perf_counter()
        else:
            timed_steps += 1
    decode_seconds = time.perf_counter() - decode_start if decode_start is not None else 0.0

    rows = [[int(t) for t in column] for column in np.stack(new, axis=1)]
    if stream is not None:
        _show(out, stream.push([], final=True) + "\n")
    else:
        for i, (prompt, ids) in enumerate(zip(prompts, rows)):
            text = TextStream(tokenizer, encoded[i]).text(_until_eos(ids, eos))
            out.write(("-" * 40 + "\n" if i else "") + (prompt if args.echo else "") + text + "\n")
    out.flush()

    real = int(mask.sum())
    err.write(f"prefill: {batch} prompt(s), {real:,} tokens in {prefill_seconds:.3f} s "
              f"({real / max(prefill_seconds, 1e-9):,.0f} tokens/s; compiled in {sampler.compile_seconds:.1f} s"
              f"{f'; in chunks of {chunk:,}' if chunk and tokens.shape[1] > chunk else ''})\n")
    if timed_steps:
        err.write(f"decode: {batch} x {timed_steps} tokens in {decode_seconds:.3f} s "
                  f"({batch * timed_steps / decode_seconds:,.0f} tokens/s, {1e3 * decode_seconds / timed_steps:.2f} ms "
                  f"per step; the first step, which compiles, not counted)\n")
    else:
        err.write(f"decode: {len(new) - 1} step(s), too few to time (the first step compiles)\n")
    err.flush()
    return rows


def main(argv: list[str] | None = None, *, out=sys.stdout, err=sys.stderr) -> int:
    """Runs the command line `argv` (default sys.argv[1:]); returns the exit status."""
    config_args, rest = split_config_args(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(rest)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=err)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every restore at INFO
    from lightning_jax.checks import ArgumentError
    from lightning_jax.training.data import DataError

    try:
        check_arguments(args)
        prompts = read_prompts(args)
        model, tokenizer = load(args, config_args)
        from lightning_jax.generation import decoding_model

        # Convert here (not in Sampler), so that the scanned weights are freed before sampling.
        model = decoding_model(model)
        sample(model, tokenizer, prompts, args, out=out, err=err)
    except (UsageError, ArgumentError, DataError) as e:
        err.write(f"error: {_one_line(e)}\n")
        err.flush()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
