"""Device-side computation of the expert-major, per-expert padded layout (docs/layout.md).

Every rank holds the full count matrix ``C [W, E]`` (row s = source rank s's
``num_tokens_per_expert``) after the counts exchange, and computes the same
:class:`DispatchLayout` from it with a handful of small vectorized torch ops: no host sync, no
collective. Sources use their row of the table to push rows; owners use the column of it that
points at them to push rows back in the combine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxep._utils import padded_group_rows

__all__ = ["DispatchLayout", "compute_dispatch_layout", "capacity_rows", "clamp_counts", "check_blocked_settings",
           "layout_capacity"]


def capacity_rows(world_size: int, num_local_experts: int, max_tokens_per_rank: int, align: int) -> int:
    """Rows of the receive buffer in the true worst case: every source sends all its
    ``max_tokens_per_rank`` rows to one rank, plus up to ``align`` pad rows per local expert
    (an expert that receives nothing still gets ``align`` rows; a non-empty one pads < align)."""
    return world_size * max_tokens_per_rank + num_local_experts * align


def check_blocked_settings(scale_layout: str, hidden: int, align: int) -> None:
    """Raise unless ``scale_layout`` is ``"row_major"``, or ``"blocked"`` with settings whose
    layout is whole tiles of sm_100's blocked scales (mxep/format/blocked.py): every group a
    multiple of 128 rows (``align % 128 == 0``: then every group starts on a tile too) and the
    scales of a row whole 4-byte words (``hidden % 128 == 0``)."""
    from mxep.format.blocked import check_scale_layout

    check_scale_layout(scale_layout)
    if scale_layout != "blocked":
        return
    if align % 128:
        raise ValueError(f"scale_layout='blocked' needs align to be a multiple of 128 (sm_100's scale tiles are 128 "
                         f"rows and may not straddle two experts' groups), got align={align}")
    if hidden % 128:
        raise ValueError(f"scale_layout='blocked' needs hidden to be a multiple of 128 (tiles of 4 scales = 128 "
                         f"elements along the row), got hidden={hidden}")


def layout_capacity(capacity: int, scale_layout: str) -> int:
    """Rows of the dispatch output: ``capacity``, rounded up to a multiple of 128 for blocked
    scales (so that the whole ``[cap, H // 32]`` scale tensor is whole tiles and reads back with
    one reshape, :func:`mxep.format.blocked.from_blocked_scales`)."""
    return -(-capacity // 128) * 128 if scale_layout == "blocked" else capacity


def clamp_counts(counts: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts that describe ``num_rows`` rows, on the device, without a host sync: negative
    counts become 0 and the running sum is cut at ``num_rows`` (rows past the clamped counts are
    not dispatched). Returns ``(clamped int32 [E], bad bool [])``: ``bad`` is True where the
    input was not already a valid description (negative, or not summing to ``num_rows``). The
    symmetric-memory plan kernel applies the same rule in registers."""
    pos = counts.to(torch.int64).clamp(0, num_rows)   # (no count above n: the sums below cannot overflow)
    cum = pos.cumsum(0)
    clamped = cum.clamp(max=num_rows) - (cum - pos).clamp(max=num_rows)
    bad = (clamped != counts.to(torch.int64)).any() | (clamped.sum() != num_rows)
    return clamped.to(torch.int32), bad


@dataclass
class DispatchLayout:
    """Where every row goes, for all ranks (identical on every rank).

    Attributes (all on the device of the counts):
        dest_rank: int32 ``[W, N]``: for source s, row i, the destination rank; -1 for ``i >= n_s``.
        dest_row: int32 ``[W, N]``: the row in the destination's expert-major buffer; -1 likewise.
        send_start: int64 ``[W, W]``: ``[s, d]`` first row of source s that goes to rank d
            (rows of one destination are contiguous because inputs are sorted by expert).
        send_count: int64 ``[W, W]``: ``[s, d]`` number of rows source s sends to rank d.
        group_end_offsets: int32 ``[W, L]``: per destination, cumulative padded group ends.
        tokens_per_expert: int32 ``[W, L]``: per destination, unpadded received counts.
        pad_rows: int64 ``[W, L * align]``: per destination, the pad rows to zero; slots beyond a
            group's padding hold ``trash_row`` (a scratch row past the capacity).
    """

    dest_rank: torch.Tensor
    dest_row: torch.Tensor
    send_start: torch.Tensor
    send_count: torch.Tensor
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    pad_rows: torch.Tensor
    trash_row: int


def compute_dispatch_layout(counts: torch.Tensor, max_tokens_per_rank: int, align: int,
                            capacity: int | None = None, expert_cap: int | None = None) -> DispatchLayout:
    """``counts``: int32/int64 ``[W, E]`` count matrix -> :class:`DispatchLayout`. ``capacity``:
    rows of the receive buffer (default :func:`capacity_rows`; the token-level path's is smaller,
    at most ``min(k, L)`` rows of a token on one rank). ``expert_cap`` (``capacity_factor``): the
    most rows one expert keeps, the first in layout order; later rows are dropped (dest -1).

    Sync-free: only fixed-size tensor ops; shapes depend on (W, E, N, align) alone.

    Example::

        >>> C = torch.tensor([[2, 0, 1, 0], [1, 1, 0, 0]])   # W=2, E=4 (L=2): n_0=3, n_1=2
        >>> lay = compute_dispatch_layout(C, max_tokens_per_rank=3, align=4)
        >>> lay.group_end_offsets.tolist()  # debug-only; rank 0: expert 0 gets 3 rows -> 4, expert 1 gets 1 -> 4
        [[4, 8], [4, 8]]
        >>> lay.dest_rank.tolist(), lay.dest_row.tolist()  # debug-only (doc example)
        ([[0, 0, 1], [0, 0, -1]], [[0, 1, 0], [2, 4, -1]])
    """
    if counts.dim() != 2:
        raise ValueError(f"counts must be [world, num_experts], got shape {tuple(counts.shape)}")
    W, E = counts.shape
    if E % W != 0:
        raise ValueError(f"num_experts ({E}) must be a multiple of the world size ({W})")
    L = E // W
    N = max_tokens_per_rank
    dev = counts.device
    C = counts.to(torch.int64)

    # Owner side: padded group sizes and their starts, per destination rank.
    recv = C.sum(0).view(W, L)                                            # [W(dest), L]
    if expert_cap is not None:
        recv = recv.clamp(max=expert_cap)
    padded = padded_group_rows(recv, align)                               # empty expert -> align rows
    group_end = padded.cumsum(1)
    group_start = group_end - padded

    # Row of the first row of source s for global expert g on g's owner: the group start plus the
    # rows that lower source ranks send to that expert (sources are stacked in rank order).
    prefix_src = C.cumsum(0) - C                                          # [W(src), E]
    first_row = group_start.reshape(1, E) + prefix_src                    # [W, E]

    src_end = C.cumsum(1)                                                 # [W, E]
    src_start = src_end - C
    rows = torch.arange(N, device=dev, dtype=torch.int64).expand(W, N).contiguous()
    g = torch.searchsorted(src_end, rows, right=True)                     # E for rows >= n_s
    g_c = g.clamp(max=E - 1)
    dest_row = first_row.gather(1, g_c) + rows - src_start.gather(1, g_c)
    if capacity is None:
        capacity = capacity_rows(W, L, N, align)
    # Counts that do not describe the rows (not checked outside debug mode: that needs a host
    # sync) must not make anyone write outside the buffer: such rows are dropped.
    valid = (g < E) & (dest_row >= 0) & (dest_row < capacity)
    if expert_cap is not None:   # the row's position in its expert's group, past the cap: dropped
        valid &= prefix_src.gather(1, g_c) + rows - src_start.gather(1, g_c) < expert_cap
    dest_row = torch.where(valid, dest_row, -1).to(torch.int32)
    dest_rank = torch.where(valid, g_c // L, -1).to(torch.int32)

    per_dest = C.view(W, W, L)                                            # [src, dest, L]
    send_count = per_dest.sum(2)
    send_start = send_count.cumsum(1) - send_count

    j = torch.arange(align, device=dev, dtype=torch.int64).view(1, 1, align)
    pad = (group_start + recv).unsqueeze(-1) + j                          # [W, L, align]
    pad_rows = torch.where((pad < group_end.unsqueeze(-1)) & (pad < capacity), pad, capacity).view(W, L * align)

    return DispatchLayout(
        dest_rank=dest_rank,
        dest_row=dest_row,
        send_start=send_start,
        send_count=send_count,
        group_end_offsets=group_end.to(torch.int32),
        tokens_per_expert=recv.to(torch.int32),
        pad_rows=pad_rows,
        trash_row=capacity,
    )
