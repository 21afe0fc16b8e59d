"""The token-level dispatch and combine kernels: each token crosses to each destination rank at
most once (quantized once, at its source), and the owner expands it into its local experts' rows
of the expert-major padded layout in local memory; the combine reduces a token's rows over the
owner's local experts (fp32, gate-weighted) and sends one bf16 partial per (token, rank) back.

Phases of one call (a barrier between a phase that writes peers and the next):

* :func:`pair_tables` (source, after the plan): every (token, expert) pair's layout row, the
  capacity drop, the fp32 gate weights and the owner-side slot tables' reset, in one launch.
* :func:`push_tokens` (source): token ``t`` goes to every rank ``d`` it has an expert on, into
  d's token slot ``rank * T + slot[t, d]``: the MXFP8 row (or bf16 for the backward's gradient)
  and, in the forward, the slot's table rows: the layout row of each of its k pairs whose expert
  lives on ``d`` (``-1`` for the others) and the gate weights.
* :func:`expand_tokens` (owner): every received slot is read once and stored into its layout
  rows; the pad rows get zeros; the slot tables are copied into regular tensors (the handle).
* :func:`reduce_tokens` (owner): for every received slot, the (weighted) fp32 sum of its layout
  rows, in slot-table order, rounded to bf16, into the source's combine region at
  ``owner * T + slot``.
* :func:`sum_partials` (source): ``y[t]`` = the fp32 sum, in rank order, of its partials, bf16.
* :func:`expand_token_grads` (owner, the combine's backward): the gradient of each layout row
  is ``weight * dy`` (bf16) and the weight gradient ``<dy, expert_out[row]>`` (fp32) goes back
  to the source's table.
* :func:`gather_weight_grads` (source, after that barrier): each pair's weight gradient from its
  owner's entry of the table, ``[t, k]``.

Peer addressing as in :mod:`mxep.ep.transport.symm_mem.dispatch`. Every index read from memory
is bounded before use (slots by ``T``, rows by the capacity, counts by ``T``): no kernel touches
memory outside its tensors, whatever the inputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, next_power_of_2, padded_group_rows_jit, runs_interpreted
from mxep.ep.config import EPConfig
from mxep.ep.transport.symm_mem.dispatch import _own_pads, _zero_pad_row
from mxep.ep.transport.symm_mem.plan import DispatchPlan, work_item, work_steps
from mxep.format.blocked import scale_offsets_jit
from mxep.format.tile import bf16_bits_to_fp32, fp32_to_bf16_bits, quantize_tile

__all__ = ["pair_tables", "push_tokens", "expand_tokens", "reduce_tokens", "sum_partials", "expand_token_grads",
           "gather_weight_grads"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 rows as the int16 bits the kernels load (bf16_bits_to_fp32); an int16 view passes as
    it is (the transport keeps its regions' int16 views: no view op per call)."""
    return t if t.dtype == torch.int16 else t.view(torch.int16)


@triton.jit
def _pick(vec, jj, j):
    """Element ``j`` of the small vector ``vec`` (index vector ``jj``) as a scalar."""
    return tl.sum(tl.where(jj == j, vec, 0), axis=0)


@triton.jit
def _received_slot(u, cnt_ptr, T, W: tl.constexpr, W_P: tl.constexpr):
    """Work item ``u`` of an owner's walk over its received slots (source by source): returns
    ``(source, index, live)``; ``total`` items in all."""
    s_idx = tl.arange(0, W_P)
    cnt = tl.minimum(tl.maximum(tl.load(cnt_ptr + s_idx, mask=s_idx < W, other=0), 0), T)
    start = tl.cumsum(cnt, axis=0) - cnt
    total = tl.sum(cnt, axis=0)
    hit = (start <= u) & (u < start + cnt) & (s_idx < W)
    src = tl.sum(tl.where(hit, s_idx, 0), axis=0)
    i = u - tl.sum(tl.where(hit, start, 0), axis=0)
    return src, i, u < total


@triton.jit
def _num_received(cnt_ptr, T, W: tl.constexpr, W_P: tl.constexpr):
    s_idx = tl.arange(0, W_P)
    cnt = tl.minimum(tl.maximum(tl.load(cnt_ptr + s_idx, mask=s_idx < W, other=0), 0), T)
    return tl.sum(cnt, axis=0)


