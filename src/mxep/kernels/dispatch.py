"""The fused dispatch kernel: read each row of ``x`` once, find its destination from the plan in
registers, quantize it to MXFP8 in registers and store e4m3 bytes and e8m0 scales straight into
the owner's receive buffer at the row's final expert-major, padded position (peer addressing as in
:mod:`mxep.kernels.rows`). With ``QUANTIZE=False`` the same kernel moves bf16 rows (the combine's
backward)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep.kernels._host import cdiv, next_power_of_2

from mxep.kernels.mxfp8_tile import bf16_bits_to_fp32, quantize_tile
from mxep.kernels.plan import DispatchPlan, route_rows
from mxep.kernels.quantize import use_hw_cast
from mxep.kernels.rows import TUNING, num_persistent_programs

__all__ = ["dispatch_push"]


@triton.jit
def _dispatch_push_kernel(
    x_ptr, n_rows, H, rank, capacity,
    row_base_ptr, src_end_ptr, E,
    data_base_ptr, scale_base_ptr, dst_delta_ptr, out_data_ptr, out_scale_ptr,
    QUANTIZE: tl.constexpr, FLOOR: tl.constexpr, SCALES_ALIGNED: tl.constexpr, HW_CAST: tl.constexpr,
    L: tl.constexpr, E_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NPROG: tl.constexpr,
):
    # Work items are (row block, column chunk) pairs, item t = block * NK + chunk, dealt round
    # robin to the persistent programs. Each item is independent: it finds its rows' destination
    # (an E-wide compare, cached plan vectors), quantizes its chunk and stores it. The tuned tile
    # is one whole row (NK = 1 up to H = 8192).
    pid = tl.program_id(0)
    NK = tl.cdiv(H, BLOCK_K)
    total = tl.cdiv(n_rows, BLOCK_M) * NK
    n_scale_cols = H // 32
    t = pid
    while t < total:
        raw = _load_item(x_ptr, t, n_rows, H, NK, total, BLOCK_M, BLOCK_K)
        blk = t // NK
        k0 = (t - blk * NK) * BLOCK_K
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        in_range = rows < n_rows
        src = tl.zeros([BLOCK_M], tl.int32) + rank
        g, drow = route_rows(row_base_ptr, src_end_ptr, src, rows, in_range, E, E_P)
        ok = in_range & (g < E) & (drow >= 0) & (drow < capacity)   # never write outside the buffer
        # Rows for this rank's own experts go straight into the output tensor (the copy-out
        # then skips them); the others into the owner's receive region.
        own = (g // L) == rank
        delta = tl.load(dst_delta_ptr + g // L, mask=ok & ~own, other=0)
        drow = drow.to(tl.int64)
        data_off = tl.multiple_of(delta + drow * H, 16)
        own_off = tl.multiple_of(drow * H, 16)
        cols = k0 + tl.arange(0, BLOCK_K)
        cm = (cols < H)[None, :]
        m_peer = (ok & ~own)[:, None] & cm
        m_own = (ok & own)[:, None] & cm
        if QUANTIZE:
            if x_ptr.dtype.element_ty == tl.int16:  # bf16 as raw bits: exact widening (interpreter-safe)
                x = bf16_bits_to_fp32(raw)
            else:
                x = raw
            q, s = quantize_tile(x, BLOCK_K, FLOOR, HW_CAST)
            tl.store(data_base_ptr + data_off[:, None] + cols[None, :], q, mask=m_peer)
            tl.store(out_data_ptr + own_off[:, None] + cols[None, :], q, mask=m_own)
            scale_off = delta + drow * n_scale_cols
            own_scale_off = drow * n_scale_cols
            if SCALES_ALIGNED:  # H // 32 % 16 == 0 (e.g. 2048, 5120, 7168): 16-byte scale stores
                scale_off = tl.multiple_of(scale_off, 16)
                own_scale_off = tl.multiple_of(own_scale_off, 16)
            scols = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            scm = (scols < n_scale_cols)[None, :]
            tl.store(scale_base_ptr + scale_off[:, None] + scols[None, :], s, mask=(ok & ~own)[:, None] & scm)
            tl.store(out_scale_ptr + own_scale_off[:, None] + scols[None, :], s, mask=(ok & own)[:, None] & scm)
        else:
            tl.store(data_base_ptr + data_off[:, None] + cols[None, :], raw, mask=m_peer)
            tl.store(out_data_ptr + own_off[:, None] + cols[None, :], raw, mask=m_own)
        t += NPROG


@triton.jit
def _load_item(x_ptr, t, n_rows, H, NK, total, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of work item ``t`` (zeros past the rows/columns, or when
    ``t >= total``). Rows are read once: ``evict_first`` keeps them from crowding L2."""
    blk = t // NK
    k0 = (t - blk * NK) * BLOCK_K
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = k0 + tl.arange(0, BLOCK_K)
    m = ((rows < n_rows) & (t < total))[:, None] & (cols < H)[None, :]
    return tl.load(x_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :], mask=m, other=0,
                   eviction_policy="evict_first")


