"""mxep: fused MXFP8 expert-parallel dispatch/combine for Mixture-of-Experts training.

Public API::

    mxep.to_mxfp8(x, scale_mode="rceil") -> MXFP8Tensor        # format
    mxep.Buffer(group, num_experts, hidden, max_tokens_per_rank, align=None, scale_mode="rceil",
                config=mxep.EPConfig(), scale_layout="auto")    # "blocked": sm_100's scale tiles
    buf.dispatch(x, num_tokens_per_expert) -> DispatchResult   # fused MXFP8 dispatch, bf16 backward
    buf.combine(expert_out, handle) -> [n, H] bf16
    mxep.a2a_dispatch_and_group_mxfp8_fwd_hp_bwd(x, num_tokens_per_expert, buf)
    mxep.grouped_mm_mxfp8(tokens, weight, group_end_offsets) -> [cap, N] bf16   # experts on the layout
    mxep.MoE(hidden, ffn_hidden, num_experts, top_k, max_tokens_per_rank)      # the whole layer

Packages: ``format`` (MXFP8), ``gemm``, ``swiglu``, ``ep`` (Buffer, config, layout, transports),
``moe``; each has its pure-torch reference in ``naive``.
"""
from mxep.ep import (Buffer, DispatchHandle, DispatchResult, EPConfig, KernelTiles,
                     a2a_dispatch_and_group_mxfp8_fwd_hp_bwd, default_config)
from mxep.format import MXFP8Tensor, dequantize_mxfp8, to_mxfp8
from mxep.gemm import grouped_mm_mxfp8
from mxep.moe import MoE

__all__ = [
    "Buffer",
    "DispatchHandle",
    "DispatchResult",
    "EPConfig",
    "KernelTiles",
    "MoE",
    "MXFP8Tensor",
    "a2a_dispatch_and_group_mxfp8_fwd_hp_bwd",
    "default_config",
    "dequantize_mxfp8",
    "grouped_mm_mxfp8",
    "to_mxfp8",
]
__version__ = "0.1.0"
