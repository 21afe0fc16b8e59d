"""Expert parallelism: the Buffer (dispatch / combine with autograd), its config, the layout and
the transports; ``naive`` (layout oracle) and ``naive_pipeline`` (the unfused flow) are the
references beside it."""
from mxep.ep.buffer import Buffer, DispatchHandle, DispatchResult, a2a_dispatch_and_group_mxfp8_fwd_hp_bwd
from mxep.ep.config import EPConfig, KernelTiles, default_config

__all__ = ["Buffer", "DispatchHandle", "DispatchResult", "EPConfig", "KernelTiles", "default_config",
           "a2a_dispatch_and_group_mxfp8_fwd_hp_bwd"]
