"""Source-side routing of the token-level dispatch, in sync-free torch ops.

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

__all__ = ["TokenRoute", "route_tokens"]


class TokenRoute(NamedTuple):
    counts: torch.Tensor
    tokens_per_rank: torch.Tensor
    slot: torch.Tensor
    pair_owner: torch.Tensor
    pair_index: torch.Tensor
    expert: torch.Tensor          # int64 [t, k]: the pair's global expert, E for -1 slots


def route_tokens(topk_idx: torch.Tensor, num_experts: int, world_size: int) -> TokenRoute:
    """``topk_idx`` int32/int64 ``[t, k]`` -> :class:`TokenRoute` (all on its device). Ids outside
    ``[0, E)`` are treated as ``-1`` (no expert): never out of bounds, never a host sync."""
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
    return TokenRoute(counts[:E], hits.sum(1, dtype=torch.int32), slot, owner.to(torch.int32), pair_index, expert)
