"""The ~125M TNL of the GPU comparison (docs/comparison.md): 16 layers, D 768, 6 heads of 128, SGLU
2112 (TNL-385M's 2.75 x D), byte vocab, 125,240,832 parameters. train/configs/compare_125m_transformer.py
is the Transformer of the same parameter count, trained on the same data, in the same order, for the
same steps with the same optimizer.

    python benchmarks/prepare_comparison_corpus.py        # the corpus, runs/comparison_corpus
    python benchmarks/compare_models.py --seeds 1 --out runs/compare_125m \\
        --model TNL=train/configs/compare_125m_tnl.py --model Transformer=train/configs/compare_125m_transformer.py

1,500 steps of 32 x 2,048 bytes (98.3M tokens, 0.37 of an epoch of the 262M-token training split),
sized for about 5 minutes per model on one H200. TNL-385M has no published smaller sibling; this is
its layout (heads of 128, LRPE on layer 0, the released decay schedule) at GPT-2-small width, with
16 layers instead of 12 because the byte vocab leaves almost no parameters in the embedding. On a
CPU, override the kernel: --config.model.attention_implementation=xla.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.steps = 1500
    config.workdir = "runs/compare_125m_tnl"
    config.seed = 0
    config.init_from = ""

    # TNLConfig.tnl_385m() with these fields replaced. attention_implementation "pallas": the Triton
    # kernels (the GPU default, named so that the run says which kernel it measured).
    config.model = ConfigDict(dict(
        arch="tnl", preset="tnl_385m", vocab_size=257, num_layers=16, hidden_dim=768, num_heads=6,
        head_dim=128, glu_dim=2112, dtype="bfloat16", param_dtype="float32", scan_layers=True, remat="dots",
        attention_implementation="pallas",
    ))
    # The pre-tokenized byte corpus of benchmarks/prepare_comparison_corpus.py (relative to the repo root).
    config.data = ConfigDict(dict(corpus="runs/comparison_corpus", tokenizer="byte", seq_len=2048, batch_size=32))
    config.optim = ConfigDict(dict(
        lr=6e-4, min_lr_ratio=0.1, warmup_steps=150, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0, grad_accum_steps=1,
        loss_block_tokens=4096,  # cross-entropy in blocks of tokens: no [tokens, vocab] logits
        time_chunk_tokens=0,
    ))
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    config.checkpoint = ConfigDict(dict(enabled=False, every_steps=1000, keep=1, async_save=True))
    # max_tokens -1: the whole held-out split (3.04M tokens, ~1 % of the documents), every 250 steps.
    config.eval = ConfigDict(dict(every_steps=250, max_tokens=-1, batch_size=0, pmap=False))
    config.log = ConfigDict(dict(every_steps=50, progress_bar=False, tensorboard=False, peak_tflops_per_device=0.0))
    return config
