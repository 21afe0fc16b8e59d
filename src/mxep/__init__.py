"""mxep: fused MXFP8 expert-parallel dispatch/combine for Mixture-of-Experts training.

Public API::

    mxep.to_mxfp8(x, scale_mode="rceil") -> MXFP8Tensor        # format
    mxep.Buffer(group, num_experts, hidden, max_tokens_per_rank, align=32, scale_mode="rceil")
    buf.dispatch(x, num_tokens_per_expert) -> DispatchResult   # fused MXFP8 dispatch, bf16 backward
    buf.combine(expert_out, handle) -> [n, H] bf16
    mxep.a2a_dispatch_and_group_mxfp8_fwd_hp_bwd(x, num_tokens_per_expert, buf)
    mxep.grouped_mm_mxfp8(tokens, weight, group_end_offsets) -> [cap, N] bf16   # experts on the layout
    mxep.MoE(hidden, ffn_hidden, num_experts, top_k, max_tokens_per_rank)      # the whole layer
"""
from mxep.comm.buffer import Buffer, DispatchHandle, DispatchResult
from mxep.format import MXFP8Tensor, dequantize_mxfp8, to_mxfp8
from mxep.ops.dispatch import a2a_dispatch_and_group_mxfp8_fwd_hp_bwd
from mxep.moe import MoE
from mxep.ops.grouped_gemm import grouped_mm_mxfp8

__all__ = [
    "Buffer",
    "DispatchHandle",
    "DispatchResult",
    "MoE",
    "MXFP8Tensor",
    "a2a_dispatch_and_group_mxfp8_fwd_hp_bwd",
    "dequantize_mxfp8",
    "grouped_mm_mxfp8",
    "to_mxfp8",
]
__version__ = "0.1.0"
