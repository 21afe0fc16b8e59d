"""SwiGLU + MXFP8 quantization on the dispatch layout (public op, autograd); the kernels are in
:mod:`mxep.kernels.swiglu`, the reference in :mod:`mxep.reference.swiglu`."""
from __future__ import annotations

import torch

from mxep.format.mxfp8 import MXFP8Tensor, check_scale_mode
from mxep.kernels.quantize import use_hw_cast
from mxep.kernels.swiglu import swiglu_backward, swiglu_quantize_forward

__all__ = ["swiglu_mxfp8", "SwiGLUQuantizeFunction"]


class SwiGLUQuantizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, group_end_offsets: torch.Tensor, scale_mode: str) -> MXFP8Tensor:
        ctx.save_for_backward(h, group_end_offsets)
        q, s = swiglu_quantize_forward(h, group_end_offsets, scale_mode, hw_cast=use_hw_cast(h))
        return MXFP8Tensor(q, s, torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_a):
        h, offs = ctx.saved_tensors
        return swiglu_backward(h, grad_a.to(torch.bfloat16), offs), None, None


def swiglu_mxfp8(h: torch.Tensor, group_end_offsets: torch.Tensor, scale_mode: str = "rceil") -> MXFP8Tensor:
    """``silu(h[:, :F]) * h[:, F:]`` quantized to MXFP8, for the rows of the dispatch layout.

    Args:
        h: bf16 ``[cap, 2F]``, gate columns then up columns (the first expert GEMM's output),
            ``F % 32 == 0``.
        group_end_offsets: int32 ``[L]``: rows ``[0, group_end_offsets[-1])`` are computed, later
            rows are left unwritten (and their gradient too): no work for the unused capacity.
        scale_mode: ``"rceil"`` or ``"floor"``.

    Returns:
        :class:`~mxep.MXFP8Tensor` ``[cap, F]`` (e4m3 + e8m0 per 32 along F). Differentiable
        w.r.t. ``h``: straight-through for the quantization, bf16 SwiGLU backward.

    Example::

        >>> import torch, mxep
        >>> from mxep.ops.swiglu import swiglu_mxfp8
        >>> h = torch.randn(64, 128, dtype=torch.bfloat16)
        >>> a = swiglu_mxfp8(h, torch.tensor([32, 64], dtype=torch.int32))
        >>> a.shape, a.qdata.dtype
        (torch.Size([64, 64]), torch.float8_e4m3fn)
    """
    if h.dtype != torch.bfloat16 or h.dim() != 2 or h.shape[1] % 64:
        raise ValueError(f"h must be bf16 [cap, 2F] with F a multiple of 32, got {h.dtype} {tuple(h.shape)}")
    if group_end_offsets.dtype != torch.int32 or group_end_offsets.dim() != 1:
        raise ValueError(f"group_end_offsets must be int32 [L], got {group_end_offsets.dtype} "
                         f"{tuple(group_end_offsets.shape)}")
    check_scale_mode(scale_mode)
    return SwiGLUQuantizeFunction.apply(h.contiguous(), group_end_offsets, scale_mode)
