"""Row-movement kernels over peer memory (symmetric memory on GPUs, or a simulated world).

Addressing peers: every kernel gets a *local* base pointer (a kernel argument, so Triton knows it
is 16-byte aligned) and an int64 table ``delta[W]`` = (peer base address - local base address) in
elements. The row of rank ``r`` lives at ``base + delta[r] + row * stride``. Because every region
starts 256-byte aligned and rows are multiples of 16 bytes, ``delta + row * stride`` is a multiple
of 16 elements-bytes, which we tell the compiler (``tl.multiple_of``) so stores stay 16 bytes wide
even though the destination differs per row. The same code runs on one process holding several
"ranks'" buffers (the simulated world used by tests) and on real NVLink peers.

Kernels are persistent (grid = a fixed number of programs looping over row blocks) and read
their row bound from device memory where the host does not know it: no host sync, CUDA-graph safe.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["push_rows", "copy_rows", "put_counts", "num_persistent_programs"]


# Persistent-grid knobs for the peer-store kernels; overridable for tuning (scripts/tune_dispatch.py).
TUNING = {"programs_per_sm": 4, "num_warps": 4}


def num_persistent_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs of a persistent grid: a few per SM on GPUs; a handful under the CPU interpreter
    (which runs programs one after another, so more programs only add overhead)."""
    if device.type == "cuda":
        per_sm = per_sm or TUNING["programs_per_sm"]
        return torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    return 4


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _push_rows_kernel(
    src_ptr, src_stride, n_rows, bound_ptr,
    dst_rank_ptr, dst_row_ptr,
    dst_base_ptr, dst_delta_ptr, dst_stride,
    n_cols,
    HAS_BOUND: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPROG: tl.constexpr,
):
    pid = tl.program_id(0)
    end = n_rows
    if HAS_BOUND:
        end = tl.minimum(tl.load(bound_ptr).to(tl.int64), n_rows)
    num_blocks = tl.cdiv(end, BLOCK_M)
    blk = pid
    while blk < num_blocks:
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        in_range = rows < end
        rank = tl.load(dst_rank_ptr + rows, mask=in_range, other=-1)
        ok = in_range & (rank >= 0)
        drow = tl.load(dst_row_ptr + rows, mask=ok, other=0).to(tl.int64)
        delta = tl.load(dst_delta_ptr + rank, mask=ok, other=0)
        dst_off = delta + drow * dst_stride
        if ALIGNED:
            dst_off = tl.multiple_of(dst_off, 16)
        src_off = rows.to(tl.int64) * src_stride
        c0 = 0
        while c0 < n_cols:
            cols = c0 + tl.arange(0, BLOCK_N)
            m = ok[:, None] & (cols < n_cols)[None, :]
            v = tl.load(src_ptr + src_off[:, None] + cols[None, :], mask=m)
            tl.store(dst_base_ptr + dst_off[:, None] + cols[None, :], v, mask=m)
            c0 += BLOCK_N
        blk += NPROG


def push_rows(
    src: torch.Tensor,
    dst_rank: torch.Tensor,
    dst_row: torch.Tensor,
    dst_base: torch.Tensor,
    dst_delta: torch.Tensor,
    *,
    bound: torch.Tensor | None = None,
    block_m: int = 8,
    block_n: int = 512,
) -> None:
    """Copy row ``i`` of ``src [R, C]`` to row ``dst_row[i]`` of rank ``dst_rank[i]``'s buffer.

    Args:
        src: ``[R, C]`` contiguous rows (any dtype; ``dst_base`` must have the same dtype).
        dst_rank: int32 ``[R]``; ``-1`` skips the row (pad rows, unused slots).
        dst_row: int32 ``[R]`` destination row index.
        dst_base: the *local* destination region, ``[rows, C]`` contiguous, same dtype as ``src``;
            rank r's region is at ``dst_base + dst_delta[r]`` (elements).
        dst_delta: int64 ``[W]`` element offsets of every rank's region from ``dst_base``.
        bound: optional int32 device scalar: only rows ``< bound`` are moved (no host sync).
    """
    R, C = src.shape
    if R == 0:
        return
    assert src.is_contiguous() and dst_base.is_contiguous() and src.dtype == dst_base.dtype
    nprog = min(num_persistent_programs(src.device), triton.cdiv(R, block_m))
    aligned = (C * src.element_size()) % 16 == 0
    _push_rows_kernel[(nprog,)](
        src, C, R, bound if bound is not None else dst_rank,
        dst_rank, dst_row,
        dst_base, dst_delta, C,
        C,
        HAS_BOUND=bound is not None, ALIGNED=aligned,
        BLOCK_M=block_m, BLOCK_N=min(block_n, triton.next_power_of_2(C)), NPROG=nprog,
        num_warps=TUNING["num_warps"],
    )


@triton.jit
def _copy_rows_kernel(src_ptr, dst_ptr, n_rows, bound_ptr, n_cols,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPROG: tl.constexpr):
    pid = tl.program_id(0)
    end = tl.minimum(tl.load(bound_ptr).to(tl.int64), n_rows)
    num_blocks = tl.cdiv(end, BLOCK_M)
    blk = pid
    while blk < num_blocks:
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        off = rows.to(tl.int64) * n_cols
        c0 = 0
        while c0 < n_cols:
            cols = c0 + tl.arange(0, BLOCK_N)
            m = (rows < end)[:, None] & (cols < n_cols)[None, :]
            v = tl.load(src_ptr + off[:, None] + cols[None, :], mask=m)
            tl.store(dst_ptr + off[:, None] + cols[None, :], v, mask=m)
            c0 += BLOCK_N
        blk += NPROG


def copy_rows(src: torch.Tensor, dst: torch.Tensor, bound: torch.Tensor, *, block_m: int = 8,
              block_n: int = 1024) -> None:
    """``dst[:b] = src[:b]`` with ``b = bound`` read on the device (int32 scalar tensor).

    Rows past the bound are not touched, so copying out of a worst-case-sized receive buffer costs
    the rows actually received, not the capacity."""
    R, C = src.shape
    if R == 0:
        return
    assert src.is_contiguous() and dst.is_contiguous() and src.shape == dst.shape
    nprog = min(num_persistent_programs(src.device), triton.cdiv(R, block_m))
    _copy_rows_kernel[(nprog,)](src, dst, R, bound, C, BLOCK_M=block_m,
                                BLOCK_N=min(block_n, triton.next_power_of_2(C)), NPROG=nprog,
                                num_warps=TUNING["num_warps"])


@triton.jit
def _put_counts_kernel(counts_ptr, dst_base_ptr, dst_delta_ptr, my_rank, E,
                       BLOCK_E: tl.constexpr):
    peer = tl.program_id(0)
    delta = tl.load(dst_delta_ptr + peer)
    e0 = 0
    while e0 < E:
        e = e0 + tl.arange(0, BLOCK_E)
        m = e < E
        c = tl.load(counts_ptr + e, mask=m)
        tl.store(dst_base_ptr + delta + my_rank * E + e, c, mask=m)
        e0 += BLOCK_E


def put_counts(counts: torch.Tensor, dst_base: torch.Tensor, dst_delta: torch.Tensor, my_rank: int) -> None:
    """Write this rank's ``counts`` (int32 ``[E]``) into row ``my_rank`` of every rank's count
    matrix (int32 ``[W, E]`` at ``dst_base + dst_delta[peer]``): the device-side counts exchange."""
    W = dst_delta.numel()
    E = counts.numel()
    _put_counts_kernel[(W,)](counts, dst_base, dst_delta, my_rank, E,
                             BLOCK_E=min(1024, triton.next_power_of_2(E)))
