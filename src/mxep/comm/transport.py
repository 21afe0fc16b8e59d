"""How rows reach other ranks. Two transports produce the same bytes (docs/layout.md):

* :class:`SymmMemTransport` (CUDA, one node): PyTorch symmetric memory. Counts are exchanged by
  a kernel writing into the peers' buffers (by default the plan kernel itself, with a release
  flag per row that it waits for: ``TUNING["sync"]``); the fused kernel quantizes each row in
  registers and stores it at its final expert-major row on the owner over NVLink; device-side
  barriers (symmetric-memory signal pads) order the later phases. No host sync, no extra
  collective.
* :class:`CollectiveTransport` (gloo on CPU, or any NCCL group): torch.distributed collectives
  with *fixed-size* messages (every source reserves ``max_tokens_per_rank`` rows per peer), so
  no split sizes ever need to reach the host: also free of host syncs on CUDA, but it moves
  ``W * N`` rows per rank and permutes on arrival. It is the portable path CI exercises.

Every method is collective: all ranks call the same methods in the same order on one stream.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from mxep.comm.layout import DispatchLayout, compute_dispatch_layout
from mxep.comm.peer_memory import PeerMemory, RegionLayout
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.kernels.plan import DispatchPlan
from mxep.kernels.rows import COUNTS_BY_FLAGS, TUNING


@dataclass
class DispatchHandle:
    """What combine and the backward passes need from one dispatch (regular device tensors: a
    later dispatch on the same Buffer does not invalidate it).

    Attributes:
        rank: this rank in the EP group.
        num_rows: ``n``, rows of ``x`` on this rank.
        plan: symmetric-memory transport: the :class:`~mxep.kernels.plan.DispatchPlan`.
        layout: collective transport: the :class:`~mxep.comm.layout.DispatchLayout`.
    """

    rank: int
    num_rows: int
    plan: DispatchPlan | None = None
    layout: DispatchLayout | None = None
    sync: str = "barrier"          # how the plan was made (TUNING["sync"] at the time)
    dispatched: bool = False       # its MXFP8 dispatch ran (one per plan)

    @property
    def group_end_offsets(self) -> torch.Tensor:
        """int32 ``[L]`` cumulative padded group ends on this rank."""
        if self.plan is not None:
            return self.plan.group_end_offsets(self.rank)
        return self.layout.group_end_offsets[self.rank]

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """int32 ``[L]`` unpadded rows received per local expert."""
        if self.plan is not None:
            return self.plan.tokens_per_expert(self.rank)
        return self.layout.tokens_per_expert[self.rank]


def finish_rows(out: torch.Tensor, pad_rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """Zero this rank's pad rows (``pad_rows`` int64, scratch-row entries for unused slots) in a
    received ``[capacity + 1, C]`` tensor and drop the scratch row -> ``[capacity, C]``."""
    out.index_fill_(0, pad_rows, 0)
    return out[:capacity]


def as_mxfp8(q: torch.Tensor, s: torch.Tensor) -> MXFP8Tensor:
    """uint8 data ``[cap, H]`` and scales ``[cap, H // 32]`` -> bf16-typed :class:`MXFP8Tensor`."""
    return MXFP8Tensor(q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), torch.bfloat16)

__all__ = ["Transport", "SymmMemTransport", "CollectiveTransport", "DispatchHandle"]


