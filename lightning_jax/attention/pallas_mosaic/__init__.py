"""Lightning attention as Pallas Mosaic GPU kernels (Hopper: TMA, wgmma, warp specialisation).

    config.py    MosaicConfig (the knobs), launch_plan (pieces, rows per program from the shape),
                 choose_backward (the Mosaic or the Triton backward), dkdv_plan and
                 choose_fused_dkdv (the fused dK/dV sweep's launch and whether to run it)
    kernels.py   the kernels: one warpgroup or three (memory, state, output), pieces, rows; the
                 forward, its chunk states, and the backward as sweeps of the same kernels
    dkdv.py      the backward's dK and dV in one reverse sweep (q, k, v, dO read once)
    op.py        lightning_attention_mosaic: the forward in a custom_vjp whose gradients come from
                 the Mosaic backward or the Pallas-Triton one (MosaicConfig.backward)

Importing this package is light: the Mosaic GPU lowering code loads with `forward` and `op`.
"""

from lightning_jax.attention.pallas_mosaic.config import MosaicConfig, choose_backward, launch_plan


def __getattr__(name):
    # The entry point and the kernels pull in Pallas' Mosaic GPU lowering; load them on first use only.
    if name == "lightning_attention_mosaic":
        from lightning_jax.attention.pallas_mosaic import op

        return op.lightning_attention_mosaic
    if name in ("forward", "backward", "decay_tables"):
        from lightning_jax.attention.pallas_mosaic import kernels

        return getattr(kernels, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MosaicConfig", "backward", "choose_backward", "decay_tables", "forward", "launch_plan",
           "lightning_attention_mosaic"]
