"""Grouped GEMM that consumes the dispatch layout directly (public op, autograd).

Forward: the Triton kernel of :mod:`mxep.kernels.grouped_gemm` (MXFP8 tokens dequantized in
registers, bf16 tensor cores, fp32 accumulation). Backward, in bf16 like the dispatch's
(``torch._grouped_mm`` with the same device-side group ends: no host sync):
``grad_tokens = dy @ W[e]`` per group (straight-through for the tokens' quantization, as
``MXFP8Tensor.dequantize``) and ``grad_W[e] = dy[group]^T @ dequant(tokens[group])``. Only rows
below ``group_end_offsets[-1]`` are read; pad rows hold zeros, so they add nothing.
"""
from __future__ import annotations

import torch

from mxep.format.mxfp8 import MXFP8Tensor, dequantize_mxfp8
from mxep.kernels.grouped_gemm import grouped_mm_mxfp8_forward

__all__ = ["grouped_mm_mxfp8", "GroupedMXFP8MatmulFunction"]


class GroupedMXFP8MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor):
        if isinstance(weight, MXFP8Tensor):   # MX weights: dequantized in registers too
            ctx.save_for_backward(tokens.qdata, tokens.scale, group_end_offsets, weight.qdata, weight.scale)
            return grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, weight.qdata, group_end_offsets,
                                            weight_scale=weight.scale)
        ctx.save_for_backward(tokens.qdata, tokens.scale, group_end_offsets, weight)
        return grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, weight, group_end_offsets)

    @staticmethod
    def backward(ctx, grad_out):
        qdata, scale, offs, *w = ctx.saved_tensors
        weight = w[0] if len(w) == 1 else dequantize_mxfp8(w[0], w[1], torch.bfloat16)
        grad_out = grad_out.to(torch.bfloat16).contiguous()
        grad_tokens = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_tokens = torch._grouped_mm(grad_out, weight, offs=offs)                  # [cap, K]
        if ctx.needs_input_grad[1]:
            x = dequantize_mxfp8(qdata, scale, torch.bfloat16)
            grad_weight = torch._grouped_mm(grad_out.t(), x, offs=offs)                   # [L, N, K] bf16
        return grad_tokens, grad_weight, None


def grouped_mm_mxfp8(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor) -> torch.Tensor:
    """``out[r] = dequant(tokens[r]) @ weight[e]^T`` for every row ``r`` of expert ``e``'s group.

    Args:
        tokens: :class:`~mxep.MXFP8Tensor` ``[cap, K]`` in the dispatch layout (``DispatchResult.tokens``):
            e4m3 ``qdata [cap, K]``, e8m0 ``scale [cap, K / 32]``, groups in order, any padding.
        weight: bf16 ``[L, N, K]``, one ``[N, K]`` matrix per local expert (``L = E // world``), or an
            :class:`~mxep.MXFP8Tensor` of it (blocks of 32 along K, e.g. ``mxep.to_mxfp8(w)``): the
            MX GEMM's numerics for both operands; its gradient is returned in bf16 (straight-through).
        group_end_offsets: int32 ``[L]`` on the tokens' device (``DispatchResult.group_end_offsets``);
            group ``e`` is rows ``[end[e-1], end[e])``. Tiles are cut per group, so no tile mixes experts.

    Returns:
        bf16 ``[cap, N]``; rows ``[0, group_end_offsets[-1])`` hold the products (pad rows 0), later
        rows are left unwritten. Differentiable w.r.t. ``tokens`` (bf16, straight-through) and
        ``weight``. No host sync.

    Example::

        >>> import torch, mxep
        >>> x = torch.randn(64, 96).bfloat16()
        >>> tokens, offs = mxep.to_mxfp8(x), torch.tensor([32, 64], dtype=torch.int32)   # 2 experts
        >>> w = torch.randn(2, 40, 96).bfloat16()
        >>> mxep.grouped_mm_mxfp8(tokens, w, offs).shape
        torch.Size([64, 40])
    """
    if not isinstance(tokens, MXFP8Tensor):
        raise TypeError(f"tokens must be an MXFP8Tensor (DispatchResult.tokens), got {type(tokens).__name__}")
    if weight.dtype != torch.bfloat16:
        raise TypeError(f"weight must be bfloat16 (or an MXFP8Tensor of bf16), got {weight.dtype}")
    if tokens.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"tokens must be [cap, K] and weight [L, N, K], got {tuple(tokens.shape)} and "
                         f"{tuple(weight.shape)}")
    cap, K = tokens.shape
    L, N, Kw = weight.shape
    if Kw != K:
        raise ValueError(f"weight's last dim {Kw} must equal the tokens' hidden size {K}")
    if group_end_offsets.dtype != torch.int32 or tuple(group_end_offsets.shape) != (L,):
        raise ValueError(f"group_end_offsets must be int32 [{L}] (one end per weight matrix), got "
                         f"{group_end_offsets.dtype} {tuple(group_end_offsets.shape)}")
    if weight.device != tokens.device or group_end_offsets.device != tokens.device:
        raise ValueError("tokens, weight and group_end_offsets must be on one device")
    if not isinstance(weight, MXFP8Tensor):
        weight = weight.contiguous()
    return GroupedMXFP8MatmulFunction.apply(tokens, weight, group_end_offsets)
