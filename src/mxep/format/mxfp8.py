"""``MXFP8Tensor`` and ``to_mxfp8``: the MXFP8 format's tensor type and its front door (the rules
are in :mod:`mxep.format.spec`)."""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from mxep.format.blocked import check_scale_layout, from_blocked_scales
from mxep.format.dequantize import dequantize_mxfp8_op
from mxep.format.quantize import to_mxfp8_op
from mxep.format.spec import BLOCK_SIZE, ScaleMode, check_quantizable, check_scale_mode
from mxep.format.naive import dequantize_mxfp8_reference

__all__ = ["MXFP8Tensor", "to_mxfp8", "quantize_straight_through"]

aten = torch.ops.aten


class _DequantizeStraightThrough(torch.autograd.Function):
    """MXFP8Tensor -> plain high-precision tensor; the gradient passes straight through in high
    precision (it is never cast to fp8)."""

    @staticmethod
    def forward(ctx, t: "MXFP8Tensor", dtype: torch.dtype):
        ctx.in_dtype = t.dtype
        q, s = t.qdata, t.row_major_scale()
        if q.is_cuda and dtype == torch.bfloat16 and q.is_contiguous() and s.is_contiguous():
            # one Triton pass (bit-exact with dequantize_mxfp8_reference, tests/format/test_dequantize.py) instead of
            # torch's three fp32 passes: 0.3 ms against 1.7 ms for 33856 x 7168 on one H200
            return dequantize_mxfp8_op(q, s)
        return dequantize_mxfp8_reference(q, s, dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.in_dtype), None


