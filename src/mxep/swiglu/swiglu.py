"""SwiGLU between the two expert GEMMs, fused with the MXFP8 quantization of its output, on the
dispatch layout: only rows below the layout's end (``group_end_offsets[-1]``, read on the
device) are touched, not the ``capacity`` rows the buffers are sized for.

Forward: ``h [cap, 2F]`` bf16 (gate columns, then up) -> ``a = silu(g) * u`` rounded to bf16 in
the same two steps as torch's bf16 ops (``silu`` in fp32 rounded to bf16, then the product
rounded) -> MXFP8 ``[cap, F]`` (e4m3 + e8m0, blocks of 32 along F, :mod:`mxep.format.spec`'s
rules). Backward (straight-through for the quantization): ``da [cap, F]`` -> ``dh [cap, 2F]``
with torch's bf16 roundings (``da * u`` and ``da * silu(g)`` rounded, then silu's derivative).
Rows past the end stay unwritten in both. The pure-torch reference is :mod:`mxep.swiglu.naive`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep._utils import call_op, cdiv, next_power_of_2, require_triton
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.spec import check_scale_mode
from mxep.format.tile import bf16_bits_to_fp32, fp32_to_bf16_bits, mxfp8_tile_to_bf16, quantize_tile

__all__ = ["swiglu_mxfp8", "SwiGLUQuantizeFunction", "swiglu_quantize_forward", "swiglu_values_forward",
           "swiglu_backward"]

GPU_TILE = (32, 128)          # (BLOCK_M rows, BLOCK_F columns); not tuned yet
# The CPU interpreter pays per program: few, tall ones (the backward with the activation's
# values, 2304 x 64: 9.9 s at (16, 64), 0.89 s at (128, 64) on the 2-core CI-sized machine).
INTERPRETER_TILE = (128, 64)


@triton.jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32."""
    return bf16_bits_to_fp32(fp32_to_bf16_bits(x))


@triton.jit
def _layout_end(group_end_ptr, L, L_P: tl.constexpr):
    ex = tl.arange(0, L_P)
    return tl.max(tl.load(group_end_ptr + ex, mask=ex < L, other=0), axis=0)


@triton.jit
def _tile_on_layout(h_ptr, group_end_ptr, L, F, L_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr):
    """This program's tile: ``(live, rows, cols, row_mask, mask, g, u)``; ``live`` is False for
    tiles past the layout's end (nothing to do), ``g`` / ``u`` the gate / up values (fp32)."""
    end = _layout_end(group_end_ptr, L, L_P)
    row0 = tl.program_id(0) * BLOCK_M
    rows = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    rm = rows < end
    m = rm[:, None] & (cols < F)[None, :]
    hrow = rows[:, None] * (2 * F) + cols[None, :]
    g = bf16_bits_to_fp32(tl.load(h_ptr + hrow, mask=m, other=0))
    u = bf16_bits_to_fp32(tl.load(h_ptr + hrow + F, mask=m, other=0))
    return row0 < end, rows, cols, rm, m, g, u


@triton.jit
def _quantized_activation(g, u, BLOCK_F: tl.constexpr, FLOOR: tl.constexpr, HW_CAST: tl.constexpr):
    """The forward's ``a = silu(g) * u`` in torch's two bf16 roundings, quantized: ``(q, s)``
    (e4m3 bytes ``[BLOCK_M, BLOCK_F]``, e8m0 bytes ``[BLOCK_M, BLOCK_F // 32]``). One helper for
    both kernels: the backward makes the same bits again from ``h``."""
    silu = _round_bf16(g / (1.0 + tl.exp(-g)))
    a = _round_bf16(silu * u)
    return quantize_tile(a, BLOCK_F, FLOOR, HW_CAST)


@triton.jit
def _store_values(v_ptr, q, s, rows, cols, m, F, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                  DECODE: tl.constexpr):
    """The MXFP8 tile's values as bf16, decoded as the dequantize kernel decodes them."""
    NB: tl.constexpr = BLOCK_F // 32
    sc = tl.reshape(tl.broadcast_to(s[:, :, None], [BLOCK_M, NB, 32]), [BLOCK_M, BLOCK_F])
    tl.store(v_ptr + rows[:, None] * F + cols[None, :], mxfp8_tile_to_bf16(q, sc, DECODE), mask=m)


