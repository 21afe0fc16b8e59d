"""The fused dispatch kernel: read each bf16 row once, quantize it to MXFP8 in registers and store
e4m3 bytes and e8m0 scales straight into the destination rank's receive buffer at the row's final
expert-major, padded position (peer addressing as in :mod:`mxep.kernels.rows`)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep.kernels.mxfp8_tile import bf16_bits_to_fp32, quantize_tile
from mxep.kernels.quantize import use_hw_cast
from mxep.kernels.rows import TUNING, num_persistent_programs

__all__ = ["push_rows_mxfp8"]


@triton.jit
def _push_rows_mxfp8_kernel(
    x_ptr, n_rows, H,
    dst_rank_ptr, dst_row_ptr,
    data_base_ptr, scale_base_ptr, dst_delta_ptr,
    FLOOR: tl.constexpr, SCALES_ALIGNED: tl.constexpr, HW_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NPROG: tl.constexpr,
):
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(n_rows, BLOCK_M)
    n_scale_cols = H // 32
    blk = pid
    while blk < num_blocks:
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        in_range = rows < n_rows
        rank = tl.load(dst_rank_ptr + rows, mask=in_range, other=-1)
        ok = in_range & (rank >= 0)
        drow = tl.load(dst_row_ptr + rows, mask=ok, other=0).to(tl.int64)
        # Data and scales are views of one peer allocation: one byte delta serves both.
        delta = tl.load(dst_delta_ptr + rank, mask=ok, other=0)
        data_off = tl.multiple_of(delta + drow * H, 16)
        scale_off = delta + drow * n_scale_cols
        if SCALES_ALIGNED:  # H // 32 % 16 == 0 (e.g. 2048, 5120, 7168): 16-byte scale stores
            scale_off = tl.multiple_of(scale_off, 16)
        x_off = rows.to(tl.int64) * H
        k0 = 0
        while k0 < H:
            cols = k0 + tl.arange(0, BLOCK_K)
            m = ok[:, None] & (cols < H)[None, :]
            if x_ptr.dtype.element_ty == tl.int16:  # bf16 as raw bits: exact widening (interpreter-safe)
                x = bf16_bits_to_fp32(tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=m, other=0))
            else:
                x = tl.load(x_ptr + x_off[:, None] + cols[None, :], mask=m, other=0.0)
            q, s = quantize_tile(x, BLOCK_K, FLOOR, HW_CAST)
            tl.store(data_base_ptr + data_off[:, None] + cols[None, :], q, mask=m)
            scols = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            ms = ok[:, None] & (scols < n_scale_cols)[None, :]
            tl.store(scale_base_ptr + scale_off[:, None] + scols[None, :], s, mask=ms)
            k0 += BLOCK_K
        blk += NPROG


def push_rows_mxfp8(
    x: torch.Tensor,
    dst_rank: torch.Tensor,
    dst_row: torch.Tensor,
    data_base: torch.Tensor,
    scale_base: torch.Tensor,
    dst_delta: torch.Tensor,
    scale_mode: str,
    *,
    block_m: int = 4,
    block_k: int = 512,
) -> None:
    """Quantize ``x`` and scatter it to the peers.

    Args:
        x: bf16/fp32 ``[n, H]`` contiguous, ``H % 32 == 0``.
        dst_rank / dst_row: int32 ``[n]`` destination rank and row (``-1`` skips a row).
        data_base: uint8 ``[rows, H]`` local data region; rank r's is at ``+ dst_delta[r]`` bytes.
        scale_base: uint8 ``[rows, H // 32]`` local scale region, in the *same* allocation as
            ``data_base`` on every rank (so the same byte delta applies).
        dst_delta: int64 ``[W]`` byte offsets of every rank's allocation from the local one.
    """
    n, H = x.shape
    if n == 0:
        return
    block_k = min(block_k, triton.next_power_of_2(H))
    nprog = min(num_persistent_programs(x.device), triton.cdiv(n, block_m))
    x_arg = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    _push_rows_mxfp8_kernel[(nprog,)](
        x_arg, n, H, dst_rank, dst_row, data_base, scale_base, dst_delta,
        FLOOR=scale_mode == "floor", SCALES_ALIGNED=(H // 32) % 16 == 0 and block_k >= 512,
        HW_CAST=use_hw_cast(x), BLOCK_M=block_m, BLOCK_K=block_k, NPROG=nprog,
        num_warps=TUNING["num_warps"],
    )
