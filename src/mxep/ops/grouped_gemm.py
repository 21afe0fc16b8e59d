"""Grouped GEMM that consumes the dispatch layout directly (public op, autograd).

Forward, two implementations of the same math (MX numerics on bf16 tensor cores, fp32
accumulation; Hopper has no MX MMA): ``"dequant"`` (default) dequantizes the rows up to the last
group end in one Triton pass (:mod:`mxep.kernels.dequantize`) and runs ``torch._grouped_mm``;
``"fused"`` is the Triton kernel of :mod:`mxep.kernels.grouped_gemm`, which dequantizes each
tile in registers (no bf16 copy of the tokens). Backward, in bf16 like the dispatch's
(``torch._grouped_mm`` with the same device-side group ends: no host sync):
``grad_tokens = dy @ W[e]`` per group (straight-through for the tokens' quantization, as
``MXFP8Tensor.dequantize``) and ``grad_W[e] = dy[group]^T @ dequant(tokens[group])``. Only rows
below ``group_end_offsets[-1]`` are read; pad rows hold zeros, so they add nothing.
"""
from __future__ import annotations

import torch

from mxep.format.mxfp8 import MXFP8Tensor
from mxep.kernels.grouped_gemm import grouped_mm_mxfp8_forward
from mxep.kernels.quantize import triton_available_for
from mxep.ops.dequantize import dequantize_mxfp8_op

__all__ = ["grouped_mm_mxfp8", "GroupedMXFP8MatmulFunction"]


IMPLS = ("auto", "dequant", "fused")


def _resolve_impl(impl: str, tokens: MXFP8Tensor, N: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "fused" and not triton_available_for(tokens.qdata):
        raise RuntimeError("grouped_mm_mxfp8(impl='fused') runs a Triton kernel: it needs CUDA tensors, or "
                           "TRITON_INTERPRET=1 on CPU; impl='dequant' works anywhere")
    if impl != "auto":
        return impl
    # torch._grouped_mm wants 16-byte strides (K, N multiples of 8) and, on CUDA, sm_90+.
    ok = tokens.shape[1] % 8 == 0 and N % 8 == 0
    if tokens.is_cuda:
        ok = ok and torch.cuda.get_device_capability(tokens.device) >= (9, 0)
    return "dequant" if ok else "fused"


def _dequantize(qdata: torch.Tensor, scale: torch.Tensor, row_end: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 of MXFP8 rows ``[..., K]``: the one-pass kernel (stopping at ``row_end``) where Triton
    runs, else the torch expression (a CPU without the interpreter)."""
    return dequantize_mxfp8_op(qdata.contiguous(), scale.contiguous(), row_end)


def _forward_dequant(tokens: MXFP8Tensor, weight, group_end_offsets: torch.Tensor) -> torch.Tensor:
    """Dequantize the layout's rows (one Triton pass, stopping at the last group end), then bf16
    tensor cores through ``torch._grouped_mm`` on the same device-side offsets."""
    x = _dequantize(tokens.qdata, tokens.scale, group_end_offsets[-1:])
    if isinstance(weight, MXFP8Tensor):
        weight = _dequantize(weight.qdata, weight.scale)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=group_end_offsets)


class GroupedMXFP8MatmulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor, impl: str):
        if isinstance(weight, MXFP8Tensor):   # MX weights: dequantized like the tokens
            ctx.save_for_backward(tokens.qdata, tokens.scale, group_end_offsets, weight.qdata, weight.scale)
        else:
            ctx.save_for_backward(tokens.qdata, tokens.scale, group_end_offsets, weight)
        if impl == "dequant":
            return _forward_dequant(tokens, weight, group_end_offsets)
        if isinstance(weight, MXFP8Tensor):
            return grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, weight.qdata, group_end_offsets,
                                            weight_scale=weight.scale)
        return grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, weight, group_end_offsets)

    @staticmethod
    def backward(ctx, grad_out):
        qdata, scale, offs, *w = ctx.saved_tensors
        weight = w[0] if len(w) == 1 else _dequantize(w[0], w[1])
        grad_out = grad_out.to(torch.bfloat16).contiguous()
        grad_tokens = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_tokens = torch._grouped_mm(grad_out, weight, offs=offs)                  # [cap, K]
        if ctx.needs_input_grad[1]:
            x = _dequantize(qdata, scale, offs[-1:])
            grad_weight = torch._grouped_mm(grad_out.t(), x, offs=offs)                   # [L, N, K] bf16
        return grad_tokens, grad_weight, None, None


def grouped_mm_mxfp8(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    """``out[r] = dequant(tokens[r]) @ weight[e]^T`` for every row ``r`` of expert ``e``'s group.

    Args:
        tokens: :class:`~mxep.MXFP8Tensor` ``[cap, K]`` in the dispatch layout (``DispatchResult.tokens``):
            e4m3 ``qdata [cap, K]``, e8m0 ``scale [cap, K / 32]``, groups in order, any padding.
        weight: bf16 ``[L, N, K]``, one ``[N, K]`` matrix per local expert (``L = E // world``), or an
            :class:`~mxep.MXFP8Tensor` of it (blocks of 32 along K, e.g. ``mxep.to_mxfp8(w)``): the
            MX GEMM's numerics for both operands; its gradient is returned in bf16 (straight-through).
        group_end_offsets: int32 ``[L]`` on the tokens' device (``DispatchResult.group_end_offsets``);
            group ``e`` is rows ``[end[e-1], end[e])``.
        impl: ``"dequant"``: one Triton pass dequantizes the rows up to the last group end into
            a transient bf16 ``[cap, K]`` copy, then ``torch._grouped_mm`` (bf16 tensor cores);
            the fastest on H200 (docs/benchmarks.md). ``"fused"``: the Triton grouped GEMM
            dequantizes each tile in registers: no bf16 copy of the tokens (saves ``2 cap K``
            bytes of transient memory), slower. ``"auto"`` (default): ``"dequant"`` where
            ``torch._grouped_mm`` takes the shapes (K and N multiples of 8, sm_90+), else ``"fused"``.

    Returns:
        bf16 ``[cap, N]``; rows ``[0, group_end_offsets[-1])`` hold the products (pad rows 0), later
        rows are unspecified (never computed). Differentiable w.r.t. ``tokens`` (bf16, straight-through) and
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
    return GroupedMXFP8MatmulFunction.apply(tokens, weight, group_end_offsets, _resolve_impl(impl, tokens, N))
