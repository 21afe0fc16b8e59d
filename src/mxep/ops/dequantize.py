"""``torch.ops.mxep.dequantize_mxfp8``: MXFP8 -> bf16 as a registered torch.library op.

The one-pass Triton kernel of :mod:`mxep.kernels.dequantize` on CUDA (and on CPU under
``TRITON_INTERPRET=1``), else the torch expression :func:`mxep.format.mxfp8.dequantize_mxfp8`;
bit-identical either way. Registered with a fake implementation, so torch.compile keeps it as
one opaque node. ``MXFP8Tensor.dequantize()`` (bf16, CUDA) and the grouped GEMM's default path
call it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from mxep.format.mxfp8 import BLOCK_SIZE, dequantize_mxfp8

__all__ = ["dequantize_mxfp8_op"]


@torch.library.custom_op("mxep::dequantize_mxfp8", mutates_args=())
def dequantize_mxfp8_op(qdata: torch.Tensor, scale: torch.Tensor, row_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qdata`` float8_e4m3fn ``[..., K]`` and ``scale`` float8_e8m0fnu ``[..., K // 32]``
    (contiguous) -> bf16 ``[..., K]``. With ``row_end`` (int32 ``[1]`` on the same device, e.g.
    ``group_end_offsets[-1:]`` of a dispatch layout), rows of the flattened ``[R, K]`` view at or
    past it are left unspecified (the kernel skips them on the device: no host sync)."""
    from mxep.kernels.dequantize import dequantize_mxfp8_rows
    from mxep.kernels.quantize import triton_available_for

    if not triton_available_for(qdata) or qdata.numel() == 0:
        return dequantize_mxfp8(qdata, scale, torch.bfloat16)
    K = qdata.shape[-1]
    R = math.prod(qdata.shape[:-1])
    out = dequantize_mxfp8_rows(qdata.reshape(R, K), scale.reshape(R, K // BLOCK_SIZE), row_end)
    return out.view(qdata.shape)


@dequantize_mxfp8_op.register_fake
def _(qdata: torch.Tensor, scale: torch.Tensor, row_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    return qdata.new_empty(qdata.shape, dtype=torch.bfloat16)
