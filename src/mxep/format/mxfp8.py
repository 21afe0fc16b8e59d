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
from torch.utils._pytree import tree_map

__all__ = ["MXFP8Tensor", "to_mxfp8", "dequantize_mxfp8", "BLOCK_SIZE", "E4M3_MAX", "SCALE_MODES"]

BLOCK_SIZE = 32
E4M3_MAX = 448.0
SCALE_MODES = ("rceil", "floor")
ScaleMode = Literal["rceil", "floor"]

aten = torch.ops.aten


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


def dequantize_mxfp8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``qdata`` float8_e4m3fn ``[..., K]`` and ``scale`` float8_e8m0fnu ``[..., K // 32]`` -> ``dtype [..., K]``.

    Scale byte 0xFF decodes to NaN (torch's e8m0 conversion), so non-finite blocks come back NaN.
    """
    k = qdata.shape[-1]
    blocks = qdata.float().reshape(*qdata.shape[:-1], k // BLOCK_SIZE, BLOCK_SIZE)
    out = blocks * scale.float().unsqueeze(-1)
    return out.reshape(qdata.shape).to(dtype)


class _DequantizeStraightThrough(torch.autograd.Function):
    """MXFP8Tensor -> plain high-precision tensor; the gradient passes straight through in high
    precision (it is never cast to fp8)."""

    @staticmethod
    def forward(ctx, t: "MXFP8Tensor", dtype: torch.dtype):
        ctx.in_dtype = t.dtype
        q, s = t.qdata, t.scale
        if q.is_cuda and dtype == torch.bfloat16 and q.is_contiguous() and s.is_contiguous():
            # one Triton pass (bit-exact with dequantize_mxfp8, tests/test_dequantize.py) instead of
            # torch's three fp32 passes: 0.3 ms against 1.7 ms for 33856 x 7168 on one H200
            from mxep.ops.dequantize import dequantize_mxfp8_op

            return dequantize_mxfp8_op(q, s)
        return dequantize_mxfp8(q, s, dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.in_dtype), None


class MXFP8Tensor(torch.Tensor):
    """An MXFP8-quantized tensor that presents to autograd as a high-precision (bf16) tensor.

    Attributes:
        qdata: ``torch.float8_e4m3fn [..., K]`` element bytes.
        scale: ``torch.float8_e8m0fnu [..., K // 32]`` row-major block scales.
        dtype: the logical (high-precision) dtype, ``torch.bfloat16`` by default. Gradients that
            flow into an MXFP8Tensor have this dtype: they are never quantized.

    ``t.dequantize(dtype)`` is differentiable (straight-through). Any other torch op applied to an
    MXFP8Tensor runs on its dequantized value.

    Example::

        >>> x = torch.randn(4, 64, dtype=torch.bfloat16)
        >>> t = mxep.to_mxfp8(x)
        >>> t.qdata.shape, t.scale.shape
        (torch.Size([4, 64]), torch.Size([4, 2]))
        >>> (t.dequantize() - x).abs().max() <= x.abs().max() / 8
        tensor(True)
    """

    qdata: torch.Tensor
    scale: torch.Tensor

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                requires_grad: bool = False):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=requires_grad
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                 requires_grad: bool = False):
        if qdata.dtype != torch.float8_e4m3fn:
            raise TypeError(f"MXFP8Tensor.qdata must be float8_e4m3fn, got {qdata.dtype}")
        if scale.dtype != torch.float8_e8m0fnu:
            raise TypeError(f"MXFP8Tensor.scale must be float8_e8m0fnu, got {scale.dtype}")
        if scale.shape != (*qdata.shape[:-1], qdata.shape[-1] // BLOCK_SIZE):
            raise ValueError(f"MXFP8Tensor: scale shape {tuple(scale.shape)} does not match qdata {tuple(qdata.shape)}")
        self.qdata = qdata
        self.scale = scale

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Differentiable dequantization -> ``dtype [..., K]``; the gradient flows back unquantized."""
        return _DequantizeStraightThrough.apply(self, dtype)

    def __repr__(self) -> str:
        return (f"MXFP8Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"qdata={self.qdata.dtype}, scale={self.scale.dtype}{tuple(self.scale.shape)})")

    # torch.compile / FSDP-style flattening.
    def __tensor_flatten__(self):
        return ["qdata", "scale"], {"dtype": self.dtype}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return MXFP8Tensor(inner["qdata"], inner["scale"], meta["dtype"])

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            (t,) = args[:1]
            return MXFP8Tensor(func(t.qdata), func(t.scale), t.dtype)
        # Anything else: compute on the dequantized value (exact for e4m3 * 2^k in fp32/bf16).
        def unwrap(a):
            return dequantize_mxfp8(a.qdata, a.scale, a.dtype) if isinstance(a, MXFP8Tensor) else a
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def to_mxfp8(x: torch.Tensor, scale_mode: ScaleMode = "rceil") -> MXFP8Tensor:
    """Quantize ``x`` (bf16 or fp32 ``[..., K]``, ``K % 32 == 0``, contiguous) to MXFP8.

    Returns an :class:`MXFP8Tensor` with ``.qdata`` float8_e4m3fn ``[..., K]`` and ``.scale``
    float8_e8m0fnu ``[..., K // 32]`` (row-major). On CUDA (and on CPU under
    ``TRITON_INTERPRET=1``) a single-pass Triton kernel runs; otherwise the pure-torch reference.
    Both follow the rules in this module's docstring bit for bit.

    Example::

        >>> t = mxep.to_mxfp8(torch.randn(3, 96, dtype=torch.bfloat16))
        >>> t.qdata.dtype, t.scale.shape
        (torch.float8_e4m3fn, torch.Size([3, 3]))
    """
    check_quantizable(x)
    check_scale_mode(scale_mode)
    from mxep.ops.quantize import quantize_mxfp8

    q, s = quantize_mxfp8(x, scale_mode)
    return MXFP8Tensor(q, s, x.dtype)
