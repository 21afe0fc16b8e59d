"""MXFP8 -> bf16 in one pass: e4m3 bytes ``[R, K]`` and e8m0 scales ``[R, K/32]`` -> bf16
``[R, K]``, exactly (:func:`mxep.format.naive.dequantize_mxfp8_reference` is the torch expression).

``dequantize_mxfp8`` (public, ``mxep.dequantize_mxfp8``) is the registered op ``mxep::dequantize_mxfp8``
(``dequantize_mxfp8_op``): this kernel where Triton runs, the torch expression elsewhere.

Used by the grouped GEMM's default path (dequantize, then ``torch._grouped_mm`` on bf16 tensor
cores): reading 1.03 bytes and writing 2 per element, where the torch expression makes three
fp32 passes (1.7 ms against the kernel's some 0.2 ms for 33856 x 7168 on one H200,
benchmarks/bench_grouped_gemm.py). With ``row_end_ptr`` (a device int32 scalar, e.g. the last
group end of a dispatch layout) programs past that row exit, so a worst-case-sized layout costs
only the rows it holds, with no host sync; rows past it are left unwritten.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, triton_available_for
from mxep.format.spec import BLOCK_SIZE
from mxep.format.tile import mxfp8_tile_to_bf16
from mxep.format.naive import dequantize_mxfp8_reference

__all__ = ["dequantize_mxfp8", "dequantize_mxfp8_rows", "dequantize_mxfp8_op"]

# (BLOCK_M, BLOCK_K, warps) on GPUs (each thread 16 bytes of e4m3 in, two 16-byte bf16 stores
# out): 204 us, 0.83 of copy bandwidth, one H200, 32768 x 7168 (docs/tuning.md).
# The CPU interpreter pays per program: few, wide ones.
GPU_TILE = (32, 256, 4)
INTERPRETER_TILE = (16, 256, 1)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, out_ptr, row_end_ptr, R, K,
                       HAS_END: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       DECODE: tl.constexpr):
    # 1-D grid, column tiles fastest (consecutive programs cover whole rows: 0.83 of copy
    # against 0.80 with row tiles fastest at 32768 x 7168, docs/tuning.md)
    n_k = tl.cdiv(K, BLOCK_K)
    pid_m = tl.program_id(0) // n_k
    pid_k = tl.program_id(0) % n_k
    row0 = pid_m * BLOCK_M
    end = R
    if HAS_END:
        end = tl.minimum(tl.load(row_end_ptr), R)
    if row0 < end:
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m = (rows < end)[:, None] & (cols < K)[None, :]
        r64 = rows.to(tl.int64)[:, None]
        q = tl.load(q_ptr + r64 * K + cols[None, :], mask=m, other=0)
        sc = tl.load(s_ptr + r64 * (K // 32) + (cols // 32)[None, :], mask=m, other=127)
        tl.store(out_ptr + r64 * K + cols[None, :], mxfp8_tile_to_bf16(q, sc, DECODE), mask=m)


def dequantize_mxfp8_rows(qdata: torch.Tensor, scale: torch.Tensor, row_end: torch.Tensor | None = None,
                          out: torch.Tensor | None = None, decode: str | None = None,
                          tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``qdata`` e4m3 (or uint8) ``[R, K]``, ``scale`` e8m0 (or uint8) ``[R, K/32]``, optional
    ``row_end`` int32 scalar tensor on the same device -> bf16 ``[R, K]`` (rows at or past
    ``row_end`` unwritten). Contiguous inputs; ``K % 32 == 0``. ``decode`` (default: ``"cvt"``,
    the hardware e4m3 conversion, on CUDA; ``"int"`` elsewhere) lets scripts/compile_sm90.py
    build the GPU code from CPU tensors."""
    R, K = qdata.shape
    if out is None:
        out = torch.empty(R, K, dtype=torch.bfloat16, device=qdata.device)
    if R == 0 or K == 0:
        return out
    bm, bk, warps = tile or (GPU_TILE if qdata.is_cuda or decode == "cvt" else INTERPRETER_TILE)
    grid = (cdiv(R, bm) * cdiv(K, bk),)
    _dequantize_kernel[grid](
        # (a uint8 tensor passes as it is: a dtype view is one more op per call)
        qdata if qdata.dtype == torch.uint8 else qdata.view(torch.uint8),
        scale if scale.dtype == torch.uint8 else scale.view(torch.uint8), out, row_end if row_end is not None else qdata,
        R, K, HAS_END=row_end is not None, BLOCK_M=bm, BLOCK_K=bk,
        DECODE=decode or ("cvt" if qdata.is_cuda else "int"), num_warps=warps)
    return out



def _dequantize_mxfp8_impl(qdata: torch.Tensor, scale: torch.Tensor,
                           row_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``qdata`` float8_e4m3fn ``[..., K]`` and ``scale`` float8_e8m0fnu ``[..., K // 32]``
    (contiguous; or both as uint8 bytes) -> bf16 ``[..., K]``. With ``row_end`` (int32 ``[1]`` on the same device, e.g.
    ``group_end_offsets[-1:]`` of a dispatch layout), rows of the flattened ``[R, K]`` view at or
    past it are left unspecified (the kernel skips them on the device: no host sync)."""
    if not triton_available_for(qdata) or qdata.numel() == 0:
        if qdata.dtype == torch.uint8:   # raw bytes (the one-node layer's): the torch decode needs the dtypes
            qdata, scale = qdata.view(torch.float8_e4m3fn), scale.view(torch.float8_e8m0fnu)
        return dequantize_mxfp8_reference(qdata, scale, torch.bfloat16)
    if qdata.dim() == 2:   # the layouts' case: no reshapes (each a dispatched op)
        return dequantize_mxfp8_rows(qdata, scale, row_end)
    K = qdata.shape[-1]
    R = math.prod(qdata.shape[:-1])
    out = dequantize_mxfp8_rows(qdata.reshape(R, K), scale.reshape(R, K // BLOCK_SIZE), row_end)
    return out.view(qdata.shape)


# The registered op (torch.compile keeps it one node); eager callers on plain tensors may run
# _dequantize_mxfp8_impl directly (mxep._utils.call_op).
dequantize_mxfp8_op = torch.library.custom_op("mxep::dequantize_mxfp8", _dequantize_mxfp8_impl, mutates_args=())


@dequantize_mxfp8_op.register_fake
def _(qdata: torch.Tensor, scale: torch.Tensor, row_end: Optional[torch.Tensor] = None) -> torch.Tensor:
    return qdata.new_empty(qdata.shape, dtype=torch.bfloat16)


def dequantize_mxfp8(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``qdata`` float8_e4m3fn ``[..., K]`` and ``scale`` float8_e8m0fnu ``[..., K // 32]`` ->
    ``dtype [..., K]``, exactly. bf16: the op ``mxep::dequantize_mxfp8`` (one Triton pass where
    Triton runs); other dtypes: the torch expression. Scale byte 0xFF decodes to NaN."""
    if dtype == torch.bfloat16:
        return dequantize_mxfp8_op(qdata.contiguous(), scale.contiguous())
    return dequantize_mxfp8_reference(qdata, scale, dtype)
