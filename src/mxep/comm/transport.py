"""How rows reach other ranks. Two transports produce the same bytes (docs/layout.md):

* :class:`SymmMemTransport` (CUDA, one node): PyTorch symmetric memory. Counts are exchanged by
  a kernel writing into the peers' buffers; the fused kernel quantizes each row in registers and
  stores it at its final expert-major row on the owner over NVLink; device-side barriers
  (symmetric-memory signal pads) order the phases. No host sync, no extra collective.
* :class:`CollectiveTransport` (gloo on CPU, or any NCCL group): torch.distributed collectives
  with *fixed-size* messages (every source reserves ``max_tokens_per_rank`` rows per peer), so
  no split sizes ever need to reach the host: also free of host syncs on CUDA, but it moves
  ``W * N`` rows per rank and permutes on arrival. It is the portable path CI exercises.

Every method is collective: all ranks call the same methods in the same order on one stream.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mxep.comm.layout import DispatchLayout
from mxep.comm.peer_memory import PeerMemory, RegionLayout

__all__ = ["Transport", "SymmMemTransport", "CollectiveTransport", "ReturnRoutes", "return_routes"]


class ReturnRoutes:
    """Owner-side table: for each row ``p`` of this rank's dispatch buffer, the (source rank,
    source row) it came from; ``-1`` for pad rows. int32 ``[cap + 1]`` each."""

    def __init__(self, src_rank: torch.Tensor, src_row: torch.Tensor):
        self.src_rank = src_rank
        self.src_row = src_row


def return_routes(layout: DispatchLayout, rank: int) -> ReturnRoutes:
    W, N = layout.dest_rank.shape
    dev = layout.dest_rank.device
    trash = layout.trash_row
    mine = layout.dest_rank == rank
    idx = torch.where(mine, layout.dest_row.long(), trash).flatten()
    grid_rank = torch.arange(W, device=dev, dtype=torch.int32).view(W, 1).expand(W, N)
    grid_row = torch.arange(N, device=dev, dtype=torch.int32).view(1, N).expand(W, N)
    src_rank = torch.full((trash + 1,), -1, dtype=torch.int32, device=dev)
    src_row = torch.full((trash + 1,), -1, dtype=torch.int32, device=dev)
    src_rank.scatter_(0, idx, torch.where(mine, grid_rank, -1).flatten())
    src_row.scatter_(0, idx, torch.where(mine, grid_row, -1).flatten())
    src_rank[trash] = -1
    return ReturnRoutes(src_rank, src_row)


class Transport:
    name = "abstract"

    def exchange_counts(self, counts_i32: torch.Tensor) -> torch.Tensor:
        """``[E]`` int32 -> ``[W, E]`` count matrix (row s = source s)."""
        raise NotImplementedError

    def dispatch_mxfp8(self, x: torch.Tensor, layout: DispatchLayout, end: torch.Tensor, scale_mode: str):
        """Quantize and move rows. Returns uint8 ``([cap+1, H], [cap+1, H//32])``; rows below
        ``end`` (device int32 ``[1]``) hold the layout's data rows; pad rows are not yet zero."""
        raise NotImplementedError

    def dispatch_bf16(self, src: torch.Tensor, layout: DispatchLayout, end: torch.Tensor) -> torch.Tensor:
        """Move bf16 rows ``[n, H]`` into the dispatch layout -> ``[cap+1, H]`` (pads not zeroed)."""
        raise NotImplementedError

    def combine_bf16(self, src: torch.Tensor, layout: DispatchLayout, end: torch.Tensor, n: int,
                     routes: ReturnRoutes | None) -> torch.Tensor:
        """Move rows of the dispatch layout ``[cap, H]`` back to their sources -> ``[n, H]``."""
        raise NotImplementedError


class SymmMemTransport(Transport):
    name = "symm_mem"

    def __init__(self, group, regions: RegionLayout, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group
        self.rank = dist.get_rank(group)
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required by older torch, a no-op later
            symm_mem.enable_symm_mem_for_group(group.group_name)
        mem = symm_mem.empty(regions.total_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(mem, group)
        self.peer = PeerMemory(mem, list(self.handle.buffer_ptrs), self.rank, regions)
        # Poison once so a row that nobody wrote cannot pass for data (tests check bytes).
        mem.fill_(0xA5)
        self.handle.barrier(channel=0)

    def _barrier(self) -> None:
        self.handle.barrier(channel=0)

    def exchange_counts(self, counts_i32):
        # No entry barrier needed: peers read their count matrix before the previous dispatch's
        # completion barrier, which this rank has passed.
        self.peer.put_counts(counts_i32)
        self._barrier()
        return self.peer.counts

    def dispatch_mxfp8(self, x, layout, end, scale_mode):
        # The counts barrier doubles as the entry barrier: every owner has copied out the previous
        # call's rows (stream order) before it arrived there.
        self.peer.push_mxfp8(x, layout.dest_rank[self.rank], layout.dest_row[self.rank], scale_mode)
        self._barrier()
        return self.peer.copy_out_mxfp8(end)

    def dispatch_bf16(self, src, layout, end):
        self._barrier()  # entry: owners are done with their dispatch region
        self.peer.push_bf16_dispatch(src, layout.dest_rank[self.rank], layout.dest_row[self.rank])
        self._barrier()
        return self.peer.copy_out_bf16_dispatch(end)

    def combine_bf16(self, src, layout, end, n, routes):
        self._barrier()  # entry: sources are done with their combine region
        self.peer.push_bf16_combine(src, routes.src_rank, routes.src_row, end)
        self._barrier()
        return self.peer.copy_out_combine(n)


class CollectiveTransport(Transport):
    name = "collective"

    def __init__(self, group, regions: RegionLayout, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.regions = regions
        self.device = device

    def exchange_counts(self, counts_i32):
        out = torch.empty(self.world * counts_i32.numel(), dtype=counts_i32.dtype, device=counts_i32.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, counts_i32, group=self.group)
        return out.view(self.world, -1)

    # Slot of every source row in the fixed-size send buffer [W * N, ...]: peer-major.
    def _send_slots(self, layout: DispatchLayout, n: int) -> torch.Tensor:
        N = self.regions.max_tokens_per_rank
        d = layout.dest_rank[self.rank, :n].long()
        start = layout.send_start[self.rank].gather(0, d)
        return d * N + torch.arange(n, device=d.device) - start

    # Destination row of every received slot [W * N]; the scratch row for unused slots.
    def _recv_rows(self, layout: DispatchLayout) -> torch.Tensor:
        W, N = self.world, self.regions.max_tokens_per_rank
        dev = layout.dest_row.device
        j = torch.arange(N, device=dev).view(1, N)
        start = layout.send_start[:, self.rank].view(W, 1)
        valid = j < layout.send_count[:, self.rank].view(W, 1)
        i = (start + j).clamp(max=N - 1)
        rows = layout.dest_row.long().gather(1, i)
        return torch.where(valid, rows, layout.trash_row).flatten()

    def _all_to_all_rows(self, send: torch.Tensor) -> torch.Tensor:
        # Move raw bytes: every backend supports uint8, whatever the payload dtype.
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv.view(torch.uint8), send.view(torch.uint8), group=self.group)
        return recv

    def _scatter_to_layout(self, payload: torch.Tensor, layout: DispatchLayout, n: int) -> torch.Tensor:
        W, N = self.world, self.regions.max_tokens_per_rank
        send = torch.zeros(W * N, payload.shape[1], dtype=payload.dtype, device=payload.device)
        if n:
            send.index_copy_(0, self._send_slots(layout, n), payload)
        recv = self._all_to_all_rows(send)
        out = torch.empty(self.regions.rows, payload.shape[1], dtype=payload.dtype, device=payload.device)
        out.index_copy_(0, self._recv_rows(layout), recv)
        return out

    def dispatch_mxfp8(self, x, layout, end, scale_mode):
        from mxep.format.mxfp8 import to_mxfp8

        H = x.shape[1]
        t = to_mxfp8(x, scale_mode)
        packed = torch.cat([t.qdata.view(torch.uint8), t.scale.view(torch.uint8)], dim=1)
        out = self._scatter_to_layout(packed, layout, x.shape[0])
        return out[:, :H].contiguous(), out[:, H:].contiguous()

    def dispatch_bf16(self, src, layout, end):
        return self._scatter_to_layout(src, layout, src.shape[0])

    def combine_bf16(self, src, layout, end, n, routes):
        W, N = self.world, self.regions.max_tokens_per_rank
        rows = self._recv_rows(layout)  # the slot -> dispatch-row map, read in reverse
        rows = torch.where(rows == layout.trash_row, 0, rows)
        send = src.index_select(0, rows) if src.shape[0] else torch.zeros(W * N, src.shape[1], dtype=src.dtype, device=src.device)
        recv = self._all_to_all_rows(send)
        if n == 0:
            return recv[:0].clone()
        return recv.index_select(0, self._send_slots(layout, n))
