"""The kernels around the exchange of the NVSHMEM transport: pack (source), unpack (owner), the
owner's reduce and gradient expansion, the source's sum of partials.

The exchange (:mod:`mxep.ep.transport.nvshmem.exchange`) moves whole rows of one uint8 buffer
``[S, R]``: a source's rows for rank ``d`` are contiguous, in rank order (send row
``send_off[d] + slot[t, d]`` for token ``t``, ``send_off`` the exclusive running sum of the
tokens it sends each rank), and they land on ``d`` packed in source order (received row ``u``,
``recv_off[s] + i`` for source ``s``'s ``i``-th token). One packed row (:func:`packed_row`)::

    forward dispatch   uint8 [0, H) e4m3 | [H, H + H/32) e8m0 | int32 [k] layout rows at RO | fp32 [k] gate weights at WO
    bf16 rows          bf16 [0, H)        (dy to the owners; the owners' partials back)
    weight gradients   fp32 [k]           (the owners' <dy, expert_out[row]> back)

The arithmetic of every reduction is the symmetric-memory kernels' (same fp32 operations in the
same order, same tiles), so both transports give the same bits; the layout rows come from the
same plan (:func:`~mxep.ep.transport.symm_mem.plan.plan_of_counts`) and the same pair tables.
Every index read from memory is bounded before use (slots by the counts, rows by the capacity).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep._utils import next_power_of_2
from mxep.ep.config import EPConfig
from mxep.ep.transport.symm_mem.plan import work_item, work_steps
from mxep.ep.transport.symm_mem.tokens import _num_received, _pick, _zero_pads
from mxep.format.blocked import scale_offsets_jit
from mxep.format.tile import bf16_bits_to_fp32, fp32_to_bf16_bits, quantize_tile

__all__ = ["packed_row", "pack_tokens", "unpack_tokens", "reduce_rows", "sum_partials", "expand_grads",
           "gather_weight_grads"]


def _up(n: int, a: int = 16) -> int:
    return (n + a - 1) // a * a


def packed_row(hidden: int, top_k: int) -> tuple[int, int, int]:
    """``(R, RO, WO)``: bytes of one exchanged row (a multiple of 16, wide enough for every
    message of the module docstring) and the byte offsets of the layout rows and gate weights."""
    RO = _up(hidden + hidden // 32)
    WO = RO + 4 * top_k
    return max(_up(WO + 4 * top_k), _up(2 * hidden)), RO, WO


def _block_k(H: int) -> int:
    return max(next_power_of_2(H), 32)


def _k_p(K: int) -> int:
    return max(next_power_of_2(K), 2)


def _w_p(W: int) -> int:
    return max(next_power_of_2(W), 2)


@triton.jit
def _segment_starts(cnt_ptr, W: tl.constexpr, W_P: tl.constexpr):
    """``(index vector, counts, exclusive running sums)`` of the int32 ``[W]`` counts."""
    dd = tl.arange(0, W_P)
    cnt = tl.maximum(tl.load(cnt_ptr + dd, mask=dd < W, other=0), 0)
    return dd, cnt, tl.cumsum(cnt, axis=0) - cnt


@triton.jit
def _pack_rows_kernel(x_ptr, n_tok, H, slot_ptr, cnt_ptr, send_u8, send_i16, send_i32, R, RO, WO,
                 rows_ptr, owner_ptr, w_ptr,
                 QUANTIZE: tl.constexpr, TABLES: tl.constexpr, FLOOR: tl.constexpr, HW_CAST: tl.constexpr,
                 K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, BLOCK_K: tl.constexpr,
                 SPREAD: tl.constexpr, NPROG: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    scols = tl.arange(0, BLOCK_K // 32)
    scm = scols < H // 32
    jj = tl.arange(0, K_P)
    jm = jj < K
    dd, cnt, off = _segment_starts(cnt_ptr, W, W_P)
    u = pid
    while u < work_steps(n_tok, SPREAD):
        t = work_item(u, n_tok, SPREAD)
        live = t < n_tok
        t64 = t.to(tl.int64)
        raw = tl.load(x_ptr + t64 * H + cols, mask=live & cm, other=0, eviction_policy="evict_first")
        if QUANTIZE:
            q, sc = quantize_tile(bf16_bits_to_fp32(raw)[None, :], BLOCK_K, FLOOR, HW_CAST)
            q = tl.reshape(q, [BLOCK_K])
            sc = tl.reshape(sc, [BLOCK_K // 32])
        if TABLES:
            prow = tl.load(rows_ptr + t64 * K + jj, mask=live & jm, other=-1)
            pown = tl.load(owner_ptr + t64 * K + jj, mask=live & jm, other=-1)
            pw = tl.load(w_ptr + t64 * K + jj, mask=live & jm, other=0.0)
        for d in tl.static_range(W):
            slot = tl.load(slot_ptr + t64 * W + d, mask=live, other=-1)
            ok = live & (slot >= 0) & (slot < _pick(cnt, dd, d))
            row = (_pick(off, dd, d) + slot).to(tl.int64)
            if QUANTIZE:
                tl.store(send_u8 + row * R + cols, q, mask=ok & cm)
                tl.store(send_u8 + row * R + H + scols, sc, mask=ok & scm)
            else:
                tl.store(send_i16 + row * (R // 2) + cols, raw, mask=ok & cm)
            if TABLES:
                tl.store(send_i32 + row * (R // 4) + RO // 4 + jj, tl.where(pown == d, prow, -1), mask=ok & jm)
                tl.store(send_i32 + row * (R // 4) + WO // 4 + jj, pw.to(tl.int32, bitcast=True), mask=ok & jm)
        u += NPROG


def pack_tokens(x: torch.Tensor, slot: torch.Tensor, tok_send: torch.Tensor, send: torch.Tensor, config: EPConfig,
                scale_mode: str | None = None, tables: tuple | None = None, offsets: tuple[int, int] = (0, 0)) -> None:
    """Source side: token ``t`` of ``x`` bf16 ``[t, H]`` into send row ``send_off[d] + slot[t, d]``
    of ``send`` uint8 ``[S, R]`` for every rank ``d`` with ``slot[t, d] >= 0`` (``slot`` int32
    ``[t, W]``, ``tok_send`` int32 ``[W]`` the tokens sent to each rank). ``scale_mode`` given:
    the MXFP8 row (quantized here, once per token), else the bf16 row. ``tables``: ``(pair_rows
    int32 [t, k], pair_owner int32 [t, k], pair_weights fp32 [t, k])``, and ``offsets`` ``(RO,
    WO)``: also the layout rows of the token's pairs owned by ``d`` (``-1`` for the others) and
    its gate weights."""
    n, H = x.shape
    W = slot.shape[1]
    if n == 0:
        return
    R = send.shape[1]
    t = config.dispatch
    nprog = min(config.num_programs(t, x.device), n)
    quantize = scale_mode is not None
    rows, owner, w = tables if tables is not None else (slot, slot, slot)
    K = rows.shape[1] if tables is not None else 1
    _pack_rows_kernel[(nprog,)](
        x.view(torch.int16), n, H, slot, tok_send, send, send.view(torch.int16), send.view(torch.int32), R,
        offsets[0], offsets[1], rows, owner, w,
        QUANTIZE=quantize, TABLES=tables is not None, FLOOR=scale_mode == "floor",
        HW_CAST=quantize and x.is_cuda and config.hw_cast, K=K, K_P=_k_p(K), W=W, W_P=_w_p(W),
        BLOCK_K=_block_k(H), SPREAD=config.spread_parts, NPROG=nprog, num_warps=t.warps)


@triton.jit
def _unpack_rows_kernel(recv_u8, recv_i32, R, RO, WO, cnt_ptr, T, H, rank, capacity, group_end_ptr, recv_ptr,
                   out_data_ptr, out_scale_ptr, rows_out_ptr, w_out_ptr,
                   BLOCKED: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr,
                   L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr,
                   NPROG: tl.constexpr):
    u = _zero_pads(out_data_ptr, out_scale_ptr, group_end_ptr, recv_ptr, rank, H, capacity, True, BLOCKED, L, L_P,
                   ALIGN, BLOCK_K, NPROG)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    scols = tl.arange(0, BLOCK_K // 32)
    scm = scols < H // 32
    jj = tl.arange(0, K_P)
    jm = jj < K
    total = _num_received(cnt_ptr, T, W, W_P)
    while u < total:
        row = u.to(tl.int64)
        rows = tl.load(recv_i32 + row * (R // 4) + RO // 4 + jj, mask=jm, other=-1)
        rows = tl.where((rows >= 0) & (rows < capacity), rows, -1)     # never write outside
        tl.store(rows_out_ptr + row * K + jj, rows, mask=jm)
        wbits = tl.load(recv_i32 + row * (R // 4) + WO // 4 + jj, mask=jm, other=0)
        tl.store(w_out_ptr + row * K + jj, wbits.to(tl.float32, bitcast=True), mask=jm)
        d = tl.load(recv_u8 + row * R + cols, mask=cm, other=0, eviction_policy="evict_first")
        sc = tl.load(recv_u8 + row * R + H + scols, mask=scm, other=0)
        for j in tl.static_range(K):
            r = _pick(rows, jj, j).to(tl.int64)
            ok = r >= 0
            tl.store(out_data_ptr + r * H + cols, d, mask=ok & cm)
            tl.store(out_scale_ptr + scale_offsets_jit(r, scols, H // 32, BLOCKED), sc, mask=ok & scm)
        u += NPROG


def unpack_tokens(recv: torch.Tensor, offsets: tuple[int, int], tok_recv: torch.Tensor, T: int, group_end: torch.Tensor,
                  recv_per_expert: torch.Tensor, rank: int, align: int, out_data: torch.Tensor, out_scale: torch.Tensor,
                  rows_out: torch.Tensor, w_out: torch.Tensor, config: EPConfig, blocked_scales: bool = False) -> None:
    """Owner side, after the exchange: every received row ``u < sum(tok_recv)`` of ``recv`` uint8
    ``[S, R]`` (``tok_recv`` int32 ``[W]``: tokens from each source, at most ``T``) is read once
    and stored into its layout rows of ``out_data`` uint8 ``[cap, H]`` / ``out_scale`` uint8
    ``[cap, H // 32]`` (row-major, or ``blocked_scales``); the pad rows of this rank's groups
    (``group_end`` / ``recv_per_expert`` int32 ``[E]``, the plan's) get zeros; the received
    rows' tables go to ``rows_out`` int32 / ``w_out`` fp32 ``[S, k]`` (later rows unwritten)."""
    cap, H = out_data.shape
    W, K = tok_recv.shape[0], rows_out.shape[1]
    L = group_end.shape[0] // W
    t = config.copy
    nprog = config.num_programs(t, out_data.device)
    _unpack_rows_kernel[(nprog,)](
        recv, recv.view(torch.int32), recv.shape[1], offsets[0], offsets[1], tok_recv, T, H, rank, cap, group_end,
        recv_per_expert, out_data, out_scale, rows_out, w_out,
        BLOCKED=blocked_scales, K=K, K_P=_k_p(K), W=W, W_P=_w_p(W), L=L, L_P=_w_p(L), ALIGN=align,
        BLOCK_K=_block_k(H), NPROG=nprog, num_warps=t.warps)


@triton.jit
def _reduce_rows_kernel(src_ptr, rows_ptr, w_ptr, cnt_ptr, T, H, capacity, send_i16, R,
                   WEIGHTED: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr,
                   BLOCK_K: tl.constexpr, NPROG: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    jj = tl.arange(0, K_P)
    jm = jj < K
    total = _num_received(cnt_ptr, T, W, W_P)
    u = tl.program_id(0)
    while u < total:
        row = u.to(tl.int64)
        rows = tl.load(rows_ptr + row * K + jj, mask=jm, other=-1)
        ws = tl.load(w_ptr + row * K + jj, mask=jm, other=0.0)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for j in tl.static_range(K):    # the symmetric-memory reduce's order: the same bits
            r = _pick(rows, jj, j).to(tl.int64)
            ok = (r >= 0) & (r < capacity)
            val = bf16_bits_to_fp32(tl.load(src_ptr + r * H + cols, mask=ok & cm, other=0))
            if WEIGHTED:
                val = val * _pick(ws, jj, j)
            acc += tl.where(ok, val, 0.0)
        tl.store(send_i16 + row * (R // 2) + cols, fp32_to_bf16_bits(acc), mask=cm)
        u += NPROG


def reduce_rows(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None, tok_recv: torch.Tensor, T: int,
                send: torch.Tensor, config: EPConfig) -> None:
    """Owner side: for every received row ``u``, the fp32 sum (gate-weighted with ``weights`` fp32
    ``[S, k]``, else plain) of its layout rows of ``src`` bf16 ``[cap, H]`` (``rows`` int32
    ``[S, k]``), rounded to bf16, into send row ``u`` of ``send`` uint8 ``[S, R]`` (rows grouped
    by source, as received: the exchange back needs no other order)."""
    cap, H = src.shape
    W, K = tok_recv.shape[0], rows.shape[1]
    t = config.combine
    nprog = config.num_programs(t, src.device)
    _reduce_rows_kernel[(nprog,)](
        src.view(torch.int16), rows, weights if weights is not None else rows, tok_recv, T, H, cap,
        send.view(torch.int16), send.shape[1], WEIGHTED=weights is not None, K=K, K_P=_k_p(K), W=W, W_P=_w_p(W),
        BLOCK_K=_block_k(H), NPROG=nprog, num_warps=t.warps)


@triton.jit
def _sum_received_partials_kernel(recv_i16, R, slot_ptr, cnt_ptr, n_tok, H, out_ptr, W: tl.constexpr, W_P: tl.constexpr,
                         BLOCK_K: tl.constexpr, NPROG: tl.constexpr):
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    dd, cnt, off = _segment_starts(cnt_ptr, W, W_P)
    t = tl.program_id(0)
    while t < n_tok:
        t64 = t.to(tl.int64)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for d in tl.static_range(W):    # rank order: bit-identical from run to run
            slot = tl.load(slot_ptr + t64 * W + d)
            ok = (slot >= 0) & (slot < _pick(cnt, dd, d))
            row = (_pick(off, dd, d) + slot).to(tl.int64)
            acc += bf16_bits_to_fp32(tl.load(recv_i16 + row * (R // 2) + cols, mask=ok & cm, other=0))
        tl.store(out_ptr + t64 * H + cols, fp32_to_bf16_bits(acc), mask=cm)
        t += NPROG


def sum_partials(recv: torch.Tensor, slot: torch.Tensor, tok_send: torch.Tensor, out: torch.Tensor,
                 config: EPConfig) -> torch.Tensor:
    """Source side, after the exchange back: ``out[t]`` (bf16 ``[t, H]``) = the fp32 sum over ranks
    ``d`` (in rank order) with ``slot[t, d] >= 0`` of the partial at received row ``send_off[d] +
    slot[t, d]`` of ``recv`` uint8 ``[S, R]`` (``d`` returns its partials in the order this rank
    sent it the tokens)."""
    n, H = out.shape
    if n == 0:
        return out
    t = config.copy
    nprog = min(config.num_programs(t, out.device), n)
    W = slot.shape[1]
    _sum_received_partials_kernel[(nprog,)](recv.view(torch.int16), recv.shape[1], slot, tok_send, n, H, out.view(torch.int16),
                                   W=W, W_P=_w_p(W), BLOCK_K=_block_k(H), NPROG=nprog, num_warps=t.warps)
    return out


@triton.jit
def _expand_received_grads_kernel(recv_i16, R, eo_ptr, rows_ptr, w_ptr, cnt_ptr, T, H, rank, capacity, geo_ptr, send_f32,
                         group_end_ptr, recv_ptr, K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr,
                         W_P: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_K: tl.constexpr, NPROG: tl.constexpr):
    u = _zero_pads(geo_ptr, geo_ptr, group_end_ptr, recv_ptr, rank, H, capacity, False, False, L, L_P, ALIGN, BLOCK_K,
                   NPROG)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    jj = tl.arange(0, K_P)
    jm = jj < K
    total = _num_received(cnt_ptr, T, W, W_P)
    while u < total:
        row = u.to(tl.int64)
        rows = tl.load(rows_ptr + row * K + jj, mask=jm, other=-1)
        ws = tl.load(w_ptr + row * K + jj, mask=jm, other=0.0)
        dy = bf16_bits_to_fp32(tl.load(recv_i16 + row * (R // 2) + cols, mask=cm, other=0))
        dots = tl.zeros([K_P], tl.float32)
        for j in tl.static_range(K):
            r = _pick(rows, jj, j).to(tl.int64)
            ok = (r >= 0) & (r < capacity)
            tl.store(geo_ptr + r * H + cols, fp32_to_bf16_bits(_pick(ws, jj, j) * dy), mask=ok & cm)
            e = bf16_bits_to_fp32(tl.load(eo_ptr + r * H + cols, mask=ok & cm, other=0))
            dots = tl.where(jj == j, tl.sum(dy * e, axis=0), dots)
        tl.store(send_f32 + row * (R // 4) + jj, tl.where(rows >= 0, dots, 0.0), mask=jm)
        u += NPROG


def expand_grads(recv: torch.Tensor, expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                 tok_recv: torch.Tensor, T: int, group_end: torch.Tensor, recv_per_expert: torch.Tensor, rank: int,
                 align: int, grad_expert_out: torch.Tensor, send: torch.Tensor, config: EPConfig) -> torch.Tensor:
    """Owner side of the combine's backward, after ``dy`` arrived (bf16 rows of ``recv``):
    ``grad_expert_out[row] = weight * dy`` (bf16 ``[cap, H]``, pad rows zero, later rows
    unwritten) and, into send row ``u`` of ``send`` (fp32 ``[k]``), ``<dy, expert_out[row]>``
    of each of the received row's pairs (0 where it has none here)."""
    cap, H = expert_out.shape
    W, K = tok_recv.shape[0], rows.shape[1]
    L = group_end.shape[0] // W
    t = config.combine
    nprog = config.num_programs(t, expert_out.device)
    _expand_received_grads_kernel[(nprog,)](
        recv.view(torch.int16), recv.shape[1], expert_out.view(torch.int16), rows, weights, tok_recv, T, H, rank, cap,
        grad_expert_out.view(torch.int16), send.view(torch.float32), group_end, recv_per_expert,
        K=K, K_P=_k_p(K), W=W, W_P=_w_p(W), L=L, L_P=_w_p(L), ALIGN=align, BLOCK_K=_block_k(H), NPROG=nprog,
        num_warps=t.warps)
    return grad_expert_out


def gather_weight_grads(recv: torch.Tensor, slot: torch.Tensor, tok_send: torch.Tensor, pair_owner: torch.Tensor,
                        pair_rows: torch.Tensor) -> torch.Tensor:
    """Source side, after the weight gradients came back: fp32 ``[t, k]``, pair ``(t, j)``'s from
    received row ``send_off[owner] + slot[t, owner]``, column ``j`` (0 for ``-1`` slots and
    pairs the capacity dropped). A few sync-free torch ops."""
    S, R = recv.shape
    K = pair_owner.shape[1]
    tok = tok_send.long()
    off = torch.cumsum(tok, 0) - tok
    owner = pair_owner.long()
    valid = (owner >= 0) & (pair_rows >= 0)
    own = owner.clamp(min=0)
    row = (off[own] + slot.long().gather(1, own)).clamp(0, max(S - 1, 0))
    table = recv.view(torch.float32).view(S, R // 4)
    j = torch.arange(K, device=owner.device).expand_as(owner)
    return torch.where(valid, table[row, j], 0.0)