def dispatch_push(
    x: torch.Tensor,
    plan: DispatchPlan,
    rank: int,
    capacity: int,
    data_base: torch.Tensor,
    scale_base: torch.Tensor | None,
    dst_delta: torch.Tensor,
    scale_mode: str | None,
    out_data: torch.Tensor,
    out_scale: torch.Tensor | None,
    *,
    block_m: int | None = None,
    block_k: int | None = None,
) -> None:
    """Send every row of ``x`` to its expert's owner, into the expert-major padded layout.

    Rows whose expert lives on this rank skip the receive region: they are written straight
    into this rank's output tensors ``out_data [cap, H]`` / ``out_scale [cap, H // 32]``
    (same dtypes as the regions), at the same row; :func:`~mxep.kernels.rows.copy_out` with
    ``skip_own=True`` then copies only the rows that came from other ranks.

    Args:
        x: ``[n, H]`` contiguous rows of this rank (bf16, or fp32 when quantizing).
        plan: the :class:`~mxep.kernels.plan.DispatchPlan` of this call.
        data_base: the local receive region: uint8 ``[rows, H]`` when quantizing (``scale_mode``
            given), else bf16 ``[rows, H]``; rank r's region is at ``+ dst_delta[r]`` elements.
        scale_base: uint8 ``[rows, H // 32]`` local scale region in the same allocation (the same
            byte delta applies), or None for bf16 rows.
        dst_delta: int64 ``[W]`` offsets of every rank's allocation from the local one, in
            elements of ``data_base``.
    """
    n, H = x.shape
    if n == 0:
        return
    quantize = scale_mode is not None
    block_m = block_m or TUNING["dispatch_block_m"]
    block_k = min(block_k or TUNING["dispatch_block_k"], next_power_of_2(H))
    items = cdiv(n, block_m) * cdiv(H, block_k)
    nprog = min(num_persistent_programs(x.device), items)
    W, E = plan.src_end.shape
    x_arg = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    data_arg = data_base if quantize else data_base.view(torch.int16)
    out_arg = out_data if quantize else out_data.view(torch.int16)
    _dispatch_push_kernel[(nprog,)](
        x_arg, n, H, rank, capacity,
        plan.row_base, plan.src_end, E,
        data_arg, scale_base if quantize else data_arg, dst_delta,
        out_arg, out_scale if quantize else out_arg,
        QUANTIZE=quantize, FLOOR=scale_mode == "floor",
        SCALES_ALIGNED=(H // 32) % 16 == 0 and block_k >= 512, HW_CAST=quantize and use_hw_cast(x),
        L=E // W, E_P=max(next_power_of_2(E), 2),
        BLOCK_M=block_m, BLOCK_K=block_k, NPROG=nprog, num_warps=TUNING["dispatch_warps"],
    )