class _RowMajorScales(torch.autograd.Function):
    """MXFP8Tensor with blocked scales -> the same tensor with row-major scales (a permuting copy
    of the scales, the data shared); the gradient passes through unchanged."""

    @staticmethod
    def forward(ctx, t: "MXFP8Tensor"):
        return MXFP8Tensor(t.qdata, t.row_major_scale(), t.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


class MXFP8Tensor(torch.Tensor):
    """An MXFP8-quantized tensor that presents to autograd as a high-precision (bf16) tensor.

    Attributes:
        qdata: ``torch.float8_e4m3fn [..., K]`` element bytes.
        scale: ``torch.float8_e8m0fnu [..., K // 32]`` block scales, in ``scale_layout``.
        scale_layout: ``"row_major"`` (default: ``scale[i, j]`` scales elements ``[32j, 32j + 32)``
            of row ``i``) or ``"blocked"`` (2-D only, rows a multiple of 128 and ``K // 32`` of
            4: the same bytes permuted into the tiles that sm_100's block-scaled MMA reads,
            :mod:`mxep.format.blocked`; what a ``Buffer(scale_layout="blocked")`` dispatch
            returns, torchao's ``is_swizzled_scales=True``). :meth:`row_major_scale` gives the
            row-major scales either way; every op below reads them through it.
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
    scale_layout: str

    @staticmethod
    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                requires_grad: bool = False, *, scale_layout: str = "row_major"):
        return torch.Tensor._make_wrapper_subclass(
            cls, qdata.shape, dtype=dtype, device=qdata.device, requires_grad=requires_grad
        )

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                 requires_grad: bool = False, *, scale_layout: str = "row_major"):
        if qdata.dtype != torch.float8_e4m3fn:
            raise TypeError(f"MXFP8Tensor.qdata must be float8_e4m3fn, got {qdata.dtype}")
        if scale.dtype != torch.float8_e8m0fnu:
            raise TypeError(f"MXFP8Tensor.scale must be float8_e8m0fnu, got {scale.dtype}")
        if scale.shape != (*qdata.shape[:-1], qdata.shape[-1] // BLOCK_SIZE):
            raise ValueError(f"MXFP8Tensor: scale shape {tuple(scale.shape)} does not match qdata {tuple(qdata.shape)}")
        check_scale_layout(scale_layout)
        if scale_layout == "blocked" and (scale.dim() != 2 or scale.shape[0] % 128 or scale.shape[1] % 4):
            raise ValueError(f"MXFP8Tensor: blocked scales must be [R, K // 32] with R % 128 == 0 and (K // 32) % 4 "
                             f"== 0, got {tuple(scale.shape)}")
        self.qdata = qdata
        self.scale = scale
        self.scale_layout = scale_layout

    def row_major_scale(self) -> torch.Tensor:
        """The scales in the row-major layout: ``self.scale`` itself, or for blocked scales a
        row-major copy (one permuting pass over the scales, ``1/32`` of the data bytes)."""
        return self.scale if self.scale_layout == "row_major" else from_blocked_scales(self.scale)

    def with_row_major_scales(self) -> "MXFP8Tensor":
        """This tensor with row-major scales: ``self`` if they are, else a differentiable
        (straight-through) copy whose ``qdata`` is shared and whose scales are
        :meth:`row_major_scale` (for consumers that index scales by row, e.g. the Hopper GEMMs)."""
        return self if self.scale_layout == "row_major" else _RowMajorScales.apply(self)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Differentiable dequantization -> ``dtype [..., K]``; the gradient flows back unquantized."""
        return _DequantizeStraightThrough.apply(self, dtype)

    def to_torchao(self):
        """This tensor as torchao's ``MXTensor`` (``torchao.prototype.mx_formats.mx_tensor``),
        sharing ``qdata`` and ``scale`` (no copy; row-major scales, ``block_size=32``). Needs the
        ``torchao`` extra (``pip install 'mxep[torchao]'``); not differentiable."""
        from mxep.integrations.torchao import to_torchao
        return to_torchao(self)

    @staticmethod
    def from_torchao(t) -> "MXFP8Tensor":
        """A torchao MXFP8 ``MXTensor`` (e4m3, blocks of 32, row-major scales) as an
        MXFP8Tensor of the same bytes (no copy); anything else raises ``ValueError``."""
        from mxep.integrations.torchao import from_torchao
        return from_torchao(t)

    def __repr__(self) -> str:
        return (f"MXFP8Tensor(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"qdata={self.qdata.dtype}, scale={self.scale.dtype}{tuple(self.scale.shape)}, "
                f"scale_layout={self.scale_layout!r})")

    # torch.compile / FSDP-style flattening.
    def __tensor_flatten__(self):
        return ["qdata", "scale"], {"dtype": self.dtype, "scale_layout": self.scale_layout}

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return MXFP8Tensor(inner["qdata"], inner["scale"], meta["dtype"],
                           scale_layout=meta.get("scale_layout", "row_major"))

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            (t,) = args[:1]
            return MXFP8Tensor(func(t.qdata), func(t.scale), t.dtype, scale_layout=t.scale_layout)
        if func is aten._grouped_mm.default:
            return _grouped_mm_on_mxfp8(args, kwargs)
        # Anything else: compute on the dequantized value (exact for e4m3 * 2^k in fp32/bf16).
        def unwrap(a):
            if isinstance(a, MXFP8Tensor):
                return dequantize_mxfp8_reference(a.qdata, a.row_major_scale(), a.dtype)
            return a
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _grouped_mm_on_mxfp8(args, kwargs):
    """``aten._grouped_mm`` with an MXFP8Tensor operand, e.g. torchtitan's ``GroupedExperts`` on
    the dispatch layout (``mxep.integrations.torchtitan``): the same math as
    :func:`mxep.grouped_mm_mxfp8`'s default path, one Triton dequantize pass of the MXFP8
    operand, then the bf16 ``torch._grouped_mm`` (MX numerics on bf16 tensor cores). A 2-D
    operand whose rows are the grouped dimension (``A [M, K]`` of ``2d x 3d``: the forward;
    ``B [M, N]`` of ``2d x 2d``: autograd's weight gradient ``dy^T @ A``) is dequantized only up
    to the last group end ``offs[-1]``, on the device (no host sync; rows past it are never
    read). Autograd sits above this (torch's own ``_grouped_mm`` formula), so the MXFP8Tensor is
    what it saves for the backward and the gradient of the tokens is bf16, straight-through."""
    a, b = args[0], args[1]
    offs = args[2] if len(args) > 2 else kwargs.get("offs")

    def to_bf16(t, rows_grouped: bool):
        if not isinstance(t, MXFP8Tensor):
            return t
        s = t.row_major_scale()
        if t.dtype != torch.bfloat16:
            return dequantize_mxfp8_reference(t.qdata, s, t.dtype)
        end = offs[-1:] if rows_grouped and offs is not None and t.dim() == 2 else None
        return dequantize_mxfp8_op(t.qdata.contiguous(), s.contiguous(), end)

    a2, b2 = a.dim() == 2, b.dim() == 2
    return aten._grouped_mm.default(to_bf16(a, a2 and not b2), to_bf16(b, a2 and b2), *args[2:], **kwargs)


def to_mxfp8(x: torch.Tensor, scale_mode: ScaleMode = "rceil") -> MXFP8Tensor:
    """Quantize ``x`` (bf16 or fp32 ``[..., K]``, ``K % 32 == 0``, contiguous) to MXFP8.

    Returns an :class:`MXFP8Tensor` with ``.qdata`` float8_e4m3fn ``[..., K]`` and ``.scale``
    float8_e8m0fnu ``[..., K // 32]`` (row-major), by a single-pass Triton kernel that follows
    the rules of :mod:`mxep.format.spec` bit for bit: on CUDA, or on CPU under
    ``TRITON_INTERPRET=1`` (elsewhere a ``RuntimeError`` says to set it).

    Example::

        >>> t = mxep.to_mxfp8(torch.randn(3, 96, dtype=torch.bfloat16))
        >>> t.qdata.dtype, t.scale.shape
        (torch.float8_e4m3fn, torch.Size([3, 3]))
    """
    check_quantizable(x)
    check_scale_mode(scale_mode)
    q, s = to_mxfp8_op(x, scale_mode)
    return MXFP8Tensor(q, s, x.dtype)


class _QuantizeStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale_mode: str) -> MXFP8Tensor:
        return to_mxfp8(x, scale_mode)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def quantize_straight_through(x: torch.Tensor, scale_mode: str = "rceil") -> MXFP8Tensor:
    """:func:`mxep.to_mxfp8` whose gradient passes straight through, unquantized."""
    return _QuantizeStraightThrough.apply(x.contiguous(), scale_mode)
