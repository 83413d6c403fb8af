"""TNL-385M at context 65536: lightning attention's cost per token does not grow with the context.

Same tokens per step as tnl_385m.py (2 x 64K = 128K) when data.batch_size is 2; each GPU holds
whole sequences, so data.batch_size must be a multiple of the GPU count (override it:
--config.data.batch_size=8 on 8 GPUs). Full rematerialisation: activations of 64K tokens per
sequence are the memory limit here (the loss never holds the [tokens, vocab] logits: it runs in
blocks of optim.loss_block_tokens), so keep one sequence per GPU per microbatch
(optim.grad_accum_steps).
"""

import os
import runpy

from ml_collections import ConfigDict

# Config files are loaded by path, not as a package: read the base config the same way.
_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tnl_385m.py")


def get_config() -> ConfigDict:
    config = runpy.run_path(_BASE)["get_config"]()
    config.workdir = "runs/tnl_385m_64k"
    config.model.remat = "full"
    config.data.seq_len = 65536
    config.data.batch_size = 2
    config.optim.grad_accum_steps = 2
    return config
