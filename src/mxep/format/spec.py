"""MXFP8 (OCP Microscaling, e4m3 elements + e8m0 block scales) for mxep.

Format
------
A tensor ``x`` of shape ``[..., K]`` (``K % 32 == 0``) is cut along its last dim into blocks of
32 consecutive elements. Each block gets one scale byte ``b`` (``torch.float8_e8m0fnu``,
value ``2**(b - 127)``) and 32 e4m3 elements (``torch.float8_e4m3fn``); the block decodes to
``float(P_i) * 2**(b - 127)``. Scales are row-major ``[..., K // 32]``: that is what travels
between GPUs (the tensor-core "blocked" layout is a per-GEMM rearrangement, not our business).

Rules (bit-exact; the Triton kernel and the pure-torch reference implement exactly these)
------------------------------------------------------------------------------------------
Let ``amax`` be the fp32 absolute maximum of the block (inputs are bf16 or fp32).

* ``scale_mode="rceil"`` (default; cuBLAS / TransformerEngine / torchao training recipe):
  ``d = amax * fp32(1/448)`` computed in fp32; ``b`` = biased exponent of ``d``, plus 1 if
  ``d``'s mantissa is non-zero (for a subnormal ``d``: plus 1 if mantissa > 0x400000). That is
  ``2**(b-127)`` = ``d`` rounded *up* to a power of two, so no element is clipped.
* ``scale_mode="floor"`` (the OCP spec's reference conversion):
  ``b = clamp(floor(log2(amax)) - 8, -127, 127) + 127`` = ``max(E(amax) - 8, 0)`` where
  ``E`` is the biased fp32 exponent (0 for zero/subnormal amax). The block maximum lands in
  ``[256, 512)`` and is saturated to 448 when it rounds above (up to 12.5% error on it).
* Elements: ``v = x * 2**(127 - b)`` in fp32 (exact: a power-of-two scaling), rounded to the
  nearest e4m3 value (ties to even, subnormals included) and saturated to +-448 (a no-op under
  RCEIL except for the fp32 rounding of ``amax/448``). The sign of zero is kept.
* All-zero block: ``amax = 0`` gives ``b = 0`` (the smallest exponent, as torchao) in both modes;
  the elements are +-0 and the block dequantizes to zeros.
* Non-finite block (any NaN or +-Inf in it): ``b = 0xFF`` (e8m0 NaN) and every element byte is
  ``0x7F`` (e4m3 NaN), so the whole block dequantizes to NaN. Other blocks are unaffected.

Dequantize: ``float(P_i) * 2**(b - 127)`` in fp32, then cast to the requested dtype. An e4m3
value times a power of two is exact in fp32 and (except extreme under/overflow) in bf16.
"""
from __future__ import annotations

from typing import Literal

import torch

__all__ = ["check_scale_mode", "check_quantizable", "BLOCK_SIZE", "E4M3_MAX", "SCALE_MODES"]

BLOCK_SIZE = 32
E4M3_MAX = 448.0
SCALE_MODES = ("rceil", "floor")
ScaleMode = Literal["rceil", "floor"]


def check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}")


def check_quantizable(x: torch.Tensor, what: str = "x") -> None:
    """Host-side (shape/dtype only, no device sync) validation of a tensor to quantize."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"{what} must be bfloat16 or float32 to quantize to MXFP8, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{what} must have at least one dimension, got a scalar")
    if x.shape[-1] % BLOCK_SIZE != 0:
        raise ValueError(
            f"{what}: the last dim (hidden size) must be a multiple of {BLOCK_SIZE}, got {x.shape[-1]}"
        )
    if not x.is_contiguous():
        raise ValueError(f"{what} must be contiguous (call .contiguous() first); got strides {x.stride()}")
