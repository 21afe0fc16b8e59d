"""One rank's communication memory and the kernel phases that act on it.

One allocation per rank (symmetric memory on GPUs; a plain tensor per simulated rank in tests),
allocated once for the true worst case and cut into regions (byte offsets, 256-byte aligned)::

    counts     int32 [W, E]              row s = source s's num_tokens_per_expert
    signals    int32 [4W + 4]            flags of the "flags" sync (kernels/signals.py); zero at creation
    dispatch   uint8 [cap+1, H]          MXFP8 data    } the forward dispatch writes these
               uint8 [cap+1, H/32]       e8m0 scales   }
               bf16  [cap+1, H]          (aliases the above) combine-backward writes bf16 here
    combine    bf16  [N+1, H]            combine / dispatch-backward rows back to their source

``cap = W * N + L * align`` rows (every token routed to one rank) plus one scratch row.
The MXFP8 and bf16 dispatch views alias: every phase copies its result out into a regular tensor
before the next phase can write again (the barriers order that), so they never live together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxep.kernels.dispatch import dispatch_push
from mxep.kernels.plan import CountsExchange, DispatchPlan, compute_plan
from mxep.kernels.rows import combine_copy_out, combine_pull, combine_push, copy_out, put_counts
from mxep.kernels.signals import describe_status, num_signal_words, wait_for_pushes, word_index

__all__ = ["RegionLayout", "PeerMemory"]

_ALIGN = 256

# Tests set this: every output tensor is filled with a poison byte before the kernels write it,
# so a row the kernels forgot cannot pass for data left behind by an earlier call.
POISON_OUTPUTS = False
_POISON = 0xA5


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        out.view(torch.uint8).fill_(_POISON)
    return out


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RegionLayout:
    world_size: int
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    capacity: int

    @property
    def rows(self) -> int:  # capacity plus the scratch row that masked scatters aim at
        return self.capacity + 1

    @property
    def counts_offset(self) -> int:
        return 0

    @property
    def signal_offset(self) -> int:
        return _up(self.world_size * self.num_experts * 4)

    @property
    def signal_bytes(self) -> int:
        return _up(num_signal_words(self.world_size) * 4)

    @property
    def dispatch_offset(self) -> int:
        return self.signal_offset + self.signal_bytes

    @property
    def scale_offset(self) -> int:
        return self.dispatch_offset + _up(self.rows * self.hidden)

    @property
    def dispatch_bytes(self) -> int:
        mxfp8 = _up(self.rows * self.hidden) + _up(self.rows * self.hidden // 32)
        return max(mxfp8, _up(self.rows * self.hidden * 2))

    @property
    def combine_offset(self) -> int:
        return self.dispatch_offset + self.dispatch_bytes

    @property
    def total_bytes(self) -> int:
        return self.combine_offset + _up((self.max_tokens_per_rank + 1) * self.hidden * 2)


def _view(mem: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = 1
    for s in shape:
        nbytes *= s
    nbytes *= torch.empty((), dtype=dtype).element_size()
    return mem[offset:offset + nbytes].view(dtype).view(shape)


class PeerMemory:
    """This rank's regions plus the byte offsets (``delta``) of every rank's allocation.

    Args:
        mem: uint8 ``[RegionLayout.total_bytes]`` this rank's allocation.
        base_addresses: every rank's allocation address, in rank order (``buffer_ptrs`` of a
            symmetric-memory handle, or ``data_ptr()`` of the simulated ranks' tensors).
        rank: this rank.
    """

    def __init__(self, mem: torch.Tensor, base_addresses: list[int], rank: int, regions: RegionLayout):
        self.mem = mem
        self.rank = rank
        self.regions = r = regions
        W, E, H, N = r.world_size, r.num_experts, r.hidden, r.max_tokens_per_rank
        me = base_addresses[rank]
        delta = torch.tensor([a - me for a in base_addresses], dtype=torch.int64, device=mem.device)
        # Element deltas per dtype (every region offset is 256-byte aligned, so these are exact).
        self.delta_u8 = delta
        self.delta_i32 = delta // 4
        self.delta_bf16 = delta // 2
        self.counts = _view(mem, r.counts_offset, (W, E), torch.int32)
        self.signals = _view(mem, r.signal_offset, (num_signal_words(W),), torch.int32)
        self.dispatch_data = _view(mem, r.dispatch_offset, (r.rows, H), torch.uint8)
        self.dispatch_scale = _view(mem, r.scale_offset, (r.rows, H // 32), torch.uint8)
        self.dispatch_bf16 = _view(mem, r.dispatch_offset, (r.rows, H), torch.bfloat16)
        self.combine_bf16 = _view(mem, r.combine_offset, (N + 1, H), torch.bfloat16)

    # --- phases (a real world puts a barrier between a phase that writes peers and the next) ---
    def put_counts(self, counts_i32: torch.Tensor) -> None:
        put_counts(counts_i32, self.counts, self.delta_i32, self.rank)

    def plan(self, align: int) -> DispatchPlan:
        return compute_plan(self.counts, align)

    # --- the "flags" sync (kernels/signals.py): the same phases without barriers ------------
    def exchange_and_plan(self, counts_i32: torch.Tensor, align: int, phase: str = "all") -> DispatchPlan | None:
        """Counts exchange and plan in one launch (``phase="all"``), or its halves for the
        simulated world (``"put"`` on every rank, then ``"plan"``)."""
        ex = CountsExchange(counts_i32, self.delta_i32, self.signals, self.rank)
        return compute_plan(self.counts, align, ex, phase)

    def clear_signals(self) -> None:
        """Zero the signal words (at creation, before the first call; never between calls)."""
        self.signals.zero_()

    def data_regions(self) -> torch.Tensor:
        """uint8 view of every byte after the signal words (tests poison it; the signal words
        must keep their values from call to call)."""
        return self.mem[self.regions.dispatch_offset:]

    def status(self) -> int:
        """Non-zero if a wait of the "flags" sync timed out (host sync: debug mode only)."""
        return int(self.signals[word_index(self.regions.world_size, "status")])   # debug-only: host sync

    def signal_word(self, name: str) -> int:
        """``seq``, ``cseq``, ``ticket`` or ``status`` (host sync: tests and debugging)."""
        return int(self.signals[word_index(self.regions.world_size, name)])   # debug-only: host sync (tests)

    def check_status(self) -> None:
        st = self.status()   # debug-only: host sync
        if st:
            raise RuntimeError(f"mxep: rank {self.rank}: {describe_status(st)}; the outputs of that call are "
                               "invalid (a peer never arrived, or the ranks called different ops)")

    def push_mxfp8(self, x: torch.Tensor, plan: DispatchPlan, scale_mode: str,
                   signal: bool = False, into_region: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Push quantized rows to their owners; returns this rank's new output tensors (uint8
        ``[cap, H]``, ``[cap, H // 32]``) holding, so far, the rows it sent to itself and zeros
        in its pad rows. ``signal``: raise this rank's push flag on every owner at the end.
        ``into_region`` (zero-copy dispatch): the "output" is this rank's own receive region,
        where the other ranks' rows land too (:meth:`region_tokens`)."""
        cap, H = self.regions.capacity, self.regions.hidden
        if into_region:
            out = self.region_tokens()
        else:
            out = (_new_output((cap, H), torch.uint8, x.device), _new_output((cap, H // 32), torch.uint8, x.device))
        dispatch_push(x, plan, self.rank, cap, self.dispatch_data, self.dispatch_scale,
                      self.delta_u8, scale_mode, *out,
                      signals=(self.signals, self.delta_i32) if signal else None)
        return out

    def region_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[cap, H]`` / ``[cap, H // 32]``: the MXFP8 receive rows and scales in this
        rank's region (what a zero-copy dispatch returns)."""
        cap = self.regions.capacity
        return self.dispatch_data[:cap], self.dispatch_scale[:cap]

    def wait_pushes(self) -> None:
        """The "flags" sync without a copy-out: wait for every other rank's push flag."""
        wait_for_pushes(self.signals, self.rank, self.regions.world_size)

    def push_bf16_dispatch(self, src: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        cap = self.regions.capacity
        out = _new_output((cap, self.regions.hidden), torch.bfloat16, src.device)
        dispatch_push(src, plan, self.rank, cap, self.dispatch_bf16, None, self.delta_bf16, None, out, None)
        return out

    def push_bf16_combine(self, src: torch.Tensor, plan: DispatchPlan, n: int, signal: bool = False) -> torch.Tensor:
        """Push rows back to their sources; returns this rank's combine output ``[n, H]``,
        holding, so far, the rows of its own tokens that its own experts produced. ``signal``:
        first wait for every source's free flag, raise this rank's completion flag at the end."""
        out = _new_output((n, self.regions.hidden), torch.bfloat16, src.device)
        combine_push(src, plan, self.rank, self.regions.max_tokens_per_rank, self.regions.capacity,
                     self.combine_bf16, self.delta_bf16, out,
                     signals=(self.signals, self.delta_i32) if signal else None)
        return out

    # --- local phases after the barrier: the rows other ranks stored here go into the outputs;
    # the rows a rank sent itself, and the pad rows' zeros, are there already (the push) ------
    def copy_out_mxfp8(self, plan: DispatchPlan, out: tuple[torch.Tensor, torch.Tensor],
                       wait: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``wait``: first wait for every other rank's push flag of this call."""
        cap = self.regions.capacity
        return copy_out(self.dispatch_data[:cap], plan, self.rank, self.dispatch_scale[:cap],
                        out=out[0], out2=out[1], skip_own=True, pads=False,
                        signals=self.signals if wait else None)

    def copy_out_bf16_dispatch(self, plan: DispatchPlan, out: torch.Tensor) -> torch.Tensor:
        return copy_out(self.dispatch_bf16[: self.regions.capacity], plan, self.rank, out=out, skip_own=True,
                        pads=False)

    def copy_out_combine(self, plan: DispatchPlan, out: torch.Tensor, signal: bool = False) -> torch.Tensor:
        """``signal``: wait for every owner's completion flag first, raise this rank's free flag after."""
        return combine_copy_out(self.combine_bf16, plan, self.rank, out, self.regions.capacity,
                                signals=(self.signals, self.delta_i32) if signal else None)

    # --- pull combine: owners expose their expert outputs in the dispatch region, sources read --
    @property
    def combine_input(self) -> torch.Tensor:
        """bf16 ``[cap, H]``: this rank's dispatch region, where the pull combine reads the
        expert outputs (aliases the MXFP8 receive rows, which were copied out already)."""
        return self.dispatch_bf16[: self.regions.capacity]

    def is_combine_input(self, t: torch.Tensor) -> bool:
        r = self.combine_input
        return t.data_ptr() == r.data_ptr() and t.shape == r.shape and t.is_contiguous()

    def stage_combine_input(self, src: torch.Tensor, plan: DispatchPlan) -> None:
        """Copy the rows of ``src [cap, H]`` that the combine reads (bound read on the device)
        into :attr:`combine_input`."""
        copy_out(src, plan, self.rank, out=self.combine_input, pads=False)

    def pull_combine(self, plan: DispatchPlan, n: int) -> torch.Tensor:
        out = _new_output((n, self.regions.hidden), torch.bfloat16, self.mem.device)
        return combine_pull(self.combine_input, self.delta_bf16, plan, self.rank, out, self.regions.capacity)
