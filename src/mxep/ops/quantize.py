"""``torch.ops.mxep.quantize_mxfp8``: MXFP8 quantization as a registered torch.library op.

Registering it (with a fake implementation giving output shapes and dtypes) lets torch.compile
and other tracing keep the kernel as one opaque node instead of tracing into Triton launches.
:func:`mxep.to_mxfp8` is the public front door; it calls this op and wraps the result.
"""
from __future__ import annotations

import math

import torch

from mxep.format.mxfp8 import BLOCK_SIZE

__all__ = ["quantize_mxfp8"]


@torch.library.custom_op("mxep::quantize_mxfp8", mutates_args=())
def quantize_mxfp8(x: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` bf16/fp32 ``[..., K]`` (contiguous, ``K % 32 == 0``) -> ``(qdata float8_e4m3fn [..., K],
    scale float8_e8m0fnu [..., K // 32])``. The Triton kernel on CUDA (and on CPU under
    ``TRITON_INTERPRET=1``), else the pure-torch reference; bit-identical either way."""
    from mxep.kernels.quantize import mxfp8_quantize, triton_available_for

    if triton_available_for(x):
        # Not reshape(-1, K): that is ambiguous (an error) when K == 0.
        q, s = mxfp8_quantize(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), scale_mode)
        return q.view(x.shape), s.view(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)
    from mxep.reference.mxfp8 import to_mxfp8_reference

    return to_mxfp8_reference(x, scale_mode)


@quantize_mxfp8.register_fake
def _(x: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    q = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    s = x.new_empty((*x.shape[:-1], x.shape[-1] // BLOCK_SIZE), dtype=torch.float8_e8m0fnu)
    return q, s