@triton.jit
def _zero_pads(out_data_ptr, out_scale_ptr, group_end_ptr, recv_ptr, rank, H, capacity, QUANTIZE: tl.constexpr,
               BLOCKED: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr, BLOCK_K: tl.constexpr,
               NPROG: tl.constexpr):
    """This program's share of the zeros of this rank's pad rows (data, and scales when
    ``QUANTIZE``); returns this program's first step of the work after them."""
    pad_end, num_pads, pad_cum = _own_pads(group_end_ptr, recv_ptr, rank, L, L_P, ALIGN)
    v = tl.program_id(0)
    while v < num_pads:
        _zero_pad_row(out_data_ptr, out_scale_ptr, v, pad_end, pad_cum, group_end_ptr, rank, H, H // 32,
                      capacity, QUANTIZE, BLOCKED, L, L_P, BLOCK_K)
        v += NPROG
    return v - num_pads


# pair_tables: elements per program, not swept: 3 us per rank, one H200, 512 x top-8 (docs/tuning.md).
# The one launch replaced eleven small torch ops: the clamp, the casts, the gather, the add, the
# where, the capacity test, the table fills, the weights' copy and the drop count (docs/history.md).
PAIR_BLOCK = 1024


@triton.jit
def _pair_tables_kernel(expert_ptr, pair_index_ptr, owner_ptr, w_in_ptr, row_base_ptr, group_end_ptr, recv_ptr,
                        n_pairs, n_table, E, rank, expert_cap,
                        pair_rows_ptr, w_out_ptr, rows_tab_ptr, w_tab_ptr, dropped_ptr,
                        CAPPED: tl.constexpr, ALIGN: tl.constexpr, BLOCK: tl.constexpr):
    # Pair p = (token, slot), flat: row = row_base[rank, g] + pair_index (the row the row-level
    # dispatch gives the pair's row in the sorted expansion), -1 for no expert and, with a
    # capacity, for a pair past its expert's first expert_cap rows. Elements past n_pairs only
    # reset the owner-side slot tables (n_table = W * T * k entries: rows -1, weights 0).
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_pairs
    g = tl.load(expert_ptr + offs, mask=m, other=0)
    g = tl.minimum(tl.maximum(g, 0), E - 1)            # E (no expert) and anything else: in range
    pidx = tl.load(pair_index_ptr + offs, mask=m, other=-1)
    base = tl.load(row_base_ptr + rank * E + g, mask=m, other=0)   # row_base[rank, g]
    row = base.to(tl.int64) + pidx
    keep = m & (pidx >= 0)
    if CAPPED:
        recv = tl.load(recv_ptr + g, mask=m, other=0)
        start = tl.load(group_end_ptr + g, mask=m, other=0) - padded_group_rows_jit(recv, ALIGN)
        keep = keep & (row - start < expert_cap)
    out = tl.where(keep, row, -1).to(tl.int32)
    tl.store(pair_rows_ptr + offs, out, mask=m)
    tl.store(w_out_ptr + offs, tl.load(w_in_ptr + offs, mask=m, other=0).to(tl.float32), mask=m)
    owner = tl.load(owner_ptr + offs, mask=m, other=-1)
    tl.atomic_add(dropped_ptr, tl.sum((m & (owner >= 0) & (out < 0)).to(tl.int64), axis=0))
    tm = offs < n_table
    tl.store(rows_tab_ptr + offs, tl.full([BLOCK], -1, tl.int32), mask=tm)
    tl.store(w_tab_ptr + offs, tl.zeros([BLOCK], tl.float32), mask=tm)


