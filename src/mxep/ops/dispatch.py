"""Autograd Functions over :class:`mxep.Buffer`'s raw ops.

* dispatch: forward quantizes to MXFP8 and moves rows into the expert-major padded layout; the
  backward moves the bf16 gradient back along the same routes (a combine): high precision,
  straight-through for the quantization, pad rows dropped.
* combine: forward moves rows back to their sources; the backward moves the bf16 gradient into
  the dispatch layout (a bf16 dispatch), pad rows zero.
"""
from __future__ import annotations

import torch

__all__ = ["MXFP8DispatchFunction", "CombineFunction", "a2a_dispatch_and_group_mxfp8_fwd_hp_bwd"]


class MXFP8DispatchFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle, zero_copy=False):
        ctx.buffer, ctx.handle = buffer, handle
        return buffer.dispatch_mxfp8_raw(x, handle, zero_copy)

    @staticmethod
    def backward(ctx, grad_tokens):
        # (the backward never reads the tokens: a zero-copy dispatch's may be gone by now)
        if grad_tokens is None:
            return None, None, None, None
        grad_x = ctx.buffer.combine_raw(grad_tokens.to(torch.bfloat16), ctx.handle)
        return grad_x, None, None, None


class CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, expert_out, buffer, handle):
        ctx.buffer, ctx.handle = buffer, handle
        return buffer.combine_raw(expert_out, handle)

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None, None
        return ctx.buffer.dispatch_bf16_raw(grad_y.to(torch.bfloat16), ctx.handle), None, None


def a2a_dispatch_and_group_mxfp8_fwd_hp_bwd(x: torch.Tensor, num_tokens_per_expert: torch.Tensor, buffer):
    """Functional alias of :meth:`mxep.Buffer.dispatch` (MXFP8 forward, high-precision backward).

    Args:
        x: bf16 ``[n, H]`` rows sorted by global expert id.
        num_tokens_per_expert: int32/int64 ``[E]`` on ``x``'s device.
        buffer: the :class:`mxep.Buffer` of the EP group.

    Returns:
        :class:`mxep.DispatchResult` ``(tokens, group_end_offsets, tokens_per_expert, handle)``.
    """
    return buffer.dispatch(x, num_tokens_per_expert)
