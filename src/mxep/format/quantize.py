"""Standalone single-pass MXFP8 quantization kernel (bf16/fp32 ``[M, K]`` -> e4m3 + e8m0).

Each program loads one ``[BLOCK_M, BLOCK_K]`` tile of the input exactly once, quantizes it in
registers with :func:`mxep.format.tile.quantize_tile` and stores the e4m3 bytes and the
row-major e8m0 scale bytes. No host synchronization anywhere.

The same kernel's round-trip mode (:func:`mxfp8_round_trip`) stores ``dequant(quant(x))`` as
bf16 instead, the form the MX weight cache keeps on Hopper (:mod:`mxep.gemm.weight_cache`): one
pass of 4 bytes per element where quantize + dequantize take two passes of 6.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, next_power_of_2, require_triton
from mxep.format.spec import BLOCK_SIZE, check_scale_mode
from mxep.format.tile import bf16_bits_to_fp32, mxfp8_tile_to_bf16, quantize_tile

__all__ = ["to_mxfp8_rows", "mxfp8_round_trip", "to_mxfp8_op"]

# GPU tiles: 4 rows x 1024 columns, 4 warps (each thread two 16-byte loads): 184.9 us, 0.92 of
# copy bandwidth, one H200, bf16 RCEIL 32768 x 7168 (docs/tuning.md).
GPU_BLOCK_K = 1024
GPU_BLOCK_M = 4
GPU_NUM_WARPS = 4
# The CPU interpreter pays per program and per op, not per element: bigger tiles are faster.
INTERPRET_BLOCK_K = 2048
INTERPRET_BLOCK_M = 32


@triton.jit
def _to_mxfp8_kernel(
    x_ptr, q_ptr, s_ptr,  # x: fp32 or bf16-as-int16 [M, K]; q: uint8 [M, K]; s: uint8 [M, K // 32]
    M, K,                 # (ROUND_TRIP: q is bf16 [M, K], s unused)
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FLOOR: tl.constexpr, HW_CAST: tl.constexpr,
    ROUND_TRIP: tl.constexpr = False,
):
    NB: tl.constexpr = BLOCK_K // 32
    # 1-D grid, column tiles fastest: consecutive programs cover whole rows, i.e. one contiguous
    # stretch of memory (0.5-4% faster than the row tiles fastest, docs/tuning.md).
    n_k = tl.cdiv(K, BLOCK_K)
    pid_m = tl.program_id(0) // n_k
    pid_k = tl.program_id(0) % n_k

    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M*K > 2^31
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < M
    # K % 32 == 0 and tiles start at multiples of BLOCK_K, so masked-out columns form whole
    # all-zero MX blocks that are never stored: they cannot contaminate a real block.
    mask = row_ok[:, None] & (cols < K)[None, :]
    offs = rows[:, None] * K + cols[None, :]

    if x_ptr.dtype.element_ty == tl.int16:  # bf16 passed as raw bits (see bf16_bits_to_fp32)
        x = bf16_bits_to_fp32(tl.load(x_ptr + offs, mask=mask, other=0))
    else:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    q_bits, s_bits = quantize_tile(x, BLOCK_K, FLOOR, HW_CAST)
    if ROUND_TRIP:
        # the dequantize kernel's decode (mxfp8_tile_to_bf16), so the bits equal its output
        q3 = tl.reshape(q_bits, [BLOCK_M, NB, 32])
        s3 = tl.broadcast_to(s_bits[:, :, None], [BLOCK_M, NB, 32])
        y = mxfp8_tile_to_bf16(q3, s3, "cvt" if HW_CAST else "int")
        tl.store(q_ptr + offs, tl.reshape(y, [BLOCK_M, BLOCK_K]), mask=mask)
    else:
        tl.store(q_ptr + offs, q_bits, mask=mask)
        n_blocks = K // 32
        bcols = pid_k * NB + tl.arange(0, NB)
        s_offs = rows[:, None] * n_blocks + bcols[None, :]
        s_mask = row_ok[:, None] & (bcols < n_blocks)[None, :]
        tl.store(s_ptr + s_offs, s_bits, mask=s_mask)


def _check_input(x2d: torch.Tensor, scale_mode: str, what: str) -> None:
    require_triton(x2d, what)
    if x2d.dim() != 2:
        raise ValueError(f"{what} expects a 2-D tensor, got shape {tuple(x2d.shape)}")
    if x2d.dtype not in (torch.bfloat16, torch.float32):
        raise TypeError(f"{what} expects bfloat16 or float32, got {x2d.dtype}")
    if not x2d.is_contiguous():
        raise ValueError(f"{what} expects a contiguous tensor")
    check_scale_mode(scale_mode)
    if x2d.shape[1] % 32 != 0:
        raise ValueError(f"K must be a multiple of 32, got {x2d.shape[1]}")


def _launch(x2d, out_q, out_s, scale_mode, block_m, block_k, num_warps, hw_cast, round_trip) -> None:
    M, K = x2d.shape
    on_gpu = x2d.is_cuda
    if block_k is None:
        block_k = min(GPU_BLOCK_K if on_gpu else INTERPRET_BLOCK_K, next_power_of_2(K))
    if block_m is None:
        block_m = min(GPU_BLOCK_M if on_gpu else INTERPRET_BLOCK_M, next_power_of_2(M))
    if block_k < 32 or block_k & (block_k - 1) or block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_k must be a power of two >= 32 and block_m a power of two, got {block_k}, {block_m}")
    grid = (cdiv(M, block_m) * cdiv(K, block_k),)
    # bf16 travels as its int16 bits: the kernel widens them exactly (the interpreter's own
    # bf16 -> fp32 conversion mishandles subnormals).
    x_arg = x2d.view(torch.int16) if x2d.dtype == torch.bfloat16 else x2d
    _to_mxfp8_kernel[grid](
        x_arg, out_q, out_s, M, K,
        BLOCK_M=block_m, BLOCK_K=block_k, FLOOR=(scale_mode == "floor"),
        HW_CAST=hw_cast and on_gpu, ROUND_TRIP=round_trip, num_warps=num_warps or GPU_NUM_WARPS,
    )


def to_mxfp8_rows(
    x2d: torch.Tensor,
    scale_mode: str = "rceil",
    *,
    block_m: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    hw_cast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a contiguous 2-D bf16/fp32 ``x2d [M, K]`` (``K % 32 == 0``) to MXFP8.

    Returns ``(q float8_e4m3fn [M, K], s float8_e8m0fnu [M, K // 32])``. ``block_m`` /
    ``block_k`` (powers of two, ``block_k >= 32``) override the default tiles (tests use this).
    ``hw_cast``: on GPUs, round to e4m3 with the hardware conversion (bit-identical to the
    integer rounding, which the interpreter always uses; False times or tests that path there).
    """
    _check_input(x2d, scale_mode, "to_mxfp8_rows")
    M, K = x2d.shape
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x2d.device)
    s = torch.empty((M, K // 32), dtype=torch.float8_e8m0fnu, device=x2d.device)
    if M and K:
        _launch(x2d, q.view(torch.uint8), s.view(torch.uint8), scale_mode, block_m, block_k, num_warps,
                hw_cast, round_trip=False)
    return q, s


def mxfp8_round_trip(x2d: torch.Tensor, scale_mode: str = "rceil", *, out: torch.Tensor | None = None,
                     block_m: int | None = None, block_k: int | None = None,
                     num_warps: int | None = None) -> torch.Tensor:
    """``x2d`` bf16/fp32 ``[M, K]`` (contiguous, ``K % 32 == 0``) -> bf16 ``[M, K]`` holding the
    values of its MXFP8 form, ``dequantize(to_mxfp8(x2d))``, bit for bit, in one pass (the MXFP8
    bytes are never stored). ``out``: a contiguous bf16 ``[M, K]`` to write into.

    Example::

        >>> w = torch.randn(64, 96)     # on CUDA, or on the CPU under TRITON_INTERPRET=1
        >>> torch.equal(mxfp8_round_trip(w), mxep.to_mxfp8(w).dequantize())
        True
    """
    _check_input(x2d, scale_mode, "mxfp8_round_trip")
    if out is None:
        out = torch.empty(x2d.shape, dtype=torch.bfloat16, device=x2d.device)
    elif out.shape != x2d.shape or out.dtype != torch.bfloat16 or not out.is_contiguous() or out.device != x2d.device:
        raise ValueError(f"mxfp8_round_trip: out must be a contiguous bf16 {tuple(x2d.shape)} tensor on {x2d.device}")
    if out.numel():
        _launch(x2d, out, out, scale_mode, block_m, block_k, num_warps, hw_cast=True, round_trip=True)
    return out


@torch.library.custom_op("mxep::to_mxfp8", mutates_args=())
def to_mxfp8_op(x: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` bf16/fp32 ``[..., K]`` (contiguous, ``K % 32 == 0``) -> ``(qdata float8_e4m3fn [..., K],
    scale float8_e8m0fnu [..., K // 32])``: the Triton kernel, on CUDA or on CPU under
    ``TRITON_INTERPRET=1`` (elsewhere a clear error says so)."""
    # Not reshape(-1, K): that is ambiguous (an error) when K == 0.
    q, s = to_mxfp8_rows(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), scale_mode)
    return q.view(x.shape), s.view(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE)


@to_mxfp8_op.register_fake
def _(x: torch.Tensor, scale_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    q = x.new_empty(x.shape, dtype=torch.float8_e4m3fn)
    s = x.new_empty((*x.shape[:-1], x.shape[-1] // BLOCK_SIZE), dtype=torch.float8_e8m0fnu)
    return q, s
