"""Demo: a tiny TNL (3 layers, D 64, 8 heads of 8) learning byte-level Shakespeare on a laptop CPU in a
few minutes. train/configs/demo_transformer.py is the Transformer of the same parameter count.

    python train/main.py --config train/configs/demo.py
    python train/main.py --config train/configs/demo.py --config.steps=100 --config.optim.lr=3e-3
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.steps = 500
    config.workdir = "runs/demo"
    config.seed = 0
    # A TransNormerLLM checkpoint directory to start from (docs/checkpoints.md); "" starts from random
    # weights. Its config.json then fixes the architecture (the model fields below are ignored, except
    # dtype, param_dtype, scan_layers, remat, attention_implementation and block_size).
    config.init_from = ""

    # TNLConfig.tiny() with these fields replaced (any TNLConfig field may be listed here). 8 heads of 8,
    # not the preset's 4 of 16: 0.025 nats per byte lower validation loss at step 500 (mean of seeds
    # 0-2; 2 heads of 32 were 0.036 worse), the parameter count unchanged (docs/comparison.md).
    config.model = ConfigDict(dict(
        arch="tnl", preset="tiny", vocab_size=257, num_layers=3, hidden_dim=64, num_heads=8, glu_dim=128,
        dtype="float32", param_dtype="float32", scan_layers=False, remat="none",
    ))
    config.data = ConfigDict(dict(corpus="shakespeare", tokenizer="byte", seq_len=256, batch_size=16))
    # lr 6e-3: the best of 1.5e-3, 3e-3, 6e-3 and 1.2e-2 for this TNL (6e-3 and 1.2e-2 within noise
    # of each other, 3e-3 0.05 worse); the demo Transformer's best is 3e-3 (docs/comparison.md).
    config.optim = ConfigDict(dict(
        lr=6e-3, min_lr_ratio=0.1, warmup_steps=30, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
        clip_norm=1.0, grad_accum_steps=1,
        loss_block_tokens=4096,  # cross-entropy in blocks of tokens: no [tokens, vocab] logits
        time_chunk_tokens=0,  # > 0: longer sequences go through the model this many tokens at a time
    ))
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    config.checkpoint = ConfigDict(dict(enabled=True, every_steps=100, keep=3, async_save=True))
    # max_tokens=0: the whole held-out split (Macbeth and The Tempest, 201,867 bytes), so the eval loss
    # does not depend on which part was read; larger splits are cut at 1,048,576 tokens (-1: never).
    config.eval = ConfigDict(dict(every_steps=100, max_tokens=0, batch_size=0, pmap=False))
    config.log = ConfigDict(dict(every_steps=10, progress_bar=True, tensorboard=False, peak_tflops_per_device=0.0))
    return config