class Transport:
    """All methods are collective (every rank, same order, one stream) and sync-free."""

    name = "abstract"

    def plan(self, counts_i32: torch.Tensor, num_rows: int, align: int) -> DispatchHandle:
        """Exchange counts (``[E]`` int32 per rank) and compute where every row goes."""
        raise NotImplementedError

    def dispatch_mxfp8(self, x: torch.Tensor, handle: DispatchHandle, scale_mode: str,
                       zero_copy: bool = False) -> MXFP8Tensor:
        """Quantize and move rows -> ``[cap, H]`` MXFP8, expert-major, pad rows zero.
        ``zero_copy``: the result may alias the transport's memory (see ``Buffer.dispatch``)."""
        raise NotImplementedError

    def dispatch_bf16(self, src: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Move bf16 rows ``[n, H]`` into the dispatch layout -> ``[cap, H]``, pad rows zero."""
        raise NotImplementedError

    def combine_bf16(self, src: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Move rows of the dispatch layout ``[cap, H]`` back to their sources -> ``[n, H]``."""
        raise NotImplementedError

    def combine_input(self) -> torch.Tensor:
        """bf16 ``[cap, H]`` that :meth:`combine_bf16` can read without a staging copy."""
        raise NotImplementedError

    def check(self) -> None:
        """Debug mode only (may sync with the host): raise if the device reported an error."""


class _NoBarrier:
    """The symmetric-memory handle of a one-rank world without symmetric memory: a barrier with
    nobody to wait for. Counts barriers like the real one (``barriers``: tests read it)."""

    barriers = 0

    def barrier(self, channel: int = 0) -> None:
        self.barriers += 1


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
        # Every rank's stream first drains what it queued before (a previous Buffer's kernels may
        # still be storing into memory that this allocation now reuses); then poison once, so a
        # row that nobody wrote cannot pass for data (tests check bytes), and zero the signal
        # words, whose values must only ever come from this Buffer's calls; then all ranks meet.
        self.handle.barrier(channel=0)
        mem.fill_(0xA5)
        self.peer.clear_signals()
        self.handle.barrier(channel=0)
        self._unpushed: DispatchHandle | None = None   # flag-exchanged counts: the plan awaiting its dispatch
        self._combine_sync: str | None = None          # how the last push combine was ordered
        self._combine_region_read = False              # a combine copy-out was queued since the last barrier

    @classmethod
    def over_local_memory(cls, regions: RegionLayout, device: torch.device | str = "cpu",
                          group=None) -> "SymmMemTransport":
        """A world-size-1 transport over a plain tensor (no symmetric memory; barriers are
        no-ops): the symmetric-memory code path, host logic and kernels, where there is no
        symmetric memory (CPU tests under the interpreter, host-cost measurements)."""
        if regions.world_size != 1:
            raise ValueError(f"over_local_memory is a one-rank world, got world_size={regions.world_size}")
        self = cls.__new__(cls)
        self.group, self.rank, self.handle = group, 0, _NoBarrier()
        mem = torch.full((regions.total_bytes,), 0xA5, dtype=torch.uint8, device=device)
        self.peer = PeerMemory(mem, [mem.data_ptr()], 0, regions)
        self.peer.clear_signals()
        self._unpushed = None
        self._combine_sync = None
        self._combine_region_read = False
        return self

    def _barrier(self) -> None:
        # Once every rank has passed a barrier queued after its last combine copy-out, no
        # rank still reads its combine region: the next push combine needs no entry barrier
        # of its own (every rank runs the same calls, so every rank's k-th barrier follows the
        # same copy-outs).
        self.handle.barrier(channel=0)
        self._combine_region_read = False

    def plan(self, counts_i32, num_rows, align):
        sync = TUNING["sync"]
        if sync in COUNTS_BY_FLAGS:
            # One launch: counts to every rank, wait for theirs, plan (kernels/signals.py). Its
            # ordering argument needs every plan to be followed by its dispatch (host-side
            # check): a rank writes its next count row into a peer's matrix only after the
            # peer's push of this call ("flags": its push flag; "counts_flags": the barrier
            # after the push), hence after the peer's plan read the matrix.
            if self._unpushed is not None:
                raise RuntimeError(f"sync={sync!r}: the previous plan was never dispatched; every plan must be "
                                   "followed by its MXFP8 dispatch before the next plan (Buffer.dispatch does both)")
            handle = DispatchHandle(self.rank, num_rows, plan=self.peer.exchange_and_plan(counts_i32, align),
                                    sync=sync)
            self._unpushed = handle
            return handle
        # No entry barrier needed: peers read their count matrix (plan kernel) before the previous
        # dispatch's completion barrier, which this rank has passed.
        self.peer.put_counts(counts_i32)
        self._barrier()
        return DispatchHandle(self.rank, num_rows, plan=self.peer.plan(align))

    def dispatch_mxfp8(self, x, handle, scale_mode, zero_copy=False):
        if handle.dispatched:
            # A second push of one plan could land in an owner still copying out the first.
            raise RuntimeError("this DispatchHandle's MXFP8 dispatch already ran; plan again for another dispatch")
        handle.dispatched = True
        if handle.sync in COUNTS_BY_FLAGS:
            if handle is not self._unpushed:
                raise RuntimeError(f"sync={handle.sync!r}: only the latest plan of this Buffer can be dispatched")
            self._unpushed = None
        if handle.sync == "flags":
            out = self.peer.push_mxfp8(x, handle.plan, scale_mode, signal=True, into_region=zero_copy)
            if zero_copy:   # the rows stay in the region: wait for them, copy nothing
                self.peer.wait_pushes()
                return as_mxfp8(*out)
            return as_mxfp8(*self.peer.copy_out_mxfp8(handle.plan, out, wait=True))
        # The counts barrier (or the counts flags) doubles as the entry barrier: every owner has
        # copied out the previous call's rows (stream order) before it arrived there.
        out = self.peer.push_mxfp8(x, handle.plan, scale_mode, into_region=zero_copy)
        self._barrier()
        if zero_copy:
            return as_mxfp8(*out)
        return as_mxfp8(*self.peer.copy_out_mxfp8(handle.plan, out))

    def check(self) -> None:
        """Debug mode (host sync): raise if a wait of the "flags" sync timed out on this rank."""
        self.peer.check_status()

    def dispatch_bf16(self, src, handle):
        self._barrier()  # entry: owners are done with their dispatch region
        out = self.peer.push_bf16_dispatch(src, handle.plan)
        self._barrier()
        return self.peer.copy_out_bf16_dispatch(handle.plan, out)

    def combine_input(self):
        return self.peer.combine_input

    def combine_bf16(self, src, handle):
        if self.peer.is_combine_input(src):
            # Zero-copy: the owners wrote their expert outputs into their own dispatch region
            # (after the dispatch's copy-out, in stream order); once every owner is here, every
            # source pulls its rows. No exit barrier: a peer writes that region again only
            # after a later barrier that this rank reaches once its pull is done.
            self._barrier()
            return self.peer.pull_combine(handle.plan, handle.num_rows)
        if TUNING["combine_mode"] == "pull":
            self._barrier()  # entry: sources are done reading this rank's region
            self.peer.stage_combine_input(src, handle.plan)
            self._barrier()
            return self.peer.pull_combine(handle.plan, handle.num_rows)
        if TUNING["sync"] == "flags":
            # Two launches, no barrier: the push waits for every source's free flag of the
            # previous combine, the copy-out for every owner's completion flag (kernels/signals.py).
            # A barrier-ordered copy-out raised no free flag: one barrier after it.
            if self._combine_sync == "barrier":
                self._barrier()
            self._combine_sync = "flags"
            out = self.peer.push_bf16_combine(src, handle.plan, handle.num_rows, signal=True)
            self._combine_region_read = True
            return self.peer.copy_out_combine(handle.plan, out, signal=True)
        self._combine_sync = "barrier"
        if self._combine_region_read:
            # Entry: sources are done with their combine region. Skipped when a barrier came
            # after the last copy-out (the dispatch's, in a dispatch -> combine step).
            self._barrier()
        out = self.peer.push_bf16_combine(src, handle.plan, handle.num_rows)
        self._barrier()
        self._combine_region_read = True
        return self.peer.copy_out_combine(handle.plan, out)


class CollectiveTransport(Transport):
    name = "collective"

    def __init__(self, group, regions: RegionLayout, device: torch.device):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.regions = regions
        self.device = device

    def plan(self, counts_i32, num_rows, align):
        layout = compute_dispatch_layout(self._exchange_counts(counts_i32), self.regions.max_tokens_per_rank, align)
        return DispatchHandle(self.rank, num_rows, layout=layout)

    def combine_input(self):
        # No shared memory to expose: a plain tensor, reused (combine reads it like any input).
        if getattr(self, "_combine_input", None) is None:
            self._combine_input = torch.empty(self.regions.capacity, self.regions.hidden,
                                              dtype=torch.bfloat16, device=self.device)
        return self._combine_input

    def _exchange_counts(self, counts_i32):
        out = torch.empty(self.world * counts_i32.numel(), dtype=counts_i32.dtype, device=counts_i32.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(out, counts_i32, group=self.group)
        return out.view(self.world, -1)

    # Slot of every source row in the fixed-size send buffer [W * N, ...]: peer-major.
    def _send_slots(self, layout: DispatchLayout, n: int) -> torch.Tensor:
        N = self.regions.max_tokens_per_rank
        W = self.world
        d = layout.dest_rank[self.rank, :n].long()
        start = layout.send_start[self.rank].gather(0, d.clamp(min=0))
        slot = d * N + torch.arange(n, device=d.device) - start
        return torch.where((d >= 0) & (slot >= 0) & (slot < W * N), slot, W * N)  # W * N: scratch slot

    # Destination row of every received slot [W * N]; the scratch row for unused slots.
    def _recv_rows(self, layout: DispatchLayout) -> torch.Tensor:
        W, N = self.world, self.regions.max_tokens_per_rank
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
        W, N = self.world, self.regions.max_tokens_per_rank
        send = torch.zeros(W * N + 1, payload.shape[1], dtype=payload.dtype, device=payload.device)
        if n:
            send.index_copy_(0, self._send_slots(layout, n), payload)
        recv = self._all_to_all_rows(send[: W * N])
        rows = self._recv_rows(layout)
        outs = []
        for part in recv.split(splits, dim=1):
            out = torch.empty(self.regions.rows, part.shape[1], dtype=payload.dtype, device=payload.device)
            outs.append(finish_rows(out.index_copy_(0, rows, part), layout.pad_rows[self.rank], self.regions.capacity))
        return outs

    def dispatch_mxfp8(self, x, handle, scale_mode, zero_copy=False):
        # zero_copy: nothing to alias here; fresh tensors keep the same contract (valid until
        # the next dispatch, and longer)
        from mxep.format.mxfp8 import to_mxfp8

        H = x.shape[1]
        t = to_mxfp8(x, scale_mode)
        packed = torch.cat([t.qdata.view(torch.uint8), t.scale.view(torch.uint8)], dim=1)
        q, s = self._scatter_to_layout(packed, handle.layout, x.shape[0], (H, H // 32))
        return as_mxfp8(q, s)

    def dispatch_bf16(self, src, handle):
        (out,) = self._scatter_to_layout(src, handle.layout, src.shape[0], (src.shape[1],))
        return out

    def combine_bf16(self, src, handle):
        layout, n = handle.layout, handle.num_rows
        W, N = self.world, self.regions.max_tokens_per_rank
        rows = self._recv_rows(layout)  # the slot -> dispatch-row map, read in reverse
        rows = torch.where(rows == layout.trash_row, 0, rows)
        send = src.index_select(0, rows) if src.shape[0] else torch.zeros(W * N, src.shape[1], dtype=src.dtype, device=src.device)
        recv = torch.cat([self._all_to_all_rows(send), torch.zeros_like(send[:1])])  # + scratch slot
        if n == 0:
            return recv[:0].clone()
        return recv.index_select(0, self._send_slots(layout, n))