def pair_tables(expert: torch.Tensor, pair_index: torch.Tensor, pair_owner: torch.Tensor,
                topk_weights: torch.Tensor, plan: DispatchPlan, rank: int, align: int, expert_cap: int,
                table_slots: int) -> tuple[torch.Tensor, ...]:
    """The source side's per-pair tables of a token-level dispatch, after its plan.

    Args:
        expert: int64 ``[t, k]`` each pair's global expert (``E``: none), from the routing.
        pair_index: int32 ``[t, k]`` the pair's index in its expert's sorted expansion (``-1``: none).
        pair_owner: int32 ``[t, k]`` the pair's owner rank (``-1``: none).
        topk_weights: float ``[t, k]`` the gate weights (any float dtype).
        plan: the call's plan (``row_base [W, E]``, ``group_end [E]``, ``recv [E]``).
        expert_cap: rows each expert keeps (``2**31 - 1``: no capacity).
        table_slots: ``W * T``, the owner-side slot tables' rows.

    Returns ``(pair_rows int32 [t, k], pair_weights fp32 [t, k] (a copy), rows int32
    [table_slots, k] all -1, weights fp32 [table_slots, k] all 0, num_dropped int64 [])``:
    ``pair_rows`` is the pair's row in its owner's layout, ``-1`` for no expert or a pair that the
    capacity dropped (never sent, zero in the combine, zero gradient); ``num_dropped`` counts the
    latter. ``pair_weights`` is a copy so that the handle's state never aliases the caller's tensor.
    """
    t, k = expert.shape
    dev = expert.device
    E = plan.row_base.shape[1]
    pair_rows = torch.empty(t, k, dtype=torch.int32, device=dev)
    pair_weights = torch.empty(t, k, dtype=torch.float32, device=dev)
    rows = torch.empty(table_slots, k, dtype=torch.int32, device=dev)
    weights = torch.empty(table_slots, k, dtype=torch.float32, device=dev)
    dropped = torch.zeros((), dtype=torch.int64, device=dev)
    n = max(t * k, table_slots * k)
    # Triton's CPU interpreter runs the programs one after another at a fixed cost each, so there
    # one program takes every element (the W * T * k table reset alone is 128 programs of 1024 at
    # T 4096, W 4, top-8).
    block = max(PAIR_BLOCK, next_power_of_2(n)) if runs_interpreted(expert) else PAIR_BLOCK
    if n:
        _pair_tables_kernel[(cdiv(n, block),)](
            expert, pair_index, pair_owner, topk_weights.contiguous(), plan.row_base, plan.group_end, plan.recv,
            t * k, table_slots * k, E, rank, min(expert_cap, 2**31 - 1),
            pair_rows, pair_weights, rows, weights, dropped,
            CAPPED=expert_cap < 2**31 - 1, ALIGN=align, BLOCK=block, num_warps=4)
    return pair_rows, pair_weights, rows, weights, dropped


