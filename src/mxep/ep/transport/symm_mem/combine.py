"""The combine kernels: rows of the dispatch layout back to their source ranks.

Two ways, one per kind of input (docs/design.md):

* push (a regular ``expert_out``): every owner stores the rows it received back into row ``i``
  of its source's combine region (or, for its own tokens, straight into its output); after a
  barrier every source copies its region into its output (:func:`combine_push`,
  :func:`combine_copy_out`).
* pull (the zero-copy input, ``Buffer.combine_input()``): the owners wrote their expert
  outputs into their own dispatch region; after a barrier every source reads its rows from the
  owners over NVLink straight into its output (:func:`combine_pull`).

Peer addressing as in :mod:`mxep.ep.transport.symm_mem.dispatch`. Rows with an invalid route
(counts that do not describe the rows) read nothing and come out zero; no kernel touches memory
outside its tensors.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, next_power_of_2
from mxep.ep.config import EPConfig
from mxep.ep.transport.symm_mem.plan import DispatchPlan, route_rows, work_item, work_steps

__all__ = ["combine_push", "combine_pull", "combine_copy_out"]


@triton.jit
def _combine_push_kernel(
    src_ptr, H, rank, n_own, N, capacity,
    row_base_ptr, src_end_ptr, E,
    dst_base_ptr, dst_delta_ptr, out_ptr,
    W: tl.constexpr, W_P: tl.constexpr, L: tl.constexpr, E_P: tl.constexpr,
    SPREAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPROG: tl.constexpr,
):
    # The owner walks the rows it received, source by source: source s sent it its rows
    # [lo[s], hi[s]) (its rows for this owner's experts, contiguous since sources sort by
    # expert). Work item k is row lo[s] + (k - start[s]) of source s, whose position in this
    # owner's dispatch layout is the dispatch's own route (route_rows); its row there is read
    # and stored back at row i of the source's combine region. Pad rows are never read. The
    # list is walked interleaved (work_item) so that every owner stores into all sources at once.
    pid = tl.program_id(0)
    s_idx = tl.arange(0, W_P)
    sm = s_idx < W
    hi = tl.load(src_end_ptr + s_idx * E + (rank + 1) * L - 1, mask=sm, other=0)
    lo = tl.load(src_end_ptr + s_idx * E + rank * L - 1, mask=sm & (rank > 0), other=0)
    cnt = tl.where(sm, tl.minimum(tl.maximum(hi - lo, 0), N), 0)   # clamped: bogus counts stay bounded
    start = tl.cumsum(cnt, axis=0) - cnt                              # [W_P]
    stop = start + cnt
    total = tl.sum(cnt, axis=0)
    num_blocks = tl.cdiv(total, BLOCK_M)
    u = pid
    while u < work_steps(num_blocks, SPREAD):
        blk = work_item(u, num_blocks, SPREAD)
        k = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        live = k < total
        hit = (start[None, :] <= k[:, None]) & (k[:, None] < stop[None, :]) & sm[None, :]
        src = tl.sum(tl.where(hit, s_idx[None, :], 0), axis=1)
        i = k + tl.sum(tl.where(hit, (lo - start)[None, :], 0), axis=1)       # the source's row
        g, prow = route_rows(row_base_ptr, src_end_ptr, src, i, live, E, E_P)
        # Rows of this rank's own tokens go straight into its output [n_own, H] (the copy-out
        # skips them); the others into the source's combine region [N + 1, H]. Inconsistent
        # counts: never read or write outside either.
        own = src == rank
        ok = live & (g < E) & ((g // L) == rank) & (prow >= 0) & (prow < capacity) & (i >= 0)
        ok = ok & tl.where(own, i < n_own, i < N)
        # src is in [0, W): no mask (a masked load here trips Triton 3.6's layout pass at
        # BLOCK_M = 1, "mask type matches ptr type"; caught by tests/test_sm90_compile.py).
        delta = tl.load(dst_delta_ptr + src)
        dst_off = tl.multiple_of(delta + i.to(tl.int64) * H, 16)
        own_off = tl.multiple_of(i.to(tl.int64) * H, 16)
        src_off = prow.to(tl.int64) * H
        c0 = 0
        while c0 < H:
            cols = c0 + tl.arange(0, BLOCK_N)
            cm = (cols < H)[None, :]
            v = tl.load(src_ptr + src_off[:, None] + cols[None, :], mask=ok[:, None] & cm,
                        eviction_policy="evict_first")
            tl.store(dst_base_ptr + dst_off[:, None] + cols[None, :], v, mask=(ok & ~own)[:, None] & cm)
            tl.store(out_ptr + own_off[:, None] + cols[None, :], v, mask=(ok & own)[:, None] & cm)
            c0 += BLOCK_N
        u += NPROG


def combine_push(src: torch.Tensor, plan: DispatchPlan, rank: int, max_tokens_per_rank: int, capacity: int,
                 dst_base: torch.Tensor, dst_delta: torch.Tensor, out: torch.Tensor, config: EPConfig) -> None:
    """Owner side of the push combine: every row of this rank's dispatch layout ``src [cap, H]``
    that holds a real token goes back to row ``i`` of its source's ``dst_base [N + 1, H]`` region
    (rank r's at ``dst_base + dst_delta[r]`` elements), or, for this rank's own tokens, straight
    into row ``i`` of ``out [n, H]`` (this rank's combine output). Pad rows are never read; the
    work is the rows this rank received (bound read on the device), not ``W * N``."""
    H = src.shape[1]
    W, E = plan.src_end.shape
    if max_tokens_per_rank == 0 or capacity == 0:
        return
    t = config.combine
    nprog = min(config.num_programs(t, src.device), cdiv(capacity, t.block_m))
    _combine_push_kernel[(nprog,)](
        src.view(torch.int16), H, rank, out.shape[0], max_tokens_per_rank, capacity, plan.row_base, plan.src_end, E,
        dst_base.view(torch.int16), dst_delta, out.view(torch.int16),
        W=W, W_P=max(next_power_of_2(W), 2), L=E // W, E_P=max(next_power_of_2(E), 2),
        SPREAD=config.spread_parts, BLOCK_M=t.block_m, BLOCK_N=min(t.block_n, next_power_of_2(H)), NPROG=nprog,
        num_warps=t.warps,
    )


@triton.jit
def _combine_gather_kernel(
    src_base_ptr, src_delta_ptr, out_ptr, n_rows, H, rank, capacity,
    row_base_ptr, src_end_ptr, E,
    FROM_OWNERS: tl.constexpr, SPREAD: tl.constexpr, L: tl.constexpr, E_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPROG: tl.constexpr,
):
    # The source side of the combine, writing out[i] for this rank's rows i. Row i went to
    # expert g on owner g // L, at row row_base[rank, g] + i of the owner's dispatch layout (the
    # dispatch's own routing, read backwards).
    # FROM_OWNERS (pull combine): read that row in the owner's region over NVLink, walking the
    #   rows interleaved (work_item) so that every source reads from all owners at once.
    # else (after the push combine): read row i of the local combine region, for rows that came
    #   from other owners; rows of this rank's own experts were written into out by the push.
    # Rows with an invalid route (inconsistent counts) read nothing and come out zero.
    pid = tl.program_id(0)
    num_blocks = tl.cdiv(n_rows, BLOCK_M)
    u = pid
    while u < work_steps(num_blocks, SPREAD):
        b = work_item(u, num_blocks, SPREAD)
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
        in_range = rows < n_rows
        src = tl.zeros([BLOCK_M], tl.int32) + rank
        g, prow = route_rows(row_base_ptr, src_end_ptr, src, rows, in_range, E, E_P)
        ok = in_range & (g < E) & (prow >= 0) & (prow < capacity)   # never read outside
        out_off = rows.to(tl.int64) * H
        if FROM_OWNERS:
            delta = tl.load(src_delta_ptr + g // L, mask=ok, other=0)
            src_off = tl.multiple_of(delta + prow.to(tl.int64) * H, 16)
            write = in_range
        else:
            src_off = out_off
            own = ok & ((g // L) == rank)
            ok = ok & ~own
            write = in_range & ~own
        c0 = 0
        while c0 < H:
            cols = c0 + tl.arange(0, BLOCK_N)
            cm = (cols < H)[None, :]
            v = tl.load(src_base_ptr + src_off[:, None] + cols[None, :], mask=ok[:, None] & cm, other=0,
                        eviction_policy="evict_first")
            tl.store(out_ptr + out_off[:, None] + cols[None, :], v, mask=write[:, None] & cm)
            c0 += BLOCK_N
        u += NPROG


def _combine_gather(src_base, src_delta, plan, rank, out, capacity, from_owners, tiles, config):
    n, H = out.shape
    W, E = plan.src_end.shape
    if n == 0:
        return out
    nprog = max(1, min(config.num_programs(tiles, out.device), cdiv(n, tiles.block_m)))
    _combine_gather_kernel[(nprog,)](
        src_base.view(torch.int16), src_delta, out.view(torch.int16), n, H, rank, capacity,
        plan.row_base, plan.src_end, E, FROM_OWNERS=from_owners,
        SPREAD=config.spread_parts if from_owners else 1, L=E // W,
        E_P=max(next_power_of_2(E), 2), BLOCK_M=tiles.block_m, BLOCK_N=min(tiles.block_n, next_power_of_2(H)),
        NPROG=nprog, num_warps=tiles.warps,
    )
    return out


def combine_pull(src_base: torch.Tensor, src_delta: torch.Tensor, plan: DispatchPlan, rank: int,
                 out: torch.Tensor, capacity: int, config: EPConfig) -> torch.Tensor:
    """Source side of the pull combine: read this rank's ``n`` rows back from their owners'
    dispatch-layout regions (bf16 ``[cap, H]`` at ``src_base + src_delta[owner]`` elements)
    into ``out`` (regular bf16 ``[n, H]``), original row order."""
    return _combine_gather(src_base, src_delta, plan, rank, out, capacity, True, config.pull, config)


def combine_copy_out(region: torch.Tensor, plan: DispatchPlan, rank: int, out: torch.Tensor, capacity: int,
                     config: EPConfig) -> torch.Tensor:
    """Source side of the push combine, after its barrier: copy the rows that other owners
    stored in this rank's combine region ``region [>= n, H]`` into ``out [n, H]``; rows of this
    rank's own experts are already there (written by :func:`combine_push`)."""
    # (no peer addressing of rows on this path: plan.row_base only fills the unused delta argument)
    return _combine_gather(region, plan.row_base, plan, rank, out, capacity, False, config.copy, config)
