"""The dispatch plan in one kernel launch, and the per-row lookups the peer kernels use.

From the count matrix ``C [W, E]`` (row s = source s's num_tokens_per_expert, in every rank's
symmetric memory after the counts exchange) one program computes small per-expert vectors:

* ``row_base [W, E]`` int32: for source s and global expert g, ``dest_row - i`` of every row i of
  s routed to g (the owner's group start + rows of lower sources for g - s's first row for g);
* ``src_end [W, E]`` int32: ``cumsum(C[s])``: row i of s goes to expert
  ``g = #{g' : src_end[s, g'] <= i}`` (``g == E`` means ``i >= n_s``);
* ``group_end [E]`` int32: per global expert, its padded group end on its owner
  (``group_end_offsets`` of rank d is ``group_end[d*L:(d+1)*L]``);
* ``recv [E]`` int32: rows each expert receives (``tokens_per_expert``);
* ``recv_cum [W, E]`` int32: ``cumsum(C[:, g])`` over sources: on its owner, expert g's group
  holds source s's rows at positions ``[recv_cum[s-1, g], recv_cum[s, g])`` (the combine walks
  the owner's rows with it).

Kernels then find every row's destination in registers (an E-wide compare per row block) instead
of reading per-row tables: the whole plan costs one launch, which matters because a dozen small
torch ops cost more host time than the latency-bound dispatch itself (docs/history.md, #1-#2).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mxep._utils import next_power_of_2, padded_group_rows_jit
from mxep.ep.transport.symm_mem.sync import _BAD_COUNTS, raise_status, seq_word, signal_ranks, wait_flags

__all__ = ["DispatchPlan", "CountsExchange", "compute_plan", "plan_of_counts", "route_rows", "work_item", "work_steps"]


@triton.jit
def _plan_of_matrix(counts_ptr, row_base_ptr, src_end_ptr, group_end_ptr, recv_ptr, recv_cum_ptr, tok_recv_ptr,
                    expert_cap, rank, W: tl.constexpr, E: tl.constexpr, L: tl.constexpr, ALIGN: tl.constexpr,
                    W_P: tl.constexpr, E_P: tl.constexpr, VOLATILE: tl.constexpr):
    """The plan of the count matrix ``counts [W, E + W]`` (every rank's row present): the
    vectors of the module docstring, stored. ``VOLATILE``: peers wrote the matrix (symmetric
    memory; never serve it from a stale L1 line)."""
    CS: tl.constexpr = E + W
    s = tl.arange(0, W_P)
    g = tl.arange(0, E_P)
    m2 = (s < W)[:, None] & (g < E)[None, :]
    offs = s[:, None] * E + g[None, :]
    C = tl.load(counts_ptr + s[:, None] * CS + g[None, :], mask=m2, other=0, volatile=VOLATILE).to(tl.int32)
    tl.store(tok_recv_ptr + s, tl.load(counts_ptr + s * CS + E + rank, mask=s < W, other=0, volatile=VOLATILE), mask=s < W)
    src_end = tl.cumsum(C, axis=1)
    prefix_src = tl.cumsum(C, axis=0) - C                 # rows of lower sources, per expert
    # rows each expert keeps: all of them, or (capacity_factor) at most expert_cap, the first
    # ones in layout order (source rank, then the source's own order); the pairs past it drop
    recv = tl.minimum(tl.sum(C, axis=0), expert_cap)      # [E_P]
    padded = tl.where(g < E, padded_group_rows_jit(recv, ALIGN), 0)
    # Segmented inclusive cumsum of padded sizes within each owner: the global cumsum minus the
    # padded rows of all lower owners' experts (two W x E masked sums; the earlier E x E masked
    # sum touched 65536 elements at E = 256).
    w = tl.arange(0, W_P)
    owner = g // L
    lower = tl.sum(tl.where((g[None, :] // L) < w[:, None], padded[None, :], 0), axis=1)      # [W_P]
    base = tl.sum(tl.where(w[None, :] == owner[:, None], lower[None, :], 0), axis=1)          # [E_P]
    group_end = tl.cumsum(padded, axis=0) - base
    group_start = group_end - padded
    src_start = src_end - C
    row_base = group_start[None, :] + prefix_src - src_start
    tl.store(row_base_ptr + offs, row_base, mask=m2)
    tl.store(src_end_ptr + offs, src_end, mask=m2)
    tl.store(recv_cum_ptr + offs, prefix_src + C, mask=m2)
    tl.store(group_end_ptr + g, group_end, mask=g < E)
    tl.store(recv_ptr + g, recv, mask=g < E)
    return group_end, recv


@triton.jit
def _store_mine(group_end, recv, mine_end_ptr, mine_recv_ptr, rank, L: tl.constexpr, E_P: tl.constexpr):
    loc = tl.arange(0, E_P) - rank * L
    mine = (loc >= 0) & (loc < L)
    tl.store(mine_end_ptr + loc, group_end, mask=mine)
    tl.store(mine_recv_ptr + loc, recv, mask=mine)


@triton.jit
def _plan_kernel(counts_ptr, row_base_ptr, src_end_ptr, group_end_ptr, recv_ptr, recv_cum_ptr, tok_recv_ptr,
                 my_counts_ptr, my_tok_ptr, n_rows, max_tokens, expert_cap, delta_ptr, sig_ptr, rank,
                 mine_end_ptr, mine_recv_ptr,
                 W: tl.constexpr, E: tl.constexpr, L: tl.constexpr, ALIGN: tl.constexpr,
                 W_P: tl.constexpr, E_P: tl.constexpr, EXACT: tl.constexpr, HAS_TOK: tl.constexpr,
                 PUT: tl.constexpr, PLAN: tl.constexpr, MINE: tl.constexpr, MAX_POLLS: tl.constexpr):
    # The counts exchange (sync.py) runs in this same program: PUT stores this rank's count row
    # into every rank's matrix and raises counts_flag there; then the program waits until every
    # rank's row of this call is here. A real world does both in one launch; the simulated world
    # launches PUT for every rank, then the wait + PLAN.
    # A count row is E expert counts, then W token counts (tokens this rank sends each rank:
    # the token-level dispatch; zeros for the row-level one): the matrix is [W, E + W].
    CS: tl.constexpr = E + W
    s = tl.arange(0, W_P)
    g = tl.arange(0, E_P)
    m2 = (s < W)[:, None] & (g < E)[None, :]
    offs = s[:, None] * E + g[None, :]
    e = tl.load(sig_ptr + seq_word(W)) + 1    # this call's number (seq is raised below, by PLAN)
    if PUT:
        # Counts that do not describe the n rows (negative, or summing past n: not checked on
        # the host outside debug mode, that needs a sync) are clamped here, at the source, so
        # that every rank plans with counts that stay inside every buffer: the running sum is
        # cut at n (rows past the clamped counts are not dispatched) and the status word
        # records it (Buffer.check()).
        raw = tl.load(my_counts_ptr + g, mask=g < E, other=0)
        # (each count first cut at n, the running sum in int64: no int32 overflow on 2**31 - 1
        # counts; the cut of the exclusive sum uses the uncut sum, so the rows add up to n)
        pos = tl.minimum(tl.maximum(raw, 0), n_rows).to(tl.int64)
        cum = tl.cumsum(pos, axis=0)
        mine = (tl.minimum(cum, n_rows) - tl.minimum(cum - pos, n_rows)).to(tl.int32)
        bad = tl.sum((mine != raw).to(tl.int32), axis=0) > 0
        if EXACT:   # row-level: the counts must describe every one of the n rows
            bad = bad | (tl.sum(mine, axis=0) != n_rows)
        if bad:
            raise_status(sig_ptr, _BAD_COUNTS, W)
        tok = tl.minimum(tl.maximum(tl.load(my_tok_ptr + s, mask=(s < W) & HAS_TOK, other=0), 0), max_tokens)
        delta = tl.load(delta_ptr + s, mask=s < W, other=0)
        tl.store(counts_ptr + delta[:, None] + rank * CS + g[None, :], mine[None, :] + tl.zeros([W_P, E_P], tl.int32),
                 mask=m2)
        tl.store(counts_ptr + delta[:, None] + rank * CS + E + s[None, :], tok[None, :] + tl.zeros([W_P, W_P], tl.int32),
                 mask=(s < W)[:, None] & (s < W)[None, :])
        signal_ranks(sig_ptr, delta_ptr, rank, e, W, W_P)
    if not PLAN:
        return
    wait_flags(sig_ptr, e, W, MAX_POLLS)
    group_end, recv = _plan_of_matrix(counts_ptr, row_base_ptr, src_end_ptr, group_end_ptr, recv_ptr, recv_cum_ptr,
                                      tok_recv_ptr, expert_cap, rank, W, E, L, ALIGN, W_P, E_P, True)
    if MINE:   # this rank's slices as tensors of their own (group_end_offsets, tokens_per_expert)
        _store_mine(group_end, recv, mine_end_ptr, mine_recv_ptr, rank, L, E_P)
    tl.store(sig_ptr + seq_word(W), e)


class DispatchPlan:
    """Output of :func:`compute_plan` (device tensors, see the module docstring)."""

    def __init__(self, row_base, src_end, group_end, recv, recv_cum, num_local_experts: int, align: int,
                 tok_recv=None, mine=None):
        self.row_base, self.src_end, self.group_end, self.recv = row_base, src_end, group_end, recv
        self.recv_cum = recv_cum
        self.tok_recv = tok_recv   # int32 [W]: tokens each source sends this rank (token-level dispatch)
        # (group_end_offsets, tokens_per_expert) int32 [L] of the planning rank as tensors of
        # their own (compute_plan(mine=True)), else None
        self.mine = mine
        self.num_local_experts = num_local_experts
        self.align = align

    def group_end_offsets(self, rank: int) -> torch.Tensor:
        L = self.num_local_experts
        return self.group_end[rank * L:(rank + 1) * L]

    def tokens_per_expert(self, rank: int) -> torch.Tensor:
        L = self.num_local_experts
        return self.recv[rank * L:(rank + 1) * L]

    def end(self, rank: int) -> torch.Tensor:
        L = self.num_local_experts
        return self.group_end[(rank + 1) * L - 1:(rank + 1) * L]


def _plan_tensors(W: int, E: int, dev) -> tuple[torch.Tensor, ...]:
    """``row_base, src_end [W, E], group_end, recv [E], recv_cum [W, E], tok_recv [W]`` (int32,
    uninitialized; tensors of their own, not views of one allocation: the token-level state
    leaves the registered ops as outputs, which must not alias each other)."""
    return tuple(torch.empty(shape, dtype=torch.int32, device=dev)
                 for shape in ((W, E), (W, E), (E,), (E,), (W, E), (W,)))


def compute_plan(ex: "CountsExchange", align: int, max_polls: int, phase: str = "all",
                 mine: bool = False) -> DispatchPlan | None:
    """Exchange this rank's counts and plan: one kernel launch, no host sync.

    ``ex.my_counts`` (clamped to describe ``ex.num_rows`` rows, see the kernel) goes into row
    ``ex.rank`` of every rank's count matrix; once every rank's row of this call is in
    ``ex.counts`` the plan is computed from it. ``phase``: ``"all"`` (a real world), or
    ``"put"`` (returns None) then ``"plan"`` for the simulated world, which runs one phase on
    every rank before the next. ``mine``: the kernel also writes this rank's group ends and
    received counts (int32 ``[L]`` each) into tensors of their own, ``DispatchPlan.mine`` (what
    a token-level dispatch returns: no slice and copy of ``group_end`` / ``recv`` afterwards).
    """
    if phase not in ("all", "put", "plan"):
        raise ValueError(f"phase must be 'all', 'put' or 'plan', got {phase!r}")
    W = ex.counts.shape[0]
    E = ex.counts.shape[1] - W
    dev = ex.counts.device
    row_base, src_end, group_end, recv, recv_cum, tok_recv = _plan_tensors(W, E, dev)
    L = E // W
    mine = mine and phase != "put"
    mine_out = (torch.empty(L, dtype=torch.int32, device=dev), torch.empty(L, dtype=torch.int32, device=dev)) \
        if mine else (group_end, recv)
    _plan_kernel[(1,)](ex.counts, row_base, src_end, group_end, recv, recv_cum, tok_recv,
                       ex.my_counts, ex.my_tokens if ex.my_tokens is not None else ex.my_counts,
                       ex.num_rows, ex.max_tokens, ex.expert_cap, ex.delta_i32, ex.signals, ex.rank, *mine_out,
                       W=W, E=E, L=L, ALIGN=align,
                       W_P=max(next_power_of_2(W), 2), E_P=max(next_power_of_2(E), 2),
                       EXACT=ex.my_tokens is None, HAS_TOK=ex.my_tokens is not None,
                       PUT=phase != "plan", PLAN=phase != "put", MINE=mine, MAX_POLLS=max_polls, num_warps=4)
    if phase == "put":
        return None
    return DispatchPlan(row_base, src_end, group_end, recv, recv_cum, L, align, tok_recv, mine_out if mine else None)


@triton.jit
def _plan_local_kernel(counts_ptr, row_base_ptr, src_end_ptr, group_end_ptr, recv_ptr, recv_cum_ptr, tok_recv_ptr,
                       mine_end_ptr, mine_recv_ptr, expert_cap, rank, W: tl.constexpr, E: tl.constexpr,
                       L: tl.constexpr, ALIGN: tl.constexpr, W_P: tl.constexpr, E_P: tl.constexpr):
    group_end, recv = _plan_of_matrix(counts_ptr, row_base_ptr, src_end_ptr, group_end_ptr, recv_ptr, recv_cum_ptr,
                                      tok_recv_ptr, expert_cap, rank, W, E, L, ALIGN, W_P, E_P, False)
    _store_mine(group_end, recv, mine_end_ptr, mine_recv_ptr, rank, L, E_P)


def plan_of_counts(counts: torch.Tensor, rank: int, align: int, expert_cap: int) -> DispatchPlan:
    """The plan of a count matrix already on this rank (int32 ``[W, E + W]``, every rank's row,
    as the counts exchange leaves it; the values must be valid: non-negative expert counts, token
    counts ``<= T``): one launch, no wait. The transports that exchange the counts by other means
    than the plan kernel's peer stores (:mod:`mxep.ep.transport.nvshmem`) plan with it; the
    arithmetic is the plan kernel's, so the layouts are the same bits. ``DispatchPlan.mine``
    holds this rank's group ends and received counts (int32 ``[L]``, tensors of their own)."""
    W = counts.shape[0]
    E = counts.shape[1] - W
    dev = counts.device
    row_base, src_end, group_end, recv, recv_cum, tok_recv = _plan_tensors(W, E, dev)
    L = E // W
    mine = (torch.empty(L, dtype=torch.int32, device=dev), torch.empty(L, dtype=torch.int32, device=dev))
    _plan_local_kernel[(1,)](counts, row_base, src_end, group_end, recv, recv_cum, tok_recv, *mine,
                             min(expert_cap, 2**31 - 1), rank, W=W, E=E, L=L, ALIGN=align,
                             W_P=max(next_power_of_2(W), 2), E_P=max(next_power_of_2(E), 2), num_warps=4)
    return DispatchPlan(row_base, src_end, group_end, recv, recv_cum, L, align, tok_recv, mine)


class CountsExchange(NamedTuple):
    """What the plan kernel needs to exchange count rows.

    Attributes:
        counts: int32 ``[W, E + W]`` this rank's count matrix (row s = source s's expert counts,
            then the tokens it sends each rank).
        my_counts: int32 ``[E]`` this rank's expert counts.
        my_tokens: int32 ``[W]`` the tokens this rank sends each rank (token-level dispatch), or
            None (row-level: zeros travel; the expert counts must then sum to ``num_rows``,
            else only not past it).
        num_rows: ``n``, this rank's rows (row-level) or most (token, expert) pairs (token-level).
        max_tokens: the most tokens a rank sends one rank (token counts are clamped to it).
        expert_cap: the most rows one expert keeps (2**31 - 1: all; ``capacity_factor``).
        delta_i32: int64 ``[W]`` every rank's allocation minus this one's, in int32 elements.
        signals: int32 ``[W + 2]`` this rank's signal words (sync.py).
        rank: this rank.
    """

    counts: torch.Tensor
    my_counts: torch.Tensor
    my_tokens: torch.Tensor | None
    num_rows: int
    max_tokens: int
    expert_cap: int
    delta_i32: torch.Tensor
    signals: torch.Tensor
    rank: int


@triton.jit
def route_rows(row_base_ptr, src_end_ptr, src, rows, ok, E, E_P: tl.constexpr):
    """For source rows ``rows`` of sources ``src`` (int32 vectors), return ``(g, dest_row)``: the
    global expert (``E`` for rows past the source's last row) and the row on its owner.

    ``g`` is the number of experts whose cumulative end ``src_end[src, g']`` is <= the row.
    """
    e = tl.arange(0, E_P)
    ends = tl.load(src_end_ptr + src[:, None] * E + e[None, :], mask=ok[:, None] & (e < E)[None, :],
                   other=2147483647)
    g = tl.sum((ends <= rows[:, None]).to(tl.int32), axis=1)
    valid = ok & (g < E)
    base = tl.load(row_base_ptr + src * E + g, mask=valid, other=0)
    return g, base + rows


@triton.jit
def work_item(u, total, SPREAD: tl.constexpr):
    """Item of the ``u``-th step of a walk over items ``[0, total)`` (``total``: past the end,
    for the at most SPREAD - 1 steps of the spread order that have no item). SPREAD = 1: item
    ``u``; else the transposed order ``(u % SPREAD) * ceil(total / SPREAD) + u // SPREAD``: the
    item list (grouped by peer) cut into SPREAD parts walked interleaved, so that a window of P
    consecutive steps touches P / SPREAD items of every part (``EPConfig.spread_parts``). Steps
    run ``u < work_steps(total)``."""
    if SPREAD > 1:
        m = tl.cdiv(total, SPREAD)
        q = u // SPREAD
        t = (u - q * SPREAD) * m + q
        t = tl.where(t < total, t, total)
    else:
        t = u
    return t


@triton.jit
def work_steps(total, SPREAD: tl.constexpr):
    if SPREAD > 1:
        return tl.cdiv(total, SPREAD) * SPREAD
    else:
        return total
