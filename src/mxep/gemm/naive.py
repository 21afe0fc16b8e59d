"""Pure-torch reference of the grouped GEMM over the dispatch layout (tests and benchmarks).

Dequantize the MXFP8 rows (``mxep.format.naive.dequantize_mxfp8_reference``, bf16), then per expert
``out[start:end] = x[start:end] @ W[e]^T`` in fp32, rounded to bf16. Reads the group ends on the
host (a reference may sync).
"""
from __future__ import annotations

import torch

from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.naive import dequantize_mxfp8_reference

__all__ = ["grouped_mm_reference"]


def grouped_mm_reference(qdata: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                         group_end_offsets: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn ``[cap, K]``, float8_e8m0fnu ``[cap, K/32]``, bf16 ``[L, N, K]`` (or an
    MXFP8Tensor of it), int32 ``[L]``
    -> bf16 ``[R, N]`` with ``R = group_end_offsets[-1]`` (the rows the layout holds)."""
    x = dequantize_mxfp8_reference(qdata, scale, torch.bfloat16).float()
    if isinstance(weight, MXFP8Tensor):
        weight = dequantize_mxfp8_reference(weight.qdata, weight.scale, torch.bfloat16)
    ends = [int(e) for e in group_end_offsets.tolist()]
    out = torch.zeros(ends[-1] if ends else 0, weight.shape[1], dtype=torch.float32, device=qdata.device)
    start = 0
    for e, end in enumerate(ends):
        out[start:end] = x[start:end] @ weight[e].float().t()
        start = end
    return out.to(torch.bfloat16)
