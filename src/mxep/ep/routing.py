"""Source-side routing of the token-level dispatch: two Triton launches (or sync-free torch ops
where no Triton runs), no host sync.

From ``topk_idx`` int ``[t, k]`` (global expert ids, ``-1``: no expert) every rank derives, on
the device and without a host sync:

* ``counts`` int32 ``[E]``: (token, expert) pairs per global expert (the row-level counts of the
  stably expert-sorted expansion);
* ``tokens_per_rank`` int32 ``[W]``: tokens sent to each rank (a token with several experts on
  one rank is sent there once);
* ``slot`` int32 ``[t, W]``: the token's position among this rank's tokens for that rank (in
  token order), ``-1`` where it does not go there; on owner ``d`` it lands in token slot
  ``rank * T + slot[t, d]``;
* ``pair_owner`` int32 ``[t, k]``: the rank of each pair's expert, ``-1`` for ``-1`` slots;
* ``pair_index`` int32 ``[t, k]``: each pair's index in the stably expert-sorted expansion
  (pairs sorted by expert, ties in token order then slot order), ``-1`` for ``-1`` slots; with
  the plan's ``row_base`` it gives the pair's row in its owner's layout, bit for bit the row
  the row-level dispatch of that expansion gives.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, next_power_of_2, triton_available_for

__all__ = ["TokenRoute", "route_tokens"]


class TokenRoute(NamedTuple):
    counts: torch.Tensor
    tokens_per_rank: torch.Tensor
    slot: torch.Tensor
    pair_owner: torch.Tensor
    pair_index: torch.Tensor
    expert: torch.Tensor          # int64 [t, k]: the pair's global expert, E for -1 slots
    errors: torch.Tensor          # int32 [2]: out-of-range ids, repeated ids (this call)


def route_tokens(topk_idx: torch.Tensor, num_experts: int, world_size: int,
                 error_totals: torch.Tensor | None = None) -> TokenRoute:
    """``topk_idx`` int32/int64 ``[t, k]`` -> :class:`TokenRoute` (all on its device). Ids outside
    ``[0, E)`` are treated as ``-1`` (no expert): never out of bounds, never a host sync; they
    and ids repeated within a row are counted (``TokenRoute.errors``, and added to
    ``error_totals``, int32 ``[2]``, when given).

    On CUDA (and under the CPU interpreter) two Triton launches and a memset
    (:func:`_route_triton`); elsewhere the same values from sync-free torch ops."""
    if triton_available_for(topk_idx) and topk_idx.shape[0] > 0:
        return _route_triton(topk_idx.contiguous(), num_experts, world_size, error_totals)
    route = _route_torch(topk_idx, num_experts, world_size)
    if error_totals is not None:
        error_totals.add_(route.errors)
    return route


# Pairs per program (a power of two) and the compare tile of the in-chunk rank (the rank of a
# pair among its chunk's earlier pairs of the same expert is counted against JB pairs at a
# time). 256 pairs (32 tokens of top-8): 11.8 us, one H200, 512 tokens x top-8 of 256 experts,
# W 4, both launches (docs/tuning.md; benchmarks/bench_route.py).
ROUTE_PAIRS = 256
ROUTE_JB = 32


@triton.jit
def _route_owner(e, E, L):
    valid = (e >= 0) & (e < E)
    return valid, tl.where(valid, e // L, -1)


@triton.jit
def _token_rank_hits(idx_ptr, pid, t, K, E, L, BT: tl.constexpr, K_P: tl.constexpr, W_P: tl.constexpr):
    """Tokens ``[pid * BT, (pid + 1) * BT)``: ``(tok [BT], hits int32 [BT, W_P])``, hits[i, d] = 1
    where token i has an expert on rank d."""
    tok = pid.to(tl.int64) * BT + tl.arange(0, BT)
    jj = tl.arange(0, K_P)
    pm = (tok < t)[:, None] & (jj < K)[None, :]
    e2 = tl.load(idx_ptr + tok[:, None] * K + jj[None, :], mask=pm, other=-1).to(tl.int64)
    _, own2 = _route_owner(e2, E, L)
    dd = tl.arange(0, W_P)
    return tok, tl.max((own2[:, :, None] == dd[None, None, :]).to(tl.int32), axis=1)


@triton.jit
def _route_hist_kernel(idx_ptr, t, K, E, L, P, hist_ptr, expert_ptr, owner_ptr, err_ptr, err_total_ptr,
                       E_P: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, K_P: tl.constexpr,
                       BP: tl.constexpr, BT: tl.constexpr, TOTALS: tl.constexpr):
    """Program ``p``: the expert histogram of pairs ``[p * BP, (p + 1) * BP)`` into ``hist[p]``
    (atomics: integer sums, so the result does not depend on their order), the rank histogram of
    tokens ``[p * BT, (p + 1) * BT)`` (a token counts once per rank it has an expert on) into
    ``rhist[p]``; each pair's expert (``E`` for none) and owner (``-1``); and the counts of
    out-of-range ids and of ids repeating an earlier slot of their row into ``err`` (and
    ``err_total`` when ``TOTALS``). ``hist`` is the zeroed scratch: ``P`` expert histograms,
    then ``P`` rank histograms (one allocation, no slicing on the host)."""
    pid = tl.program_id(0)
    rhist_ptr = hist_ptr + P * E_P
    f = pid.to(tl.int64) * BP + tl.arange(0, BP)
    fm = f < t * K
    e = tl.load(idx_ptr + f, mask=fm, other=-1).to(tl.int64)
    valid, owner = _route_owner(e, E, L)
    tl.store(expert_ptr + f, tl.where(valid, e, E), mask=fm)
    tl.store(owner_ptr + f, owner.to(tl.int32), mask=fm)
    tl.atomic_add(hist_ptr + pid * E_P + tl.where(valid, e, 0), 1, mask=fm & valid, sem="relaxed")
    # routing errors: ids other than -1 outside [0, E); valid ids equal to an earlier slot's
    jj = tl.arange(0, K_P)
    tok, j = f // K, f % K
    earlier = tl.load(idx_ptr + tok[:, None] * K + jj[None, :], mask=fm[:, None] & (jj[None, :] < j[:, None]),
                      other=-1).to(tl.int64)
    repeat = valid & (tl.sum((earlier == e[:, None]).to(tl.int32), axis=1) > 0)
    bad = tl.sum((fm & ~valid & (e != -1)).to(tl.int32), axis=0)
    rep = tl.sum(repeat.to(tl.int32), axis=0)
    tl.atomic_add(err_ptr, bad, sem="relaxed")
    tl.atomic_add(err_ptr + 1, rep, sem="relaxed")
    if TOTALS:
        tl.atomic_add(err_total_ptr, bad, sem="relaxed")
        tl.atomic_add(err_total_ptr + 1, rep, sem="relaxed")
    _, hits = _token_rank_hits(idx_ptr, pid, t, K, E, L, BT, K_P, W_P)
    dd = tl.arange(0, W_P)
    tl.store(rhist_ptr + pid * W_P + dd, tl.sum(hits, axis=0), mask=dd < W)


@triton.jit
def _route_rank_kernel(idx_ptr, t, K, E, L, P, hist_ptr, base_ptr, counts_ptr, sent_ptr,
                       slot_ptr, pair_index_ptr,
                       E_P: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, K_P: tl.constexpr,
                       BP: tl.constexpr, BT: tl.constexpr, JB: tl.constexpr):
    """Program ``p``: the histograms of programs ``< p`` (prefix) and of all (totals) give its
    pairs' first index in the stable expert sort (``start[e] + prefix[e]``) and its tokens' first
    slot per rank; the in-chunk rank of a pair among the chunk's earlier pairs of its expert is
    counted by comparison. Program 0 also writes ``counts`` and ``tokens_per_rank``. ``hist``:
    the scratch of :func:`_route_hist_kernel` (expert, then rank histograms)."""
    pid = tl.program_id(0)
    rhist_ptr = hist_ptr + P * E_P
    ee = tl.arange(0, E_P)
    dd = tl.arange(0, W_P)
    total = tl.zeros([E_P], dtype=tl.int32)
    before = tl.zeros([E_P], dtype=tl.int32)
    rtotal = tl.zeros([W_P], dtype=tl.int32)
    rbefore = tl.zeros([W_P], dtype=tl.int32)
    p = 0
    while p < P:
        h = tl.load(hist_ptr + p * E_P + ee)
        rh = tl.load(rhist_ptr + p * W_P + dd)
        total += h
        rtotal += rh
        before += tl.where(p < pid, h, 0)
        rbefore += tl.where(p < pid, rh, 0)
        p += 1
    if pid == 0:
        tl.store(counts_ptr + ee, total, mask=ee < E)
        tl.store(sent_ptr + dd, rtotal, mask=dd < W)
    # the chunk's first sorted index per expert, through memory: a gather by data-dependent index
    tl.store(base_ptr + pid * E_P + ee, tl.cumsum(total, axis=0) - total + before)
    tl.debug_barrier()
    f = pid.to(tl.int64) * BP + tl.arange(0, BP)
    fm = f < t * K
    e = tl.load(idx_ptr + f, mask=fm, other=-1).to(tl.int64)
    valid, _ = _route_owner(e, E, L)
    ei = tl.where(valid, e, -1).to(tl.int32)
    li = tl.arange(0, BP)
    rank = tl.zeros([BP], dtype=tl.int32)
    for jb in tl.static_range(BP // JB):
        fj = pid.to(tl.int64) * BP + jb * JB + tl.arange(0, JB)
        ej = tl.load(idx_ptr + fj, mask=fj < t * K, other=-1).to(tl.int64)
        ej = tl.where((ej >= 0) & (ej < E), ej, -2).to(tl.int32)     # never equal to a valid ei
        lj = jb * JB + tl.arange(0, JB)
        same = (ei[:, None] == ej[None, :]) & (lj[None, :] < li[:, None])
        rank += tl.sum(same.to(tl.int32), axis=1)
    first = tl.load(base_ptr + pid * E_P + tl.where(valid, e, 0), mask=fm & valid, other=0)
    tl.store(pair_index_ptr + f, tl.where(valid, first + rank, -1), mask=fm)
    # token slots: the rank's running count of this program's tokens, after the earlier programs'
    tok, hits = _token_rank_hits(idx_ptr, pid, t, K, E, L, BT, K_P, W_P)
    tm = tok < t
    pos = tl.cumsum(hits, axis=0) - hits + rbefore[None, :]
    tl.store(slot_ptr + tok[:, None] * W + dd[None, :], tl.where(hits > 0, pos, -1),
             mask=tm[:, None] & (dd < W)[None, :])


def _route_triton(topk_idx: torch.Tensor, num_experts: int, world_size: int,
                  error_totals: torch.Tensor | None) -> TokenRoute:
    t, k = topk_idx.shape
    E, W = num_experts, world_size
    dev = topk_idx.device
    E_P, W_P, K_P = next_power_of_2(E), max(next_power_of_2(W), 2), max(next_power_of_2(k), 2)
    BP = ROUTE_PAIRS
    BT = max(BP // K_P, 1)
    P = max(cdiv(t * k, BP), cdiv(t, BT))
    scratch = torch.zeros(P * (E_P + W_P) + 2, dtype=torch.int32, device=dev)   # one memset
    errors = scratch[-2:]   # (the histograms: the rest, addressed in the kernels)
    base = torch.empty(P * E_P, dtype=torch.int32, device=dev)
    expert = torch.empty(t, k, dtype=torch.int64, device=dev)
    owner = torch.empty(t, k, dtype=torch.int32, device=dev)
    pair_index = torch.empty(t, k, dtype=torch.int32, device=dev)
    slot = torch.empty(t, W, dtype=torch.int32, device=dev)
    counts = torch.empty(E, dtype=torch.int32, device=dev)
    sent = torch.empty(W, dtype=torch.int32, device=dev)
    L = E // W
    _route_hist_kernel[(P,)](topk_idx, t, k, E, L, P, scratch, expert, owner, errors,
                             error_totals if error_totals is not None else errors,
                             E_P=E_P, W=W, W_P=W_P, K_P=K_P, BP=BP, BT=BT, TOTALS=error_totals is not None,
                             num_warps=4)
    _route_rank_kernel[(P,)](topk_idx, t, k, E, L, P, scratch, base, counts, sent, slot, pair_index,
                             E_P=E_P, W=W, W_P=W_P, K_P=K_P, BP=BP, BT=BT, JB=ROUTE_JB, num_warps=8)
    return TokenRoute(counts, sent, slot, owner, pair_index, expert, errors)


def _route_torch(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> TokenRoute:
    """The same routing in sync-free torch ops (devices without Triton)."""
    t, k = topk_idx.shape
    E, W = num_experts, world_size
    L = E // W
    dev = topk_idx.device
    idx = topk_idx.to(torch.int64)
    valid = (idx >= 0) & (idx < E)
    expert = torch.where(valid, idx, E)                                        # [t, k], E = none
    counts = torch.zeros(E + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(0, expert.flatten(), torch.ones(t * k, dtype=torch.int32, device=dev))
    # Index in the stable expert-sorted expansion: a stable sort of the flattened (token-major)
    # pairs by expert puts ties in token order, then slot order.
    order = torch.argsort(expert.flatten(), stable=True)
    rank_of = torch.empty_like(order)
    rank_of[order] = torch.arange(t * k, device=dev)
    pair_index = torch.where(valid, rank_of.view(t, k), -1).to(torch.int32)
    owner = torch.where(valid, expert // L, -1)
    # hits rank-major, [W + 1, t]: the running count per rank is then a scan along contiguous
    # memory (a scan over dim 0 of a [t, W] tensor runs W-wide: 44 us for 512 x 4 on an H200,
    # where this one is a few; benchmarks/bench_tokens_simulated.py --profile)
    hits = torch.zeros(W + 1, t, dtype=torch.int32, device=dev)
    hits.scatter_(0, torch.where(valid, owner, W).t(), 1)
    hits = hits[:W]
    pos = hits.cumsum(1, dtype=torch.int32) - hits
    slot = torch.where(hits > 0, pos, -1).t().contiguous()                    # [t, W]
    bad = ((idx != -1) & ~valid).sum()
    same = (idx[:, :, None] == idx[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    repeat = torch.tril(same.to(torch.int32), diagonal=-1).amax(2).sum()   # equal to an earlier slot
    errors = torch.stack([bad, repeat]).to(torch.int32)
    return TokenRoute(counts[:E], hits.sum(1, dtype=torch.int32), slot, owner.to(torch.int32), pair_index, expert,
                      errors)