@triton.jit
def _swiglu_quantize_kernel(h_ptr, q_ptr, s_ptr, v_ptr, group_end_ptr, L, F,
                            L_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                            FLOOR: tl.constexpr, HW_CAST: tl.constexpr, BYTES: tl.constexpr,
                            VALUES: tl.constexpr, DECODE: tl.constexpr):
    # F % 32 == 0: masked columns form whole all-zero MX blocks that are never stored
    h_ptr = h_ptr.to(tl.pointer_type(tl.int16))   # bf16 read as its bits (no int16 view on the host)
    live, rows, cols, rm, m, g, u = _tile_on_layout(h_ptr, group_end_ptr, L, F, L_P, BLOCK_M, BLOCK_F)
    if live:
        q, s = _quantized_activation(g, u, BLOCK_F, FLOOR, HW_CAST)
        if BYTES:   # the MXFP8 bytes (an MXFP8Tensor's; the fused GEMM's input)
            tl.store(q_ptr + rows[:, None] * F + cols[None, :], q, mask=m)
            NB: tl.constexpr = BLOCK_F // 32
            bcols = tl.program_id(1) * NB + tl.arange(0, NB)
            tl.store(s_ptr + rows[:, None] * (F // 32) + bcols[None, :], s,
                     mask=rm[:, None] & (bcols < F // 32)[None, :])
        if VALUES:   # their bf16 values (the dequantizing GEMM's input: no second pass)
            _store_values(v_ptr, q, s, rows, cols, m, F, BLOCK_M, BLOCK_F, DECODE)


@triton.jit
def _swiglu_backward_kernel(h_ptr, da_ptr, dh_ptr, v_ptr, group_end_ptr, L, F,
                            L_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                            GRAD: tl.constexpr, VALUES: tl.constexpr, FLOOR: tl.constexpr,
                            HW_CAST: tl.constexpr, DECODE: tl.constexpr):
    h_ptr = h_ptr.to(tl.pointer_type(tl.int16))   # bf16 as bits (no int16 views on the host)
    da_ptr = da_ptr.to(tl.pointer_type(tl.int16))
    dh_ptr = dh_ptr.to(tl.pointer_type(tl.int16))
    live, rows, cols, rm, m, g, u = _tile_on_layout(h_ptr, group_end_ptr, L, F, L_P, BLOCK_M, BLOCK_F)
    if live:
        if GRAD:
            hrow = rows[:, None] * (2 * F) + cols[None, :]
            da = bf16_bits_to_fp32(tl.load(da_ptr + rows[:, None] * F + cols[None, :], mask=m, other=0))
            sig = 1.0 / (1.0 + tl.exp(-g))
            silu = _round_bf16(g * sig)
            du = fp32_to_bf16_bits(da * silu)
            d_silu = _round_bf16(da * u)
            dg = fp32_to_bf16_bits(d_silu * (sig * (1.0 + g * (1.0 - sig))))
            tl.store(dh_ptr + hrow, dg, mask=m)
            tl.store(dh_ptr + hrow + F, du, mask=m)
        if VALUES:   # the forward's MXFP8 activation again, as bf16 values (for the weight gradient)
            q, s = _quantized_activation(g, u, BLOCK_F, FLOOR, HW_CAST)
            _store_values(v_ptr, q, s, rows, cols, m, F, BLOCK_M, BLOCK_F, DECODE)


def _tile(t: torch.Tensor) -> tuple[int, int]:
    return GPU_TILE if t.is_cuda else INTERPRETER_TILE


def swiglu_quantize_forward(h: torch.Tensor, group_end_offsets: torch.Tensor, scale_mode: str,
                            hw_cast: bool = False, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``h`` bf16 ``[cap, 2F]`` (contiguous) -> (e4m3 ``[cap, F]``, e8m0 ``[cap, F / 32]``); rows
    past ``group_end_offsets[-1]`` unwritten. ``raw``: the same bytes as uint8 tensors."""
    cap, F2 = h.shape
    F = F2 // 2
    q = torch.empty(cap, F, dtype=torch.uint8, device=h.device)
    s = torch.empty(cap, F // 32, dtype=torch.uint8, device=h.device)
    _launch_forward(h, group_end_offsets, scale_mode, hw_cast, q, s, None)
    if raw:
        return q, s
    return q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu)


def swiglu_values_forward(h: torch.Tensor, group_end_offsets: torch.Tensor, scale_mode: str,
                          hw_cast: bool = False) -> torch.Tensor:
    """The values of :func:`swiglu_quantize_forward`'s MXFP8 output as bf16 ``[cap, F]``, bit for
    bit :func:`mxep.format.dequantize.dequantize_mxfp8_rows` of its bytes (same ``scale_mode`` and
    ``hw_cast``), in one pass that writes no bytes: the one-node layer's dequantizing GEMM 2
    multiplies them (its backward makes them again, :func:`swiglu_backward`). Rows past
    ``group_end_offsets[-1]`` unwritten."""
    cap, F2 = h.shape
    v = torch.empty(cap, F2 // 2, dtype=torch.bfloat16, device=h.device)
    _launch_forward(h, group_end_offsets, scale_mode, hw_cast, None, None, v)
    return v


def _launch_forward(h, group_end_offsets, scale_mode, hw_cast, q, s, v) -> None:
    cap, F2 = h.shape
    F = F2 // 2
    if cap and F:
        bm, bf = _tile(h)
        L = group_end_offsets.numel()
        _swiglu_quantize_kernel[(cdiv(cap, bm), cdiv(F, bf))](
            h, q if q is not None else h, s if s is not None else h, v if v is not None else h, group_end_offsets,
            L, F, L_P=max(next_power_of_2(L), 2), BLOCK_M=bm, BLOCK_F=bf, FLOOR=scale_mode == "floor",
            HW_CAST=hw_cast, BYTES=q is not None, VALUES=v is not None,
            DECODE="cvt" if hw_cast else "int")   # (the GPU's e4m3 conversion both ways)


def swiglu_backward(h: torch.Tensor, grad_a: torch.Tensor | None, group_end_offsets: torch.Tensor,
                    values_scale_mode: str | None = None, hw_cast: bool = False):
    """``h`` bf16 ``[cap, 2F]``, ``grad_a`` bf16 ``[cap, F]`` -> ``grad_h`` bf16 ``[cap, 2F]`` (rows
    past the layout's end unwritten). ``values_scale_mode``: also the forward's MXFP8 activation
    made again from ``h`` in the same pass, as bf16 values ``[cap, F]`` (bit for bit what
    :func:`swiglu_values_forward` with that scale mode and ``hw_cast`` gave: the weight gradient
    of the next GEMM multiplies it, so the forward's bytes need not be saved);
    returns ``(grad_h, values)`` then, ``grad_h`` None where ``grad_a`` is None."""
    cap, F2 = h.shape
    F = F2 // 2
    values = values_scale_mode is not None
    dh = torch.empty_like(h) if grad_a is not None else None
    v = torch.empty(cap, F, dtype=torch.bfloat16, device=h.device) if values else None
    if cap and F and (dh is not None or values):
        bm, bf = _tile(h)
        L = group_end_offsets.numel()
        _swiglu_backward_kernel[(cdiv(cap, bm), cdiv(F, bf))](
            h, grad_a.contiguous() if grad_a is not None else h, dh if dh is not None else h,
            v if values else h, group_end_offsets, L, F, L_P=max(next_power_of_2(L), 2), BLOCK_M=bm, BLOCK_F=bf,
            GRAD=grad_a is not None, VALUES=values, FLOOR=values_scale_mode == "floor", HW_CAST=hw_cast,
            DECODE="cvt" if hw_cast else "int")
    return (dh, v) if values else dh


# Registered ops (fake implementations give the shapes), so that torch.compile keeps each
# kernel as one opaque node and traces the autograd Function around them; eager calls on plain
# tensors run the bodies directly (mxep._utils.call_op).
def _swiglu_quantize_impl(h: torch.Tensor, group_end_offsets: torch.Tensor, scale_mode: str) -> list[torch.Tensor]:
    return list(swiglu_quantize_forward(h, group_end_offsets, scale_mode, hw_cast=h.is_cuda))


_swiglu_quantize_op = torch.library.custom_op("mxep::swiglu_quantize", _swiglu_quantize_impl, mutates_args=())


@_swiglu_quantize_op.register_fake
def _(h, group_end_offsets, scale_mode):
    cap, F = h.shape[0], h.shape[1] // 2
    return [h.new_empty((cap, F), dtype=torch.float8_e4m3fn), h.new_empty((cap, F // 32), dtype=torch.float8_e8m0fnu)]


def _swiglu_backward_impl(h: torch.Tensor, grad_a: torch.Tensor, group_end_offsets: torch.Tensor) -> torch.Tensor:
    return swiglu_backward(h, grad_a, group_end_offsets)


_swiglu_backward_op = torch.library.custom_op("mxep::swiglu_backward", _swiglu_backward_impl, mutates_args=())


@_swiglu_backward_op.register_fake
def _(h, grad_a, group_end_offsets):
    return torch.empty_like(h)


class SwiGLUQuantizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, group_end_offsets: torch.Tensor, scale_mode: str) -> MXFP8Tensor:
        ctx.save_for_backward(h, group_end_offsets)
        q, s = call_op(_swiglu_quantize_op, _swiglu_quantize_impl, h, group_end_offsets, scale_mode,
                       tensors=(h, group_end_offsets))
        return MXFP8Tensor(q, s, torch.bfloat16)

    @staticmethod
    def backward(ctx, grad_a):
        h, offs = ctx.saved_tensors
        grad_a = grad_a.to(torch.bfloat16).contiguous()
        grad_h = call_op(_swiglu_backward_op, _swiglu_backward_impl, h, grad_a, offs, tensors=(h, grad_a, offs))
        return grad_h, None, None


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
        >>> from mxep.swiglu import swiglu_mxfp8
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
    require_triton(h, "swiglu_mxfp8")
    return SwiGLUQuantizeFunction.apply(h.contiguous(), group_end_offsets, scale_mode)
