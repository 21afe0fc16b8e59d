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
torch ops cost more host time than the latency-bound dispatch itself (docs/performance-notes.md).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mxep.kernels._host import next_power_of_2
from mxep.kernels.signals import COUNTS_FLAG, TIMEOUT_COUNTS, max_spin, seq_word, signal_ranks, wait_flags

_COUNTS_FLAG = tl.constexpr(COUNTS_FLAG)
_TIMEOUT_COUNTS = tl.constexpr(TIMEOUT_COUNTS)

__all__ = ["DispatchPlan", "CountsExchange", "compute_plan"]


@triton.jit
def _plan_kernel(counts_ptr, row_base_ptr, src_end_ptr, group_end_ptr, recv_ptr, recv_cum_ptr,
                 my_counts_ptr, delta_ptr, sig_ptr, rank,
                 W: tl.constexpr, E: tl.constexpr, L: tl.constexpr, ALIGN: tl.constexpr,
                 W_P: tl.constexpr, E_P: tl.constexpr,
                 PUT: tl.constexpr, WAIT: tl.constexpr, PLAN: tl.constexpr, MAX_SPIN: tl.constexpr):
    # The counts exchange of the "flags" sync (kernels/signals.py) runs in this same program:
    # PUT stores this rank's count row into every rank's matrix and raises counts_flag there,
    # WAIT spins until every rank's row of this call is here. A real world does all three phases
    # in one launch; the simulated world launches PUT for every rank, then WAIT + PLAN.
    s = tl.arange(0, W_P)
    g = tl.arange(0, E_P)
    m2 = (s < W)[:, None] & (g < E)[None, :]
    offs = s[:, None] * E + g[None, :]
    if PUT or WAIT:
        e = tl.load(sig_ptr + seq_word(W)) + 1    # this call's number (seq is raised below, by PLAN)
    if PUT:
        mine = tl.load(my_counts_ptr + g, mask=g < E, other=0)
        delta = tl.load(delta_ptr + s, mask=s < W, other=0)
        tl.store(counts_ptr + delta[:, None] + rank * E + g[None, :], mine[None, :] + tl.zeros([W_P, E_P], tl.int32),
                 mask=m2)
        signal_ranks(sig_ptr, delta_ptr, _COUNTS_FLAG * W + rank, e, -1, W, W_P)
    if WAIT:
        wait_flags(sig_ptr, _COUNTS_FLAG, e, -1, _TIMEOUT_COUNTS, W, MAX_SPIN)
    if not PLAN:
        return
    # volatile: peers wrote these rows; never serve them from a stale L1 line
    C = tl.load(counts_ptr + offs, mask=m2, other=0, volatile=WAIT).to(tl.int32)
    src_end = tl.cumsum(C, axis=1)
    prefix_src = tl.cumsum(C, axis=0) - C                 # rows of lower sources, per expert
    recv = tl.sum(C, axis=0)                              # [E_P]
    padded = tl.maximum((recv + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
    padded = tl.where(g < E, padded, 0)
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
    if WAIT:
        tl.store(sig_ptr + seq_word(W), e)


class DispatchPlan:
    """Output of :func:`compute_plan` (device tensors, see the module docstring)."""

    def __init__(self, row_base, src_end, group_end, recv, recv_cum, num_local_experts: int, align: int):
        self.row_base, self.src_end, self.group_end, self.recv = row_base, src_end, group_end, recv
        self.recv_cum = recv_cum
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


def compute_plan(counts: torch.Tensor, align: int, exchange: "CountsExchange | None" = None,
                 phase: str = "all") -> DispatchPlan | None:
    """``counts`` int32 ``[W, E]`` (this rank's count matrix) -> :class:`DispatchPlan` (one kernel
    launch, no host sync).

    ``exchange`` (the "flags" sync): the same launch first exchanges the count rows (this rank's
    ``exchange.my_counts`` into every rank's matrix, then waits for all of them). ``phase``:
    ``"all"`` (a real world), or ``"put"`` (returns None) then ``"plan"`` for the simulated
    world, which runs one phase on every rank before the next.
    """
    W, E = counts.shape
    dev = counts.device
    row_base = torch.empty(W, E, dtype=torch.int32, device=dev)
    src_end = torch.empty(W, E, dtype=torch.int32, device=dev)
    group_end = torch.empty(E, dtype=torch.int32, device=dev)
    recv = torch.empty(E, dtype=torch.int32, device=dev)
    recv_cum = torch.empty(W, E, dtype=torch.int32, device=dev)
    if exchange is None:
        put = wait = False
        ex_args = (counts, recv, recv, 0)      # unused pointers
    else:
        if phase not in ("all", "put", "plan"):
            raise ValueError(f"phase must be 'all', 'put' or 'plan', got {phase!r}")
        put, wait = phase in ("all", "put"), phase in ("all", "plan")
        ex_args = (exchange.my_counts, exchange.delta_i32, exchange.signals, exchange.rank)
    _plan_kernel[(1,)](counts, row_base, src_end, group_end, recv, recv_cum, *ex_args,
                       W=W, E=E, L=E // W, ALIGN=align,
                       W_P=next_power_of_2(W), E_P=max(next_power_of_2(E), 2),
                       PUT=put, WAIT=wait, PLAN=phase != "put", MAX_SPIN=max_spin(dev.type),
                       num_warps=4)
    if phase == "put":
        return None
    return DispatchPlan(row_base, src_end, group_end, recv, recv_cum, E // W, align)


class CountsExchange(NamedTuple):
    """What the plan kernel needs to exchange count rows itself (the "flags" sync).

    Attributes:
        my_counts: int32 ``[E]`` this rank's num_tokens_per_expert.
        delta_i32: int64 ``[W]`` every rank's allocation minus this one's, in int32 elements.
        signals: int32 ``[4W + 4]`` this rank's signal words (kernels/signals.py).
        rank: this rank.
    """

    my_counts: torch.Tensor
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
