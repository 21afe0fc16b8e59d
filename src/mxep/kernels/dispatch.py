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
from mxep.kernels.rows import TUNING, num_persistent_programs, order_flags, work_item, work_steps
from mxep.kernels.signals import PUSH_FLAG, finish_program, seq_word

_PUSH_FLAG = tl.constexpr(PUSH_FLAG)

__all__ = ["dispatch_push"]


@triton.jit
def _dispatch_push_kernel(
    x_ptr, n_rows, H, rank, capacity,
    row_base_ptr, src_end_ptr, E,
    data_base_ptr, scale_base_ptr, dst_delta_ptr, out_data_ptr, out_scale_ptr,
    group_end_ptr, recv_ptr, sig_ptr, sig_delta_ptr,
    QUANTIZE: tl.constexpr, FLOOR: tl.constexpr, SCALES_ALIGNED: tl.constexpr, HW_CAST: tl.constexpr,
    STAGGER: tl.constexpr, SPREAD: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr, E_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, NPROG: tl.constexpr,
    SIGNAL: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr,
):
    # Work items, dealt round robin to the persistent programs:
    # * first, this rank's own pad rows: zeros into the output (local stores; the copy-out then
    #   moves only received rows);
    # * then (row block, column chunk) pairs, item t = block * NK + chunk. Each finds its rows'
    #   destination (an E-wide compare, cached plan vectors), quantizes its chunk and stores it.
    #   The tuned tile is one whole row (NK = 1 up to H = 8192).
    # Order (TUNING["peer_order"]): rows are sorted by expert, hence by owner; walked from row 0,
    # every rank would store to owner 0 first, then owner 1, ... (W - 1 senders into one
    # receiver's NVLink at a time). STAGGER starts each rank at the first row for owner rank + 1
    # (wrapping around, own rows last): the owners are a permutation of the senders at every
    # phase. SPREAD walks the rows interleaved (rows.work_item): every rank stores into all its
    # owners at once, in proportion to its rows for them.
    pid = tl.program_id(0)
    NK = tl.cdiv(H, BLOCK_K)
    total = tl.cdiv(n_rows, BLOCK_M) * NK
    n_scale_cols = H // 32
    pad_end, num_pads, pad_cum = _own_pads(group_end_ptr, recv_ptr, rank, L, L_P, ALIGN)
    t = pid
    while t < num_pads:
        _zero_pad_row(out_data_ptr, out_scale_ptr, t, pad_end, pad_cum, group_end_ptr, rank, H, n_scale_cols,
                      capacity, QUANTIZE, L, L_P, BLOCK_K)
        t += NPROG
    rot = 0
    if STAGGER:
        # src_end[rank, last own expert]: the first row for owner rank + 1
        own_end = tl.load(src_end_ptr + rank * E + (rank + 1) * L - 1)
        rot = (own_end // BLOCK_M) * NK
    u = t - num_pads
    while u < work_steps(total, SPREAD):
        t_rot = work_item(u, total, rot, SPREAD)
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
        u += NPROG
    if SIGNAL:  # the "flags" sync: the last program to finish tells every owner (kernels/signals.py)
        finish_program(sig_ptr, sig_delta_ptr, rank, _PUSH_FLAG, tl.load(sig_ptr + seq_word(W)), W, W_P, NPROG, False)


@triton.jit
def _own_pads(group_end_ptr, recv_ptr, rank, L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr):
    """This rank's pad rows: ``(pad_end [L_P], total, pad_cum [L_P])`` where local expert ``ex``'s
    pad rows are the last ``pads[ex]`` rows before ``group_end[ex]`` and ``pad_cum`` is the
    inclusive cumsum of ``pads`` (pad item ``q`` belongs to ``#{ex : pad_cum[ex] <= q}``)."""
    e = tl.arange(0, L_P)
    em = e < L
    recv = tl.load(recv_ptr + rank * L + e, mask=em, other=0)
    pads = tl.where(em, tl.maximum((recv + ALIGN - 1) // ALIGN * ALIGN, ALIGN) - recv, 0)
    pad_cum = tl.cumsum(pads, axis=0)
    pad_end = tl.where(em, pad_cum, 2147483647)
    return pad_end, tl.sum(pads, axis=0), pad_cum


@triton.jit
def _zero_pad_row(out_data_ptr, out_scale_ptr, q, pad_end, pad_cum, group_end_ptr, rank, H, n_scale_cols,
                  capacity, QUANTIZE: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Write zeros (data and, when quantizing, e8m0 scale bytes) into pad row ``q`` of this rank."""
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
            tl.store(out_scale_ptr + row * n_scale_cols + scols, tl.zeros([BLOCK_K // 32], out_scale_ptr.dtype.element_ty),
                     mask=(scols < n_scale_cols) & inside)
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
    signals: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_m: int | None = None,
    block_k: int | None = None,
) -> None:
    """Send every row of ``x`` to its expert's owner, into the expert-major padded layout.

    Rows whose expert lives on this rank skip the receive region: they are written straight
    into this rank's output tensors ``out_data [cap, H]`` / ``out_scale [cap, H // 32]``
    (same dtypes as the regions), at the same row, and this rank's pad rows get their zeros
    there too; :func:`~mxep.kernels.rows.copy_out` with ``skip_own=True, pads=False`` then
    copies only the rows that came from other ranks.

    Args:
        x: ``[n, H]`` contiguous rows of this rank (bf16, or fp32 when quantizing).
        plan: the :class:`~mxep.kernels.plan.DispatchPlan` of this call.
        data_base: the local receive region: uint8 ``[rows, H]`` when quantizing (``scale_mode``
            given), else bf16 ``[rows, H]``; rank r's region is at ``+ dst_delta[r]`` elements.
        scale_base: uint8 ``[rows, H // 32]`` local scale region in the same allocation (the same
            byte delta applies), or None for bf16 rows.
        dst_delta: int64 ``[W]`` offsets of every rank's allocation from the local one, in
            elements of ``data_base``.
        signals: the "flags" sync (:mod:`mxep.kernels.signals`): ``(words, delta_i32)``, this
            rank's int32 signal words and the int32-element offsets of every rank's; the last
            program to finish raises this rank's push flag on every owner. None: the caller
            orders the phases with a barrier.
    """
    n, H = x.shape
    quantize = scale_mode is not None
    block_m = block_m or TUNING["dispatch_block_m"]
    block_k = min(block_k or TUNING["dispatch_block_k"], next_power_of_2(H))
    W, E = plan.src_end.shape
    # row items + at most L * align pad rows (the exact count is on the device); even a rank that
    # sends nothing launches: its pad rows still need zeros.
    items = cdiv(n, block_m) * cdiv(H, block_k) + (E // W) * plan.align
    nprog = min(num_persistent_programs(x.device, TUNING["dispatch_programs_per_sm"]), items)
    x_arg = x.view(torch.int16) if x.dtype == torch.bfloat16 else x
    data_arg = data_base if quantize else data_base.view(torch.int16)
    out_arg = out_data if quantize else out_data.view(torch.int16)
    stagger, spread = order_flags()
    _dispatch_push_kernel[(nprog,)](
        x_arg, n, H, rank, capacity,
        plan.row_base, plan.src_end, E,
        data_arg, scale_base if quantize else data_arg, dst_delta,
        out_arg, out_scale if quantize else out_arg, plan.group_end, plan.recv,
        *(signals if signals is not None else (plan.recv, dst_delta)),
        QUANTIZE=quantize, FLOOR=scale_mode == "floor",
        SCALES_ALIGNED=(H // 32) % 16 == 0 and block_k >= 512, HW_CAST=quantize and use_hw_cast(x),
        STAGGER=stagger, SPREAD=spread, L=E // W, L_P=max(next_power_of_2(E // W), 2), ALIGN=plan.align,
        E_P=max(next_power_of_2(E), 2),
        BLOCK_M=block_m, BLOCK_K=block_k, NPROG=nprog,
        SIGNAL=signals is not None, W=W, W_P=max(next_power_of_2(W), 2), num_warps=TUNING["dispatch_warps"],
    )
