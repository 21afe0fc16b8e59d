"""Grouped GEMM over the dispatch layout: ``out[r] = dequant(tokens[r]) @ W[e(r)]^T``.

The tokens are the dispatch's output as it lands: MXFP8 rows ``[cap, K]`` (e4m3 bytes) with
e8m0 scales ``[cap, K/32]``, expert-major, every expert's group padded to ``align`` rows, group
ends in ``group_end_offsets`` (int32 ``[L]``, on the device). Hopper has no MX block-scaled MMA
(reference/mxfp8.md), so each tile is dequantized in registers (exact: an e4m3 value times a
power of two) and fed to bf16 tensor cores with fp32 accumulation, which reproduces MX GEMM
numerics. Groups start at multiples of ``align``, so a tile of ``BLOCK_M`` rows (``BLOCK_M``
dividing ``align``) belongs to one expert, found on the device: no host sync, no permute.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from mxep.kernels._host import cdiv, next_power_of_2

__all__ = ["grouped_mm_mxfp8_forward", "GPU_TILES"]

# (BLOCK_M, BLOCK_N, BLOCK_K, warps) on GPUs; not tuned yet (no device time since it was written).
GPU_TILES = (64, 128, 64, 4)
INTERPRETER_TILES = (16, 32, 32, 1)


@triton.jit
def e4m3_bytes_to_fp32(b):
    """e4m3 bytes (int32 0..255) -> fp32, exactly: sign, 4-bit exponent (bias 7), 3-bit mantissa;
    0x7F / 0xFF are NaN (no infinities in e4m3)."""
    sign = (b >> 7) & 1
    e = (b >> 3) & 15
    m = b & 7
    normal = ((e + 120) << 23) | (m << 20)                      # (1 + m/8) * 2^(e - 7) as fp32 bits
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))   # subnormal: m * 2^-9
    v = tl.where((e == 15) & (m == 7), float("nan"), v)
    return tl.where(sign == 1, -v, v)


@triton.jit
def e8m0_bytes_to_fp32(s):
    """e8m0 scale bytes (int32 0..255) -> 2^(s - 127) as fp32 (0 -> 2^-127, a subnormal; 255 -> NaN)."""
    bits = tl.where(s == 0, 0x400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16_bits(x):
    """fp32 -> bf16 bit patterns (int16), round to nearest even, NaN kept NaN. Written out
    because the CPU interpreter's fp32 -> bf16 cast truncates; on GPUs it is the same as
    ``cvt.rn.bf16.f32``."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def _grouped_mm_mxfp8_kernel(
    q_ptr, s_ptr, w_ptr, ws_ptr, out_ptr, group_end_ptr,
    N, K, L,
    L_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BF16_DOT: tl.constexpr, W_MX: tl.constexpr,
):
    # W_MX: the weights are MXFP8 too (e4m3 bytes [L, N, K], e8m0 scales [L, N, K/32], blocks
    # along K, as an MX GEMM wants them), dequantized in registers like the tokens; else bf16.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    ex = tl.arange(0, L_P)
    ends = tl.load(group_end_ptr + ex, mask=ex < L, other=2147483647)
    end = tl.max(tl.where(ex < L, ends, 0), axis=0)
    row0 = pid_m * BLOCK_M
    if row0 < end:   # rows past the layout are left unwritten, as the dispatch leaves them
        e = tl.sum((ends <= row0).to(tl.int32), axis=0)      # this tile's expert
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        n_scale = K // 32
        w_base = w_ptr + e.to(tl.int64) * N * K
        ws_base = ws_ptr + e.to(tl.int64) * N * n_scale
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        k0 = 0
        while k0 < K:
            km = (k0 + kk) < K
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * K + (k0 + kk)[None, :], mask=km[None, :], other=0)
            sc = tl.load(s_ptr + rows.to(tl.int64)[:, None] * n_scale + ((k0 + kk) // 32)[None, :], mask=km[None, :],
                         other=127)
            a = (e4m3_bytes_to_fp32(q.to(tl.int32)) * e8m0_bytes_to_fp32(sc.to(tl.int32))).to(tl.bfloat16)
            wm = km[:, None] & (cols < N)[None, :]
            if W_MX:
                wq = tl.load(w_base + cols[None, :] * K + (k0 + kk)[:, None], mask=wm, other=0)
                wsc = tl.load(ws_base + cols[None, :] * n_scale + ((k0 + kk) // 32)[:, None], mask=wm, other=127)
                w = (e4m3_bytes_to_fp32(wq.to(tl.int32)) * e8m0_bytes_to_fp32(wsc.to(tl.int32))).to(tl.bfloat16)
            else:
                w = tl.load(w_base + cols[None, :] * K + (k0 + kk)[:, None], mask=wm, other=0.0)
            if BF16_DOT:
                acc += tl.dot(a, w)
            else:   # the CPU interpreter's bf16 dot is wrong (Triton 3.6); bf16 values are exact in fp32
                acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            k0 += BLOCK_K
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], fp32_to_bf16_bits(acc),
                 mask=(cols < N)[None, :])


def grouped_mm_mxfp8_forward(qdata: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                             group_end_offsets: torch.Tensor, align: int, out: torch.Tensor | None = None,
                             tiles: tuple[int, int, int, int] | None = None, bf16_dot: bool | None = None,
                             weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Launcher (shapes checked by :func:`mxep.grouped_mm_mxfp8`): ``qdata`` uint8/e4m3
    ``[cap, K]``, ``scale`` uint8/e8m0 ``[cap, K/32]``, ``weight`` bf16 ``[L, N, K]`` (or, with
    ``weight_scale`` uint8/e8m0 ``[L, N, K/32]``, uint8/e4m3 ``[L, N, K]``),
    ``group_end_offsets`` int32 ``[L]`` -> bf16 ``[cap, N]`` (rows past the last group end
    unwritten)."""
    cap, K = qdata.shape
    L, N, _ = weight.shape
    if out is None:
        out = torch.empty(cap, N, dtype=torch.bfloat16, device=qdata.device)
    if cap == 0 or N == 0:
        return out
    bm, bn, bk, warps = tiles or (GPU_TILES if qdata.is_cuda else INTERPRETER_TILES)
    bm = math.gcd(bm, align)      # a tile never straddles two groups (groups start at multiples of align)
    grid = (cdiv(cap, bm), cdiv(N, bn))
    _grouped_mm_mxfp8_kernel[grid](
        qdata.view(torch.uint8), scale.view(torch.uint8),
        weight if weight_scale is None else weight.view(torch.uint8),
        weight if weight_scale is None else weight_scale.view(torch.uint8),
        out.view(torch.int16), group_end_offsets, N, K, L,
        L_P=max(next_power_of_2(L), 2), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BF16_DOT=qdata.is_cuda if bf16_dot is None else bf16_dot,
        W_MX=weight_scale is not None,
        num_warps=warps,
    )
    return out