@triton.jit
def _push_tokens_kernel(x_ptr, n_tok, H, rank, T, slot_ptr, rows_ptr, owner_ptr, w_ptr,
                        data_base_ptr, scale_base_ptr, delta_ptr, rows_base_ptr, w_base_ptr, delta_i32_ptr,
                        QUANTIZE: tl.constexpr, TABLES: tl.constexpr, FLOOR: tl.constexpr, HW_CAST: tl.constexpr,
                        K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr, BLOCK_K: tl.constexpr,
                        SPREAD: tl.constexpr, NPROG: tl.constexpr):
    x_ptr = x_ptr.to(tl.pointer_type(tl.int16))   # bf16 rows read as their bits (no int16 view on the host)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    jj = tl.arange(0, K_P)
    jm = jj < K
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
            scols = tl.arange(0, BLOCK_K // 32)
            scm = scols < H // 32
        if TABLES:
            prow = tl.load(rows_ptr + t64 * K + jj, mask=live & jm, other=-1)
            pown = tl.load(owner_ptr + t64 * K + jj, mask=live & jm, other=-1)
            pw = tl.load(w_ptr + t64 * K + jj, mask=live & jm, other=0.0)
        for d in tl.static_range(W):
            slot = tl.load(slot_ptr + t64 * W + d, mask=live, other=-1)
            ok = live & (slot >= 0) & (slot < T)
            dst = (rank * T + slot).to(tl.int64)
            delta = tl.load(delta_ptr + d)
            off = tl.multiple_of(delta + dst * H, 16)
            if QUANTIZE:
                tl.store(data_base_ptr + off + cols, q, mask=ok & cm)
                tl.store(scale_base_ptr + delta + dst * (H // 32) + scols, sc, mask=ok & scm)
            else:
                tl.store(data_base_ptr + off + cols, raw, mask=ok & cm)
            if TABLES:
                delta4 = tl.load(delta_i32_ptr + d)
                tl.store(rows_base_ptr + delta4 + dst * K + jj, tl.where(pown == d, prow, -1), mask=ok & jm)
                tl.store(w_base_ptr + delta4 + dst * K + jj, pw, mask=ok & jm)
        u += NPROG


def push_tokens(x: torch.Tensor, rank: int, T: int, slot: torch.Tensor, data_base: torch.Tensor,
                scale_base: torch.Tensor | None, delta: torch.Tensor, config: EPConfig, scale_mode: str | None = None,
                tables: tuple | None = None) -> None:
    """Source side: token ``t`` of ``x [t, H]`` (bf16) into token slot ``rank * T + slot[t, d]``
    of every rank ``d`` with ``slot[t, d] >= 0`` (``slot`` int32 ``[t, W]``). ``scale_mode``
    given: quantized (``data_base`` / ``scale_base`` uint8 regions, ``delta`` in bytes), else
    bf16 rows (``data_base`` a bf16 region or its int16 view, ``delta`` in bf16 elements). ``tables``:
    ``(pair_rows int32 [t, k], pair_owner int32 [t, k], weights fp32 [t, k], rows_base int32
    [S, k], weights_base fp32 [S, k], delta_i32)``: also write each slot's table rows."""
    n, H = x.shape
    W = slot.shape[1]
    if n == 0:
        return
    tl_cfg = config.dispatch
    nprog = min(config.num_programs(tl_cfg, x.device), n)
    quantize = scale_mode is not None
    if tables is not None:
        rows, owner, w, rows_base, w_base, delta_i32 = tables
        K = rows.shape[1]
    else:
        rows = owner = w = rows_base = w_base = slot
        delta_i32, K = delta, 1
    data_arg = data_base if quantize else _bits(data_base)
    _push_tokens_kernel[(nprog,)](
        x, n, H, rank, T, slot, rows, owner, w,
        data_arg, scale_base if quantize else data_arg, delta, rows_base, w_base, delta_i32,
        QUANTIZE=quantize, TABLES=tables is not None, FLOOR=scale_mode == "floor",
        HW_CAST=quantize and x.is_cuda and config.hw_cast, K=K, K_P=max(next_power_of_2(K), 2), W=W,
        BLOCK_K=max(next_power_of_2(H), 32), SPREAD=config.spread_parts, NPROG=nprog, num_warps=tl_cfg.warps)


@triton.jit
def _expand_tokens_kernel(data_ptr, scale_ptr, rows_tab_ptr, w_tab_ptr, out_data_ptr, out_scale_ptr,
                          rows_out_ptr, w_out_ptr, cnt_ptr, T, H, rank, capacity, group_end_ptr, recv_ptr,
                          QUANTIZE: tl.constexpr, BLOCKED: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr,
                          W: tl.constexpr, W_P: tl.constexpr, L: tl.constexpr, L_P: tl.constexpr,
                          ALIGN: tl.constexpr, BLOCK_K: tl.constexpr, NPROG: tl.constexpr):
    u = _zero_pads(out_data_ptr, out_scale_ptr, group_end_ptr, recv_ptr, rank, H, capacity, QUANTIZE, BLOCKED, L, L_P,
                   ALIGN, BLOCK_K, NPROG)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    scols = tl.arange(0, BLOCK_K // 32)
    scm = scols < H // 32
    jj = tl.arange(0, K_P)
    jm = jj < K
    total = _num_received(cnt_ptr, T, W, W_P)
    while u < total:
        src, i, live = _received_slot(u, cnt_ptr, T, W, W_P)
        slot = (src * T + i).to(tl.int64)
        rows = tl.load(rows_tab_ptr + slot * K + jj, mask=live & jm, other=-1)
        rows = tl.where((rows >= 0) & (rows < capacity), rows, -1)     # never write outside
        tl.store(rows_out_ptr + slot * K + jj, rows, mask=live & jm)
        tl.store(w_out_ptr + slot * K + jj, tl.load(w_tab_ptr + slot * K + jj, mask=live & jm, other=0.0),
                 mask=live & jm)
        d = tl.load(data_ptr + slot * H + cols, mask=live & cm, other=0, eviction_policy="evict_first")
        if QUANTIZE:
            sc = tl.load(scale_ptr + slot * (H // 32) + scols, mask=live & scm, other=0)
        for j in tl.static_range(K):
            r = _pick(rows, jj, j).to(tl.int64)
            ok = live & (r >= 0)
            tl.store(out_data_ptr + r * H + cols, d, mask=ok & cm)
            if QUANTIZE:   # row-major, or sm_100's blocked layout by the same store (mxep/format/blocked.py)
                tl.store(out_scale_ptr + scale_offsets_jit(r, scols, H // 32, BLOCKED), sc, mask=ok & scm)
        u += NPROG


def expand_tokens(data: torch.Tensor, scale: torch.Tensor, rows_tab: torch.Tensor, w_tab: torch.Tensor,
                  plan: DispatchPlan, rank: int, T: int, out_data: torch.Tensor, out_scale: torch.Tensor,
                  rows_out: torch.Tensor, w_out: torch.Tensor, config: EPConfig, blocked_scales: bool = False) -> None:
    """Owner side, after the push's barrier: every received token slot of ``data [S, H]`` /
    ``scale [S, H // 32]`` (uint8, ``S = W * T``) is read once and stored into its layout rows of
    ``out_data [cap, H]`` / ``out_scale`` (its table row in ``rows_tab [S, k]``); the pad rows
    get zeros; the tables of the received slots are copied into ``rows_out`` / ``w_out``
    (``[S, k]``; the other slots are left as they are). ``blocked_scales``: ``out_scale`` in the
    blocked layout of :mod:`mxep.format.blocked` (the slots stay row-major)."""
    cap, H = out_data.shape
    W = plan.src_end.shape[0]
    L, K = plan.num_local_experts, rows_tab.shape[1]
    t = config.copy
    nprog = config.num_programs(t, out_data.device)
    _expand_tokens_kernel[(nprog,)](
        data, scale, rows_tab, w_tab, out_data, out_scale, rows_out, w_out, plan.tok_recv, T, H, rank, cap,
        plan.group_end, plan.recv,
        QUANTIZE=True, BLOCKED=blocked_scales, K=K, K_P=max(next_power_of_2(K), 2), W=W,
        W_P=max(next_power_of_2(W), 2), L=L,
        L_P=max(next_power_of_2(L), 2), ALIGN=plan.align, BLOCK_K=max(next_power_of_2(H), 32), NPROG=nprog,
        num_warps=t.warps)


@triton.jit
def _reduce_tokens_kernel(src_ptr, rows_ptr, w_ptr, cnt_ptr, T, H, rank, capacity, ret_base_ptr, delta_ptr,
                          WEIGHTED: tl.constexpr, K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr,
                          W_P: tl.constexpr, BLOCK_K: tl.constexpr, NPROG: tl.constexpr):
    src_ptr = src_ptr.to(tl.pointer_type(tl.int16))   # bf16 as bits (no view on the host)
    ret_base_ptr = ret_base_ptr.to(tl.pointer_type(tl.int16))
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    jj = tl.arange(0, K_P)
    jm = jj < K
    total = _num_received(cnt_ptr, T, W, W_P)
    u = pid
    while u < total:
        src, i, live = _received_slot(u, cnt_ptr, T, W, W_P)
        slot = (src * T + i).to(tl.int64)
        rows = tl.load(rows_ptr + slot * K + jj, mask=live & jm, other=-1)
        ws = tl.load(w_ptr + slot * K + jj, mask=live & jm, other=0.0)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for j in tl.static_range(K):    # a fixed order: bit-identical from run to run
            r = _pick(rows, jj, j).to(tl.int64)
            ok = live & (r >= 0) & (r < capacity)
            val = bf16_bits_to_fp32(tl.load(src_ptr + r * H + cols, mask=ok & cm, other=0))
            if WEIGHTED:
                val = val * _pick(ws, jj, j)
            acc += tl.where(ok, val, 0.0)
        delta = tl.load(delta_ptr + src)
        dst = (rank * T + i).to(tl.int64)
        tl.store(ret_base_ptr + tl.multiple_of(delta + dst * H, 16) + cols, fp32_to_bf16_bits(acc), mask=live & cm)
        u += NPROG


def reduce_tokens(src: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor | None, plan: DispatchPlan,
                  rank: int, T: int, ret_base: torch.Tensor, delta_bf16: torch.Tensor, config: EPConfig) -> None:
    """Owner side: for every received slot, the fp32 sum (gate-weighted with ``weights``
    fp32 ``[S, k]``, else plain) of its layout rows of ``src`` (bf16 ``[cap, H]``; rows from
    ``rows`` int32 ``[S, k]``), rounded to bf16, into the source's combine region
    (``ret_base`` bf16 ``[S, H]``, or its int16 view, + ``delta_bf16[source]``) at row ``rank * T + slot``."""
    cap, H = src.shape
    W, K = plan.src_end.shape[0], rows.shape[1]
    t = config.combine
    nprog = config.num_programs(t, src.device)
    _reduce_tokens_kernel[(nprog,)](
        src, rows, weights if weights is not None else rows, plan.tok_recv, T, H, rank, cap,
        ret_base, delta_bf16, WEIGHTED=weights is not None, K=K, K_P=max(next_power_of_2(K), 2),
        W=W, W_P=max(next_power_of_2(W), 2), BLOCK_K=max(next_power_of_2(H), 32), NPROG=nprog, num_warps=t.warps)


@triton.jit
def _sum_partials_kernel(ret_ptr, slot_ptr, n_tok, T, H, out_ptr, W: tl.constexpr, BLOCK_K: tl.constexpr,
                         NPROG: tl.constexpr):
    ret_ptr = ret_ptr.to(tl.pointer_type(tl.int16))   # bf16 as bits (no view on the host)
    out_ptr = out_ptr.to(tl.pointer_type(tl.int16))
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    t = pid
    while t < n_tok:
        t64 = t.to(tl.int64)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for d in tl.static_range(W):    # rank order: bit-identical from run to run
            slot = tl.load(slot_ptr + t64 * W + d)
            ok = (slot >= 0) & (slot < T)
            acc += bf16_bits_to_fp32(tl.load(ret_ptr + (d * T + slot).to(tl.int64) * H + cols, mask=ok & cm, other=0))
        tl.store(out_ptr + t64 * H + cols, fp32_to_bf16_bits(acc), mask=cm)
        t += NPROG


def sum_partials(region: torch.Tensor, slot: torch.Tensor, T: int, out: torch.Tensor, config: EPConfig) -> torch.Tensor:
    """Source side, after the reduce's barrier: ``out[t]`` (bf16 ``[t, H]``) = the fp32 sum over
    ranks ``d`` (in rank order) with ``slot[t, d] >= 0`` of ``region[d * T + slot[t, d]]``
    (``region`` bf16 ``[S, H]`` or its int16 view)."""
    n, H = out.shape
    if n == 0:
        return out
    t = config.copy
    nprog = min(config.num_programs(t, out.device), n)
    _sum_partials_kernel[(nprog,)](region, slot, n, T, H, out,
                                   W=slot.shape[1], BLOCK_K=max(next_power_of_2(H), 32), NPROG=nprog,
                                   num_warps=t.warps)
    return out


@triton.jit
def _expand_grads_kernel(dy_ptr, eo_ptr, rows_ptr, w_ptr, cnt_ptr, T, H, rank, capacity, geo_ptr,
                         wg_base_ptr, delta_i32_ptr, group_end_ptr, recv_ptr,
                         K: tl.constexpr, K_P: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr,
                         L: tl.constexpr, L_P: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_K: tl.constexpr, NPROG: tl.constexpr):
    dy_ptr = dy_ptr.to(tl.pointer_type(tl.int16))   # bf16 as bits (no view on the host)
    eo_ptr = eo_ptr.to(tl.pointer_type(tl.int16))
    geo_ptr = geo_ptr.to(tl.pointer_type(tl.int16))
    u = _zero_pads(geo_ptr, geo_ptr, group_end_ptr, recv_ptr, rank, H, capacity, False, False, L, L_P, ALIGN, BLOCK_K,
                   NPROG)
    cols = tl.arange(0, BLOCK_K)
    cm = cols < H
    jj = tl.arange(0, K_P)
    jm = jj < K
    total = _num_received(cnt_ptr, T, W, W_P)
    while u < total:
        src, i, live = _received_slot(u, cnt_ptr, T, W, W_P)
        slot = (src * T + i).to(tl.int64)
        rows = tl.load(rows_ptr + slot * K + jj, mask=live & jm, other=-1)
        ws = tl.load(w_ptr + slot * K + jj, mask=live & jm, other=0.0)
        dy = bf16_bits_to_fp32(tl.load(dy_ptr + slot * H + cols, mask=live & cm, other=0))
        dots = tl.zeros([K_P], tl.float32)
        for j in tl.static_range(K):
            r = _pick(rows, jj, j).to(tl.int64)
            ok = live & (r >= 0) & (r < capacity)
            tl.store(geo_ptr + r * H + cols, fp32_to_bf16_bits(_pick(ws, jj, j) * dy), mask=ok & cm)
            e = bf16_bits_to_fp32(tl.load(eo_ptr + r * H + cols, mask=ok & cm, other=0))
            dots = tl.where(jj == j, tl.sum(dy * e, axis=0), dots)
        delta4 = tl.load(delta_i32_ptr + src)
        dst = (rank * T + i).to(tl.int64)
        tl.store(wg_base_ptr + delta4 + dst * K + jj, dots, mask=live & jm & (rows >= 0))
        u += NPROG


def expand_token_grads(dy_slots: torch.Tensor, expert_out: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                       plan: DispatchPlan, rank: int, T: int, grad_expert_out: torch.Tensor, wg_base: torch.Tensor,
                       delta_i32: torch.Tensor, config: EPConfig) -> torch.Tensor:
    """Owner side of the combine's backward, after ``dy`` reached the token slots
    (``dy_slots`` bf16 ``[S, H]``, or its int16 view): ``grad_expert_out[row] = weight * dy`` (bf16 ``[cap, H]``,
    pad rows zero, later rows unwritten) and ``<dy, expert_out[row]>`` (fp32) into the source's
    weight-gradient table (``wg_base`` fp32 ``[S, k]`` + ``delta_i32[source]``) at row
    ``rank * T + slot``, column = the pair's top-k slot."""
    cap, H = expert_out.shape
    W, K = plan.src_end.shape[0], rows.shape[1]
    L = plan.num_local_experts
    t = config.combine
    nprog = config.num_programs(t, expert_out.device)
    _expand_grads_kernel[(nprog,)](
        dy_slots, expert_out, rows, weights, plan.tok_recv, T, H, rank, cap,
        grad_expert_out, wg_base, delta_i32, plan.group_end, plan.recv, K=K, K_P=max(next_power_of_2(K), 2), W=W, W_P=max(next_power_of_2(W), 2),
        L=L, L_P=max(next_power_of_2(L), 2), ALIGN=plan.align, BLOCK_K=max(next_power_of_2(H), 32),
        NPROG=nprog, num_warps=t.warps)
    return grad_expert_out


# gather_weight_grads: pairs per program (one program under the interpreter, as pair_tables).
# The one launch replaced seventeen small torch ops (casts, clamps, a gather, the flat index,
# the mask, the index and the where; docs/history.md, 2026-12-07).
GATHER_BLOCK = 1024


@triton.jit
def _gather_weight_grads_kernel(table_ptr, slot_ptr, owner_ptr, rows_ptr, out_ptr, n_pairs, T,
                                K: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr):
    # pair p = (token p // K, top-k slot p % K): its gradient is at row owner * T + slot[token,
    # owner] of the table (the owner wrote it there, expand_token_grads), column p % K; 0 for no
    # expert and for a pair the capacity dropped (pair_rows -1). Indices bounded before use.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n_pairs
    owner = tl.load(owner_ptr + offs, mask=m, other=-1)
    row = tl.load(rows_ptr + offs, mask=m, other=-1)
    valid = m & (owner >= 0) & (owner < W) & (row >= 0)
    tok = offs // K
    slot = tl.load(slot_ptr + tok * W + owner, mask=valid, other=0)
    slot = tl.minimum(tl.maximum(slot, 0), T - 1)
    g = tl.load(table_ptr + (owner.to(tl.int64) * T + slot) * K + offs % K, mask=valid, other=0.0)
    tl.store(out_ptr + offs, tl.where(valid, g, 0.0), mask=m)


def gather_weight_grads(table: torch.Tensor, slot: torch.Tensor, pair_owner: torch.Tensor,
                        pair_rows: torch.Tensor, T: int) -> torch.Tensor:
    """Source side of the combine's backward, after its last barrier: fp32 ``[t, k]``, each
    pair's gate-weight gradient, read from this rank's weight-gradient table (``table`` fp32
    ``[W * T, k]``: the owners wrote ``<dy, expert_out[row]>`` at row ``owner * T + slot``) via
    ``slot`` int32 ``[t, W]``, ``pair_owner`` / ``pair_rows`` int32 ``[t, k]``; 0 for ``-1``
    slots and for pairs the capacity dropped."""
    t, K = pair_owner.shape
    W = slot.shape[1]
    out = torch.empty(t, K, dtype=torch.float32, device=table.device)
    n = t * K
    if n:
        block = max(GATHER_BLOCK, next_power_of_2(n)) if runs_interpreted(table) else GATHER_BLOCK
        _gather_weight_grads_kernel[(cdiv(n, block),)](table, slot, pair_owner, pair_rows, out, n, T, K=K, W=W,
                                                       BLOCK=block, num_warps=4)
    return out
