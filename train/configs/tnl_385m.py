"""TNL-385M (24 layers, D 1024, 8 heads of 128, vocab 64000) on GPUs, context 2048.

    python train/main.py --config train/configs/tnl_385m.py --config.data.corpus=/data/fineweb_tok

The default corpus is the shipped Shakespeare with the byte tokenizer (so the config runs anywhere);
for a real run point data.corpus at a pre-tokenized directory (docs/training.md). data.batch_size is
global: 64 x 2048 = 128K tokens per step; raise optim.grad_accum_steps if it does not fit.
"""

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.steps = 100_000
    config.workdir = "runs/tnl_385m"
    config.seed = 0
    # A TransNormerLLM checkpoint directory to start from (docs/checkpoints.md); "" starts from random
    # weights. Its config.json then fixes the architecture (the model fields below are ignored, except
    # dtype, param_dtype, scan_layers, remat, attention_implementation and block_size).
    config.init_from = ""

    # placeholder(T): None by default, and still settable from the command line
    # (--config.model.block_size=128); ml_collections refuses to override a plain None.
    config.model = ConfigDict(dict(
        arch="tnl", preset="tnl_385m", vocab_size=64000, dtype="bfloat16", param_dtype="float32",
        scan_layers=True, remat="dots", attention_implementation=placeholder(str), block_size=placeholder(int),
    ))
    config.data = ConfigDict(dict(corpus="shakespeare", tokenizer="byte", seq_len=2048, batch_size=64))
    config.optim = ConfigDict(dict(
        lr=3e-4, min_lr_ratio=0.1, warmup_steps=2000, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0, grad_accum_steps=1,
        loss_block_tokens=4096,  # cross-entropy in blocks of tokens: no [tokens, vocab] logits
        time_chunk_tokens=0,  # > 0: longer sequences go through the model this many tokens at a time
    ))
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    config.checkpoint = ConfigDict(dict(enabled=True, every_steps=1000, keep=3, async_save=True))
    config.eval = ConfigDict(dict(every_steps=1000, max_tokens=4 * 1024 * 1024, batch_size=0, pmap=False))
    config.log = ConfigDict(dict(every_steps=50, progress_bar=True, tensorboard=False, peak_tflops_per_device=0.0))
    return config
