"""TNL-385M on sequences of 1,048,576 tokens: each sequence runs through the model 32,768 tokens at a time.

    python train/main.py --config train/configs/tnl_385m_1m.py --config.data.corpus=/data/long_docs_tok

optim.time_chunk_tokens = 32768 carries every layer's state from chunk to chunk
(lightning_jax/training/chunked.py), so activation memory follows the chunk, not the sequence: on
one H200 this config peaks at 42 GiB at 1M tokens and 43 GiB at 4M, at the tokens/s of 2,048-token
training (docs/benchmarks.md). The chunk is the unit of recomputation, so the layers keep their
activations inside it (remat "none") and are unrolled (scan_layers False: a scanned stack copies
them into per-layer buffers, 30 % slower here). Longer sequences: raise data.seq_len; memory stays
flat. One sequence per GPU per step: data.batch_size is the number of GPUs divided by mesh.context
(--config.mesh.context=2 splits each sequence over two GPUs, chunk by chunk).
"""

import os
import runpy

from ml_collections import ConfigDict

# Config files are loaded by path, not as a package: read the base config the same way.
_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tnl_385m.py")


def get_config() -> ConfigDict:
    config = runpy.run_path(_BASE)["get_config"]()
    config.workdir = "runs/tnl_385m_1m"
    config.model.scan_layers = False
    config.model.remat = "none"
    config.data.seq_len = 1048576
    config.data.batch_size = 1
    config.optim.time_chunk_tokens = 32768
    config.eval.batch_size = 1
    return config
