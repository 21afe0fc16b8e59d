"""One rank's communication memory and the kernel phases that act on it.

One allocation per rank (symmetric memory on GPUs; a plain tensor per simulated rank in tests),
allocated once for the true worst case and cut into regions (byte offsets, 256-byte aligned)::

    counts     int32 [W, E + W]          row s = source s's num_tokens_per_expert, then the tokens
                                         it sends each rank (token-level dispatch; else zeros)
    signals    int32 [W + 2]             counts flags, call number, status (sync.py); zero at creation
    dispatch   uint8 [cap+1, H]          MXFP8 data    } the forward dispatch writes these
               uint8 [cap+1, H/32]       e8m0 scales   }
               bf16  [cap+1, H]          (aliases the above) combine-backward writes bf16 here
    combine    bf16  [N+1, H]            combine / dispatch-backward rows back to their source

Row-level: ``cap = W * N + L * align`` rows (every row routed to one rank) plus one scratch row.
Token-level (``top_k``): the dispatch region holds ``W * T`` token slots instead, the combine
region ``W * T`` returned partials, and three ``[W * T, k]`` slot tables follow
(:class:`RegionLayout`).
The MXFP8 and bf16 dispatch views alias: every phase copies its result out into a regular tensor
before the next phase can write again (the barriers order that), so they never live together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxep.ep.config import EPConfig
from mxep.ep.transport.symm_mem.combine import combine_copy_out, combine_pull, combine_push
from mxep.ep.transport.symm_mem.dispatch import copy_out, dispatch_push
from mxep.ep.transport.symm_mem.plan import CountsExchange, DispatchPlan, compute_plan
from mxep.ep.transport.symm_mem.sync import describe_status, num_signal_words, word_index
from mxep.ep.transport.symm_mem.tokens import expand_token_grads, expand_tokens, push_tokens, reduce_tokens, sum_partials

__all__ = ["RegionLayout", "PeerMemory", "TokenState"]

_ALIGN = 256

POISON = 0xA5   # the byte EPConfig.poison_outputs fills outputs with (and fresh regions get)


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RegionLayout:
    """Byte offsets of one rank's regions (identical on every rank).

    ``top_k == 0`` (row-level Buffer): ``max_tokens_per_rank`` counts rows; the receive region
    holds the dispatch layout itself (``capacity + 1`` rows) and the combine region ``N + 1``
    rows. ``top_k > 0`` (token-level Buffer): ``max_tokens_per_rank`` = ``T`` counts tokens; the
    receive region holds ``W * T`` token slots (source s's tokens at slots ``[s*T, (s+1)*T)``),
    the combine region ``W * T`` returned partials (owner d's at ``[d*T, (d+1)*T)``), and three
    ``[W * T, top_k]`` tables: the slots' layout rows (int32), their gate weights (fp32) and the
    weight gradients coming back (fp32).
    """

    world_size: int
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    capacity: int
    top_k: int = 0
    expert_cap: int = 2**31 - 1   # rows one expert keeps (capacity_factor); the rest drop

    @property
    def rows(self) -> int:
        """Rows of the receive region: the layout plus the scratch row that masked scatters aim
        at (row-level), or the token slots (token-level)."""
        if self.top_k:
            return self.world_size * self.max_tokens_per_rank
        return self.capacity + 1

    @property
    def combine_rows(self) -> int:
        if self.top_k:
            return self.world_size * self.max_tokens_per_rank
        return self.max_tokens_per_rank + 1

    @property
    def counts_offset(self) -> int:   # int32 [W, E + W] count matrix
        return 0

    @property
    def signal_offset(self) -> int:
        return _up(self.world_size * (self.num_experts + self.world_size) * 4)

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
    def table_offset(self) -> int:   # token-level: the three [W * T, top_k] tables, 4 bytes each
        return self.combine_offset + _up(self.combine_rows * self.hidden * 2)

    @property
    def table_bytes(self) -> int:
        return _up(self.world_size * self.max_tokens_per_rank * self.top_k * 4)

    @property
    def total_bytes(self) -> int:
        return self.table_offset + 3 * self.table_bytes


@dataclass
class TokenState:
    """The per-call state of a token-level dispatch (regular tensors, kept by the handle).

    Attributes:
        plan: the call's :class:`DispatchPlan` (``tok_recv``: tokens each source sent here).
        slot: int32 ``[t, W]`` each token's slot index on each rank (``-1``: not sent there).
        pair_owner: int32 ``[t, k]`` each pair's owner rank (``-1``: no expert).
        pair_rows: int32 ``[t, k]`` each pair's row in its owner's layout (``-1``: no expert).
        pair_weights: fp32 ``[t, k]`` the gate weights (as dispatched).
        rows: int32 ``[W * T, k]`` (owner side) each received slot's layout rows (``-1``: none).
        weights: fp32 ``[W * T, k]`` (owner side) their gate weights.
        num_dropped: int64 ``[]`` pairs of this rank that the expert capacity dropped (set by the
            dispatch's planning; None for a state rebuilt from the handle's tensors).
    """

    plan: DispatchPlan
    slot: torch.Tensor
    pair_owner: torch.Tensor
    pair_rows: torch.Tensor
    pair_weights: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor
    num_dropped: torch.Tensor | None = None


def _view(mem: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = 1
    for s in shape:
        nbytes *= s
    nbytes *= torch.empty((), dtype=dtype).element_size()
    return mem[offset:offset + nbytes].view(dtype).view(shape)


class PeerMemory:
    """This rank's regions plus the byte offsets (``delta``) of every rank's allocation, and the
    kernel phases that act on them. A real world puts a barrier between a phase that writes
    peers and the next (``SymmMemTransport``); the simulated world runs each phase on every
    rank before the next.

    Args:
        mem: uint8 ``[RegionLayout.total_bytes]`` this rank's allocation.
        base_addresses: every rank's allocation address, in rank order (``buffer_ptrs`` of a
            symmetric-memory handle, or ``data_ptr()`` of the simulated ranks' tensors).
        rank: this rank.
        regions: the :class:`RegionLayout` every rank shares.
        config: the Buffer's :class:`~mxep.EPConfig`.
    """

    def __init__(self, mem: torch.Tensor, base_addresses: list[int], rank: int, regions: RegionLayout,
                 config: EPConfig):
        self.mem = mem
        self.rank = rank
        self.regions = r = regions
        self.config = config
        W, E, H, N = r.world_size, r.num_experts, r.hidden, r.max_tokens_per_rank
        me = base_addresses[rank]
        delta = torch.tensor([a - me for a in base_addresses], dtype=torch.int64, device=mem.device)
        # Element deltas per dtype (every region offset is 256-byte aligned, so these are exact).
        self.delta_u8 = delta
        self.delta_i32 = delta // 4
        self.delta_bf16 = delta // 2
        self.counts = _view(mem, r.counts_offset, (W, E + W), torch.int32)
        self.signals = _view(mem, r.signal_offset, (num_signal_words(W),), torch.int32)
        self.dispatch_data = _view(mem, r.dispatch_offset, (r.rows, H), torch.uint8)
        self.dispatch_scale = _view(mem, r.scale_offset, (r.rows, H // 32), torch.uint8)
        self.dispatch_bf16 = _view(mem, r.dispatch_offset, (r.rows, H), torch.bfloat16)
        self.combine_bf16 = _view(mem, r.combine_offset, (r.combine_rows, H), torch.bfloat16)
        if r.top_k:
            S, K = r.rows, r.top_k
            self.slot_rows = _view(mem, r.table_offset, (S, K), torch.int32)
            self.slot_weights = _view(mem, r.table_offset + r.table_bytes, (S, K), torch.float32)
            self.weight_grads = _view(mem, r.table_offset + 2 * r.table_bytes, (S, K), torch.float32)

    def _new_output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.mem.device)
        if self.config.poison_outputs:
            out.view(torch.uint8).fill_(POISON)
        return out

    # --- counts exchange + plan (sync.py) ---------------------------------------------------
    def exchange_and_plan(self, counts_i32: torch.Tensor, num_rows: int, align: int,
                          phase: str = "all", tokens_per_rank: torch.Tensor | None = None) -> DispatchPlan | None:
        """Counts exchange and plan in one launch (``phase="all"``), or its halves for the
        simulated world (``"put"`` on every rank, then ``"plan"``). ``tokens_per_rank`` (int32
        ``[W]``, the token-level dispatch): the tokens this rank sends each rank travel with the
        counts; ``num_rows`` is then the most pairs (the expert counts may sum to fewer)."""
        ex = CountsExchange(self.counts, counts_i32, tokens_per_rank, num_rows, self.regions.max_tokens_per_rank,
                            self.regions.expert_cap, self.delta_i32, self.signals, self.rank)
        return compute_plan(ex, align, self.config.polls(self.mem.device), phase)

    def clear_signals(self) -> None:
        """Zero the signal words (at creation, before the first call; never between calls)."""
        self.signals.zero_()

    def data_regions(self) -> torch.Tensor:
        """uint8 view of every byte after the signal words (tests poison it; the signal words
        must keep their values from call to call)."""
        return self.mem[self.regions.dispatch_offset:]

    def status(self) -> int:
        """The status word (sync.py): non-zero after a timed-out wait, a call-sequence mismatch
        or clamped counts. Host sync: debug mode and ``Buffer.check()`` only."""
        return int(self.signals[word_index(self.regions.world_size, "status")])   # debug-only: host sync

    def signal_word(self, name: str) -> int:
        """``seq`` or ``status`` (host sync: tests and debugging)."""
        return int(self.signals[word_index(self.regions.world_size, name)])   # debug-only: host sync (tests)

    def check_status(self, op: str = "the last call") -> None:
        """Raise (naming ``op`` and this rank) if the status word is non-zero (host sync)."""
        st = self.status()   # debug-only: host sync
        if st:
            raise RuntimeError(f"mxep: rank {self.rank}, {op}: {describe_status(st)}; the outputs of that call are "
                               "invalid")

    # --- dispatch -----------------------------------------------------------------------------
    def push_mxfp8(self, x: torch.Tensor, plan: DispatchPlan, scale_mode: str,
                   into_region: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Push quantized rows to their owners; returns this rank's new output tensors (uint8
        ``[cap, H]``, ``[cap, H // 32]``) holding, so far, the rows it sent to itself and zeros
        in its pad rows. ``into_region`` (zero-copy dispatch): the "output" is this rank's own
        receive region, where the other ranks' rows land too (:meth:`region_tokens`)."""
        cap, H = self.regions.capacity, self.regions.hidden
        if into_region:
            out = self.region_tokens()
        else:
            out = (self._new_output((cap, H), torch.uint8), self._new_output((cap, H // 32), torch.uint8))
        dispatch_push(x, plan, self.rank, cap, self.dispatch_data, self.dispatch_scale,
                      self.delta_u8, scale_mode, *out, self.config)
        return out

    def region_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[cap, H]`` / ``[cap, H // 32]``: the MXFP8 receive rows and scales in this
        rank's region (what a zero-copy dispatch returns)."""
        cap = self.regions.capacity
        return self.dispatch_data[:cap], self.dispatch_scale[:cap]

    def push_bf16_dispatch(self, src: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        cap = self.regions.capacity
        out = self._new_output((cap, self.regions.hidden), torch.bfloat16)
        dispatch_push(src, plan, self.rank, cap, self.dispatch_bf16, None, self.delta_bf16, None, out, None,
                      self.config)
        return out

    # --- local phases after the barrier: the rows other ranks stored here go into the outputs;
    # the rows a rank sent itself, and the pad rows' zeros, are there already (the push) ------
    def copy_out_mxfp8(self, plan: DispatchPlan, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.regions.capacity
        copy_out(self.dispatch_data[:cap], plan, self.rank, out[0], self.config, self.dispatch_scale[:cap], out[1])
        return out

    def copy_out_bf16_dispatch(self, plan: DispatchPlan, out: torch.Tensor) -> torch.Tensor:
        copy_out(self.dispatch_bf16[: self.regions.capacity], plan, self.rank, out, self.config)
        return out

    # --- push combine ------------------------------------------------------------------------
    def push_bf16_combine(self, src: torch.Tensor, plan: DispatchPlan, n: int) -> torch.Tensor:
        """Push rows back to their sources; returns this rank's combine output ``[n, H]``,
        holding, so far, the rows of its own tokens that its own experts produced."""
        out = self._new_output((n, self.regions.hidden), torch.bfloat16)
        combine_push(src, plan, self.rank, self.regions.max_tokens_per_rank, self.regions.capacity,
                     self.combine_bf16, self.delta_bf16, out, self.config)
        return out

    def copy_out_combine(self, plan: DispatchPlan, out: torch.Tensor) -> torch.Tensor:
        return combine_copy_out(self.combine_bf16, plan, self.rank, out, self.regions.capacity, self.config)

    # --- pull combine: owners expose their expert outputs in the dispatch region, sources read --
    @property
    def combine_input(self) -> torch.Tensor:
        """bf16 ``[cap, H]``: this rank's dispatch region, where the pull combine reads the
        expert outputs (aliases the MXFP8 receive rows, which were copied out already)."""
        return self.dispatch_bf16[: self.regions.capacity]

    def is_combine_input(self, t: torch.Tensor) -> bool:
        r = self.combine_input
        return t.data_ptr() == r.data_ptr() and t.shape == r.shape and t.is_contiguous()

    def pull_combine(self, plan: DispatchPlan, n: int) -> torch.Tensor:
        out = self._new_output((n, self.regions.hidden), torch.bfloat16)
        return combine_pull(self.combine_input, self.delta_bf16, plan, self.rank, out, self.regions.capacity,
                            self.config)

    # --- token-level dispatch and combine (tokens.py) -----------------------------------------
    def push_tokens_mxfp8(self, x: torch.Tensor, state: "TokenState", scale_mode: str) -> None:
        r = self.regions
        push_tokens(x, self.rank, r.max_tokens_per_rank, state.slot, self.dispatch_data, self.dispatch_scale,
                    self.delta_u8, self.config, scale_mode,
                    tables=(state.pair_rows, state.pair_owner, state.pair_weights, self.slot_rows, self.slot_weights,
                            self.delta_i32))

    def expand_tokens(self, state: "TokenState") -> tuple[torch.Tensor, torch.Tensor]:
        """After the push's barrier: the received tokens into new uint8 ``[cap, H]`` /
        ``[cap, H // 32]`` outputs (expert-major, pad rows zero); fills ``state.rows`` /
        ``state.weights`` with the received slots' tables."""
        r = self.regions
        cap, H = r.capacity, r.hidden
        out = (self._new_output((cap, H), torch.uint8), self._new_output((cap, H // 32), torch.uint8))
        expand_tokens(self.dispatch_data, self.dispatch_scale, self.slot_rows, self.slot_weights, state.plan,
                      self.rank, r.max_tokens_per_rank, *out, state.rows, state.weights, self.config)
        return out

    def reduce_tokens(self, src: torch.Tensor, state: "TokenState", weighted: bool) -> None:
        reduce_tokens(src, state.rows, state.weights if weighted else None, state.plan, self.rank,
                      self.regions.max_tokens_per_rank, self.combine_bf16, self.delta_bf16, self.config)

    def sum_partials(self, state: "TokenState") -> torch.Tensor:
        out = self._new_output((state.slot.shape[0], self.regions.hidden), torch.bfloat16)
        return sum_partials(self.combine_bf16, state.slot, self.regions.max_tokens_per_rank, out, self.config)

    def push_token_grads(self, dy: torch.Tensor, state: "TokenState") -> None:
        push_tokens(dy, self.rank, self.regions.max_tokens_per_rank, state.slot, self.dispatch_bf16, None,
                    self.delta_bf16, self.config)

    def expand_token_grads(self, expert_out: torch.Tensor, state: "TokenState") -> torch.Tensor:
        r = self.regions
        geo = self._new_output((r.capacity, r.hidden), torch.bfloat16)
        return expand_token_grads(self.dispatch_bf16, expert_out, state.rows, state.weights, state.plan, self.rank,
                                  r.max_tokens_per_rank, geo, self.weight_grads, self.delta_i32, self.config)

    def gather_weight_grads(self, state: "TokenState") -> torch.Tensor:
        """After the grads' barrier: fp32 ``[t, k]``, the gradient of every pair's gate weight
        (0 for ``-1`` slots)."""
        T, K = self.regions.max_tokens_per_rank, self.regions.top_k
        owner = state.pair_owner.long()
        valid = (owner >= 0) & (state.pair_rows >= 0)   # dropped pairs (capacity_factor): zero
        own = owner.clamp(min=0)
        slot = state.slot.long().gather(1, own).clamp(0, T - 1)
        j = torch.arange(K, device=owner.device).expand_as(owner)
        flat = ((own * T + slot) * K + j).clamp(0, self.weight_grads.numel() - 1)
        return torch.where(valid, self.weight_grads.view(-1)[flat], 0.0)
