"""Dense single-process reference of :class:`mxep.MoE` (tests): every (token, expert) pair is
computed with that expert's weights gathered per row, with the same quantization points
(MXFP8 rows before each expert GEMM, straight-through in backward) and the same bf16 roundings,
in torch autograd. No communication, no layout, no Triton GEMM: only the math."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["moe_reference"]


def moe_reference(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                  scale_mode: str = "rceil", mx_weights: bool = True) -> torch.Tensor:
    """``x`` bf16 ``[n, H]``, ``router`` fp32 ``[E, H]``, ``w13`` bf16 ``[E, 2F, H]`` and ``w2`` bf16
    ``[E, H, F]`` (all experts of all ranks) -> bf16 ``[n, H]``; differentiable w.r.t. all four."""
    from mxep.format.mxfp8 import quantize_straight_through

    n, H = x.shape
    Fh = w2.shape[2]
    if mx_weights:   # MXFP8 weights, blocks along each GEMM's K, straight-through
        w13 = quantize_straight_through(w13, scale_mode).dequantize()
        w2 = quantize_straight_through(w2, scale_mode).dequantize()
    probs = (x.float() @ router.t()).softmax(dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)
    gates = gates / gates.sum(dim=-1, keepdim=True)
    e = experts.flatten()                                            # [n*k]
    rows = x.repeat_interleave(top_k, dim=0)                          # [n*k, H], token-major
    xq = quantize_straight_through(rows, scale_mode).dequantize().float()
    h = torch.bmm(w13[e].float(), xq[:, :, None])[:, :, 0].to(torch.bfloat16)        # [n*k, 2F]
    a = F.silu(h[:, :Fh]) * h[:, Fh:]
    aq = quantize_straight_through(a, scale_mode).dequantize().float()
    o = torch.bmm(w2[e].float(), aq[:, :, None])[:, :, 0].to(torch.bfloat16)         # [n*k, H]
    y = (o.float() * gates.flatten()[:, None]).view(n, top_k, H).sum(dim=1)
    return y.to(x.dtype)
