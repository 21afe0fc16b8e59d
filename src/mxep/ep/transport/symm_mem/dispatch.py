"""The dispatch kernels: the fused quantize + peer-store push, and the local copy-out after it.

The push reads each row of ``x`` once, finds its destination from the plan in registers,
quantizes it to MXFP8 in registers and stores e4m3 bytes and e8m0 scales straight into the
owner's receive buffer at the row's final expert-major, padded position. With ``QUANTIZE=False``
the same kernel moves bf16 rows (the combine's backward).

Addressing peers: every kernel gets a *local* base pointer (a kernel argument, so Triton knows it
is 16-byte aligned) and an int64 table ``delta[W]`` = (peer base address - local base address) in
elements. The row of rank ``r`` lives at ``base + delta[r] + row * stride``. Because every region
starts 256-byte aligned and rows are multiples of 16 bytes, ``delta + row * stride`` is a multiple
of 16 bytes, which we tell the compiler (``tl.multiple_of``) so stores stay 16 bytes wide even
though the destination differs per row. The same code runs on one process holding several
"ranks'" buffers (the simulated world used by tests) and on real NVLink peers.

Kernels are persistent (grid = a fixed number of programs looping over row blocks) and read
their row bound from device memory where the host does not know it: no host sync, CUDA-graph safe.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, next_power_of_2, padded_group_rows_jit
from mxep.ep.config import EPConfig
from mxep.ep.transport.symm_mem.plan import DispatchPlan, route_rows, work_item, work_steps
from mxep.format.blocked import scale_offsets_jit
from mxep.format.tile import bf16_bits_to_fp32, quantize_tile

__all__ = ["dispatch_push", "copy_out"]


@triton.jit
def _dispatch_push_kernel(
    x_ptr, n_rows, H, rank, capacity,
    row_base_ptr, src_end_ptr, E,
    data_base_ptr, scale_base_ptr, dst_delta_ptr, out_data_ptr, out_scale_ptr,
    group_end_ptr, recv_ptr,
    QUANTIZE: tl.constexpr, FLOOR: tl.constexpr, SCALES_ALIGNED: tl.constexpr, HW_CAST: tl.constexpr,
    BLOCKED: tl.constexpr, SPREAD: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr,
    E_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NPROG: tl.constexpr,
):
    # Work items, dealt round robin to the persistent programs:
    # * first, this rank's own pad rows: zeros into the output (local stores; the copy-out then
    #   moves only received rows);
    # * then (row block, column chunk) pairs, item t = block * NK + chunk. Each finds its rows'
    #   destination (an E-wide compare, cached plan vectors), quantizes its chunk and stores it.
    #   The tuned tile is one whole row (NK = 1 up to H = 8192).
    # Order: rows are sorted by expert, hence by owner; walked from row 0, every rank would
    # store to owner 0 first, then owner 1, ... (W - 1 senders into one receiver's NVLink at a
    # time). SPREAD walks the rows interleaved (plan.work_item): every rank stores into all its
    # owners at once, in proportion to its rows for them.
    pid = tl.program_id(0)
    NK = tl.cdiv(H, BLOCK_K)
    total = tl.cdiv(n_rows, BLOCK_M) * NK
    n_scale_cols = H // 32
    pad_end, num_pads, pad_cum = _own_pads(group_end_ptr, recv_ptr, rank, L, L_P, ALIGN)
    t = pid
    while t < num_pads:
        _zero_pad_row(out_data_ptr, out_scale_ptr, t, pad_end, pad_cum, group_end_ptr, rank, H, n_scale_cols,
                      capacity, QUANTIZE, BLOCKED, L, L_P, BLOCK_K)
        t += NPROG
    u = t - num_pads
    while u < work_steps(total, SPREAD):
        t_rot = work_item(u, total, SPREAD)
        raw = _load_item(x_ptr, t_rot, n_rows, H, NK, total, BLOCK_M, BLOCK_K)
        blk = t_rot // NK
        k0 = (t_rot - blk * NK) * BLOCK_K
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
            scols = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            scm = (scols < n_scale_cols)[None, :]
            if BLOCKED:
                # sm_100's blocked layout (mxep/format/blocked.py), written by this same store:
                # a row's scales go out as 4-byte words, 512 bytes apart (the layout is the
                # same in the owner's region and in the output, so the copy-out moves words)
                own_so = scale_offsets_jit(drow[:, None], scols[None, :], n_scale_cols, True)
                tl.store(scale_base_ptr + delta[:, None] + own_so, s, mask=(ok & ~own)[:, None] & scm)
                tl.store(out_scale_ptr + own_so, s, mask=(ok & own)[:, None] & scm)
            else:
                scale_off = delta + drow * n_scale_cols
                own_scale_off = drow * n_scale_cols
                if SCALES_ALIGNED:  # H // 32 % 16 == 0 (e.g. 2048, 5120, 7168): 16-byte scale stores
                    scale_off = tl.multiple_of(scale_off, 16)
                    own_scale_off = tl.multiple_of(own_scale_off, 16)
                tl.store(scale_base_ptr + scale_off[:, None] + scols[None, :], s, mask=(ok & ~own)[:, None] & scm)
                tl.store(out_scale_ptr + own_scale_off[:, None] + scols[None, :], s, mask=(ok & own)[:, None] & scm)
        else:
            tl.store(data_base_ptr + data_off[:, None] + cols[None, :], raw, mask=m_peer)
            tl.store(out_data_ptr + own_off[:, None] + cols[None, :], raw, mask=m_own)
        u += NPROG


@triton.jit
def _own_pads(group_end_ptr, recv_ptr, rank, L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr):
    """This rank's pad rows: ``(pad_end [L_P], total, pad_cum [L_P])`` where local expert ``ex``'s
    pad rows are the last ``pads[ex]`` rows before ``group_end[ex]`` and ``pad_cum`` is the
    inclusive cumsum of ``pads`` (pad item ``q`` belongs to ``#{ex : pad_cum[ex] <= q}``)."""
    e = tl.arange(0, L_P)
    em = e < L
    recv = tl.load(recv_ptr + rank * L + e, mask=em, other=0)
    pads = tl.where(em, padded_group_rows_jit(recv, ALIGN) - recv, 0)
    pad_cum = tl.cumsum(pads, axis=0)
    pad_end = tl.where(em, pad_cum, 2147483647)
    return pad_end, tl.sum(pads, axis=0), pad_cum


@triton.jit
def _zero_pad_row(out_data_ptr, out_scale_ptr, q, pad_end, pad_cum, group_end_ptr, rank, H, n_scale_cols,
                  capacity, QUANTIZE: tl.constexpr, BLOCKED: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """Write zeros (data and, when quantizing, e8m0 scale bytes, row-major or ``BLOCKED``) into
    pad row ``q`` of this rank."""
    ex = tl.minimum(tl.sum((pad_end <= q).to(tl.int32), axis=0), L - 1)
    e = tl.arange(0, L_P)
    cum = tl.sum(tl.where(e == ex, pad_cum, 0), axis=0)
    row = (tl.load(group_end_ptr + rank * L + ex) - (cum - q)).to(tl.int64)
    inside = (row >= 0) & (row < capacity)          # inconsistent counts: never write outside
    k0 = 0
    while k0 < H:
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_data_ptr + row * H + cols, tl.zeros([BLOCK_K], out_data_ptr.dtype.element_ty),
                 mask=(cols < H) & inside)
        if QUANTIZE:
            scols = k0 // 32 + tl.arange(0, BLOCK_K // 32)
            tl.store(out_scale_ptr + scale_offsets_jit(row, scols, n_scale_cols, BLOCKED),
                     tl.zeros([BLOCK_K // 32], out_scale_ptr.dtype.element_ty), mask=(scols < n_scale_cols) & inside)
        k0 += BLOCK_K


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


def dispatch_push(x: torch.Tensor, plan: DispatchPlan, rank: int, capacity: int, data_base: torch.Tensor,
                  scale_base: torch.Tensor | None, dst_delta: torch.Tensor, scale_mode: str | None,
                  out_data: torch.Tensor, out_scale: torch.Tensor | None, config: EPConfig,
                  blocked_scales: bool = False) -> None:
    """Send every row of ``x`` to its expert's owner, into the expert-major padded layout.

    Rows whose expert lives on this rank skip the receive region: they are written straight
    into this rank's output tensors ``out_data [cap, H]`` / ``out_scale [cap, H // 32]``
    (same dtypes as the regions), at the same row, and this rank's pad rows get their zeros
    there too; :func:`copy_out` then copies only the rows that came from other ranks.

    Args:
        x: ``[n, H]`` contiguous rows of this rank (bf16, or fp32 when quantizing).
        plan: the :class:`~mxep.ep.transport.symm_mem.plan.DispatchPlan` of this call.
        data_base: the local receive region: uint8 ``[rows, H]`` when quantizing (``scale_mode``
            given), else bf16 ``[rows, H]``; rank r's region is at ``+ dst_delta[r]`` elements.
        scale_base: uint8 ``[rows, H // 32]`` local scale region in the same allocation (the same
            byte delta applies), or None for bf16 rows.
        dst_delta: int64 ``[W]`` offsets of every rank's allocation from the local one, in
            elements of ``data_base``.
        blocked_scales: write the scales (in the owners' regions and in ``out_scale``) in the
            blocked layout of :mod:`mxep.format.blocked` instead of row-major (``capacity`` a
            multiple of 128, ``H % 128 == 0``, every group a multiple of 128 rows).
    """
    n, H = x.shape
    quantize = scale_mode is not None
    t = config.dispatch
    block_m, block_k = t.block_m, min(t.block_n, next_power_of_2(H))
    W, E = plan.src_end.shape
    # row items + at most L * align pad rows (the exact count is on the device); even a rank that
    # sends nothing launches: its pad rows still need zeros.
    items = cdiv(n, block_m) * cdiv(H, block_k) + (E // W) * plan.align
    nprog = min(config.num_programs(t, x.device), items)
    x_arg = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    data_arg = data_base if quantize else data_base.view(torch.int16)
    out_arg = out_data if quantize else out_data.view(torch.int16)
    _dispatch_push_kernel[(nprog,)](
        x_arg, n, H, rank, capacity,
        plan.row_base, plan.src_end, E,
        data_arg, scale_base if quantize else data_arg, dst_delta,
        out_arg, out_scale if quantize else out_arg, plan.group_end, plan.recv,
        QUANTIZE=quantize, FLOOR=scale_mode == "floor",
        SCALES_ALIGNED=(H // 32) % 16 == 0 and block_k >= 512, HW_CAST=quantize and x.is_cuda and config.hw_cast,
        BLOCKED=quantize and blocked_scales, SPREAD=config.spread_parts, L=E // W,
        L_P=max(next_power_of_2(E // W), 2), ALIGN=plan.align,
        E_P=max(next_power_of_2(E), 2), BLOCK_M=block_m, BLOCK_K=block_k, NPROG=nprog, num_warps=t.warps,
    )


@triton.jit
def _copy_rows_masked(src_ptr, dst_ptr, rows, n_cols, data, BLOCK_N: tl.constexpr):
    off = rows.to(tl.int64) * n_cols
    c0 = 0
    while c0 < n_cols:
        cols = c0 + tl.arange(0, BLOCK_N)
        cm = (cols < n_cols)[None, :]
        v = tl.load(src_ptr + off[:, None] + cols[None, :], mask=data[:, None] & cm, other=0)
        tl.store(dst_ptr + off[:, None] + cols[None, :], v, mask=data[:, None] & cm)
        c0 += BLOCK_N


@triton.jit
def _copy_scale_rows_masked(src_ptr, dst_ptr, rows, n_cols, data, BLOCKED: tl.constexpr, BLOCK_N: tl.constexpr):
    """:func:`_copy_rows_masked` of scale rows kept in the same layout in ``src`` and ``dst``
    (row-major, or blocked: each row's bytes at the blocked offsets)."""
    c0 = 0
    while c0 < n_cols:
        cols = c0 + tl.arange(0, BLOCK_N)
        m = data[:, None] & (cols < n_cols)[None, :]
        off = scale_offsets_jit(rows[:, None], cols[None, :], n_cols, BLOCKED)
        tl.store(dst_ptr + off, tl.load(src_ptr + off, mask=m, other=0), mask=m)
        c0 += BLOCK_N


@triton.jit
def _copy_out_kernel(src_ptr, dst_ptr, n_cols, src2_ptr, dst2_ptr, n_cols2, capacity, group_end_ptr, recv_ptr,
                     recv_cum_ptr, rank, E,
                     HAS_SECOND: tl.constexpr, BLOCKED: tl.constexpr, ALIGN: tl.constexpr, L: tl.constexpr,
                     L_P: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, NPROG: tl.constexpr):
    pid = tl.program_id(0)
    e = tl.arange(0, L_P)
    ends = tl.load(group_end_ptr + e, mask=e < L, other=2147483647)
    end = tl.minimum(tl.max(tl.where(e < L, ends, 0), axis=0), capacity)
    num_blocks = tl.cdiv(end, BLOCK_M)
    blk = pid
    while blk < num_blocks:
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < end
        # local expert of each row, and whether the row is padding (past its group's tokens)
        ex = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        g_end = tl.load(group_end_ptr + ex, mask=live, other=0)
        recv = tl.load(recv_ptr + ex, mask=live, other=0)
        padded = padded_group_rows_jit(recv, ALIGN)
        data = live & (rows < g_end - padded + recv)
        # Rows this rank sent to itself were written into dst by the push, and so were the pad
        # rows' zeros: leave them.
        g = rank * L + ex
        p = rows - (g_end - padded)
        hi = tl.load(recv_cum_ptr + rank * E + g, mask=live, other=0)
        lo = tl.load(recv_cum_ptr + (rank - 1) * E + g, mask=live & (rank > 0), other=0)
        data = data & ~((p >= lo) & (p < hi))
        _copy_rows_masked(src_ptr, dst_ptr, rows, n_cols, data, BLOCK_N)
        if HAS_SECOND:  # the scales of the same rows: one launch for data and scales
            if BLOCKED:
                _copy_scale_rows_masked(src2_ptr, dst2_ptr, rows, n_cols2, data, True, BLOCK_N2)
            else:
                _copy_rows_masked(src2_ptr, dst2_ptr, rows, n_cols2, data, BLOCK_N2)
        blk += NPROG


def copy_out(src: torch.Tensor, plan: DispatchPlan, rank: int, out: torch.Tensor, config: EPConfig,
             src2: torch.Tensor | None = None, out2: torch.Tensor | None = None, blocked_scales: bool = False) -> None:
    """After the push's barrier: copy the rows that other ranks stored in this rank's receive
    region ``src [cap, C]`` (and ``src2 [cap, C2]``, the scales, in the same launch) into
    ``out [cap, C]`` (``out2``). The rows this rank sent itself and the pad rows' zeros are
    there already (:func:`dispatch_push`); rows past ``group_end_offsets[-1]`` are left
    unwritten. The bound is read on the device: the cost is the rows received, not the
    capacity. ``blocked_scales``: ``src2`` / ``out2`` hold the blocked layout
    (:mod:`mxep.format.blocked`), both alike, and each row's scale bytes move at their blocked
    offsets."""
    R, C = src.shape
    if R == 0:
        return
    L = plan.num_local_experts
    t = config.copy
    nprog = min(config.num_programs(t, src.device), cdiv(R, t.block_m))
    s_arg = src.view(torch.int16) if src.dtype == torch.bfloat16 else src
    d_arg = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    C2 = src2.shape[1] if src2 is not None else 1
    _copy_out_kernel[(nprog,)](s_arg, d_arg, C, src2 if src2 is not None else s_arg,
                               out2 if out2 is not None else d_arg, C2, R,
                               plan.group_end_offsets(rank), plan.tokens_per_expert(rank),
                               plan.recv_cum, rank, plan.recv_cum.shape[1],
                               HAS_SECOND=src2 is not None, BLOCKED=src2 is not None and blocked_scales,
                               ALIGN=plan.align, L=L, L_P=max(next_power_of_2(L), 2),
                               BLOCK_M=t.block_m, BLOCK_N=min(t.block_n, next_power_of_2(C)),
                               BLOCK_N2=min(t.block_n, next_power_of_2(C2)), NPROG=nprog, num_warps=t.warps)
