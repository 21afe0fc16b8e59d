"""``CollectiveTransport``: torch.distributed collectives (gloo on CPU, or any NCCL group).

Fixed-size messages (every source reserves ``max_tokens_per_rank`` rows per peer), so no split
sizes ever need to reach the host: free of host syncs on CUDA too, but it moves ``W * N`` rows
per rank and permutes on arrival. It is the portable path CI exercises. A rank that skips a
call leaves the others blocked in the collective until the process group's own timeout
(``init_process_group(timeout=...)``) fires.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mxep.ep.layout import DispatchLayout, clamp_counts, compute_dispatch_layout
from mxep.ep.transport.base import BAD_COUNTS, DispatchHandle, Transport, as_mxfp8
from mxep.format.mxfp8 import to_mxfp8

__all__ = ["CollectiveTransport"]


def _finish_rows(out: torch.Tensor, pad_rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """Zero this rank's pad rows (``pad_rows`` int64, scratch-row entries for unused slots) in a
    received ``[capacity + 1, C]`` tensor and drop the scratch row -> ``[capacity, C]``."""
    out.index_fill_(0, pad_rows, 0)
    return out[:capacity]


class CollectiveTransport(Transport):
    name = "collective"

    def __init__(self, group, hidden: int, max_tokens_per_rank: int, capacity: int, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.hidden, self.max_tokens_per_rank, self.capacity = hidden, max_tokens_per_rank, capacity
        self.device = device
        self._combine_input = None
        # The device-side error word (as the symmetric-memory transport's status word):
        # BAD_COUNTS when a rank's counts had to be clamped.
        self._status = torch.zeros((), dtype=torch.int32, device=device)

    def plan(self, counts_i32, num_rows, align):
        counts, bad = clamp_counts(counts_i32, num_rows)
        self._status.bitwise_or_(bad.to(torch.int32) * BAD_COUNTS)
        layout = compute_dispatch_layout(self._exchange_counts(counts), self.max_tokens_per_rank, align)
        return DispatchHandle(self, self.rank, num_rows, layout.group_end_offsets[self.rank],
                              layout.tokens_per_expert[self.rank], layout)

    def status(self) -> int:
        return int(self._status)   # debug-only: host sync

    def combine_input(self):
        # No shared memory to expose: a plain tensor, reused (combine reads it like any input).
        if self._combine_input is None:
            self._combine_input = torch.empty(self.capacity, self.hidden,
                                              dtype=torch.bfloat16, device=self.device)
        return self._combine_input

    def _exchange_counts(self, counts_i32):
        out = torch.empty(self.world * counts_i32.numel(), dtype=counts_i32.dtype, device=counts_i32.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, counts_i32, group=self.group)
        return out.view(self.world, -1)

    # Slot of every source row in the fixed-size send buffer [W * N, ...]: peer-major.
    def _send_slots(self, layout: DispatchLayout, n: int) -> torch.Tensor:
        N = self.max_tokens_per_rank
        W = self.world
        d = layout.dest_rank[self.rank, :n].long()
        start = layout.send_start[self.rank].gather(0, d.clamp(min=0))
        slot = d * N + torch.arange(n, device=d.device) - start
        return torch.where((d >= 0) & (slot >= 0) & (slot < W * N), slot, W * N)  # W * N: scratch slot

    # Destination row of every received slot [W * N]; the scratch row for unused slots.
    def _recv_rows(self, layout: DispatchLayout) -> torch.Tensor:
        W, N = self.world, self.max_tokens_per_rank
        dev = layout.dest_row.device
        j = torch.arange(N, device=dev).view(1, N)
        start = layout.send_start[:, self.rank].view(W, 1)
        valid = j < layout.send_count[:, self.rank].view(W, 1)
        i = (start + j).clamp(max=N - 1)
        rows = layout.dest_row.long().gather(1, i)
        return torch.where(valid & (rows >= 0), rows, layout.trash_row).flatten()

    def _all_to_all_rows(self, send: torch.Tensor) -> torch.Tensor:
        # Move raw bytes: every backend supports uint8, whatever the payload dtype.
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), group=self.group)
        return recv

    def _scatter_to_layout(self, payload: torch.Tensor, layout: DispatchLayout, n: int,
                           splits: tuple[int, ...]) -> list[torch.Tensor]:
        """Send rows ``payload [n, C]`` to their owners (one fixed-size all-to-all) and place them
        in the expert-major layout; ``splits`` cuts the columns into separate outputs (MXFP8 data
        and scales travel in one message but land in two tensors)."""
        W, N = self.world, self.max_tokens_per_rank
        send = torch.zeros(W * N + 1, payload.shape[1], dtype=payload.dtype, device=payload.device)
        if n:
            send.index_copy_(0, self._send_slots(layout, n), payload)
        recv = self._all_to_all_rows(send[: W * N])
        rows = self._recv_rows(layout)
        outs = []
        for part in recv.split(splits, dim=1):
            out = torch.empty(self.capacity + 1, part.shape[1], dtype=payload.dtype, device=payload.device)
            outs.append(_finish_rows(out.index_copy_(0, rows, part), layout.pad_rows[self.rank], self.capacity))
        return outs

    def dispatch_mxfp8(self, x, handle, scale_mode, zero_copy=False):
        # zero_copy: nothing to alias here; fresh tensors keep the same contract (valid until
        # the next dispatch, and longer)
        H = x.shape[1]
        t = to_mxfp8(x, scale_mode)
        packed = torch.cat([t.qdata.view(torch.uint8), t.scale.view(torch.uint8)], dim=1)
        q, s = self._scatter_to_layout(packed, handle.state, x.shape[0], (H, H // 32))
        return as_mxfp8(q, s)

    def dispatch_bf16(self, src, handle):
        (out,) = self._scatter_to_layout(src, handle.state, src.shape[0], (src.shape[1],))
        return out

    def combine_bf16(self, src, handle):
        layout, n = handle.state, handle.num_rows
        W, N = self.world, self.max_tokens_per_rank
        rows = self._recv_rows(layout)  # the slot -> dispatch-row map, read in reverse
        rows = torch.where(rows == layout.trash_row, 0, rows)
        send = src.index_select(0, rows) if src.shape[0] else torch.zeros(W * N, src.shape[1], dtype=src.dtype, device=src.device)
        recv = torch.cat([self._all_to_all_rows(send), torch.zeros_like(send[:1])])  # + scratch slot
        if n == 0:
            return recv[:0].clone()
        return recv.index_select(0, self._send_slots(layout, n))
