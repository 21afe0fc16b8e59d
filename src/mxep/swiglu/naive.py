"""Pure-torch reference of :func:`mxep.swiglu.swiglu_mxfp8` (tests): torch's bf16 SwiGLU
on the layout's rows, then :func:`mxep.to_mxfp8`, straight-through in backward."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["swiglu_mxfp8_reference"]


def swiglu_mxfp8_reference(h: torch.Tensor, rows: int, scale_mode: str = "rceil"):
    """``h`` bf16 ``[cap, 2F]`` -> MXFP8Tensor ``[rows, F]`` of ``silu(g) * u`` (differentiable
    w.r.t. ``h`` through the straight-through quantization)."""
    from mxep.format.mxfp8 import quantize_straight_through

    Fh = h.shape[1] // 2
    a = F.silu(h[:rows, :Fh]) * h[:rows, Fh:]
    return quantize_straight_through(a, scale_mode)
