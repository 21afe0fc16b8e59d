"""``SymmMemTransport``: PyTorch symmetric memory on the GPUs of one NVLink node.

The one protocol (docs/design.md), per forward dispatch: the plan kernel exchanges the counts
with release/acquire flags and plans (one launch); the fused kernel quantizes each row in
registers and stores it at its final expert-major row on the owner over NVLink; a
symmetric-memory barrier; a local copy-out of the rows other ranks stored here. No host sync,
no extra collective. The combine: push + barrier + copy-out for a regular ``expert_out``, or
barrier + pull for the zero-copy input.

The class has two layers, both here: the *phases* (one kernel launch each, on this rank's
regions, no barrier; the simulated world of several ranks in one process runs every rank's
phase before the next, :mod:`~mxep.ep.transport.symm_mem.simulated`), and the
:class:`~mxep.ep.transport.base.Transport` methods, which put the barriers between them.
"""
from __future__ import annotations


import torch
import torch.distributed as dist

from mxep.ep.config import EPConfig
from mxep.ep.routing import TokenRoute, route_tokens
from mxep.ep.transport.base import DispatchHandle, TokenDispatch, TokenState, Transport, as_mxfp8, token_state
from mxep.ep.transport.symm_mem.combine import combine_copy_out, combine_pull, combine_push
from mxep.ep.transport.symm_mem.dispatch import copy_out, dispatch_push
from mxep.ep.transport.symm_mem.memory import POISON, RegionLayout, region_view
from mxep.ep.transport.symm_mem.plan import CountsExchange, DispatchPlan, compute_plan
from mxep.ep.transport.symm_mem.sync import describe_status, num_signal_words, word_index
from mxep.ep.transport.symm_mem.tokens import (expand_token_grads, expand_tokens, gather_weight_grads, pair_tables,
                                               push_tokens, reduce_tokens, sum_partials)

__all__ = ["SymmMemTransport", "SymmMemTokenState"]


@token_state
class SymmMemTokenState(TokenState):
    """The per-call state of a token-level dispatch on symmetric memory (regular tensors; the
    handle keeps them). ``W`` ranks, ``E`` experts, ``S = W * T`` token slots.

    Attributes:
        pair_weights: fp32 ``[t, k]`` the gate weights (as dispatched).
        row_base, src_end, recv_cum: int32 ``[W, E]``; group_end, recv: int32 ``[E]``;
            tok_recv: int32 ``[W]``: the plan (:class:`~mxep.ep.transport.symm_mem.plan.DispatchPlan`).
        slot: int32 ``[t, W]`` each token's slot index on each rank (``-1``: not sent there).
        pair_owner: int32 ``[t, k]`` each pair's owner rank (``-1``: no expert).
        pair_rows: int32 ``[t, k]`` each pair's row in its owner's layout (``-1``: no expert, or
            dropped by the expert capacity).
        slot_rows: int32 ``[S, k]`` (owner side) each received slot's layout rows (``-1``: none).
        slot_weights: fp32 ``[S, k]`` (owner side) their gate weights.
    """

    row_base: torch.Tensor
    src_end: torch.Tensor
    group_end: torch.Tensor
    recv: torch.Tensor
    recv_cum: torch.Tensor
    tok_recv: torch.Tensor
    slot: torch.Tensor
    pair_owner: torch.Tensor
    pair_rows: torch.Tensor
    slot_rows: torch.Tensor
    slot_weights: torch.Tensor

    def plan(self, align: int) -> DispatchPlan:
        W, E = self.row_base.shape
        return DispatchPlan(self.row_base, self.src_end, self.group_end, self.recv, self.recv_cum, E // W, align,
                            self.tok_recv)


class _NoBarrier:
    """The symmetric-memory handle of a world without symmetric memory (one rank, or the
    simulated world, which orders phases itself): a barrier with nobody to wait for. Counts
    barriers like the real one (``barriers``: tests read it)."""

    barriers = 0

    def barrier(self, channel: int = 0, timeout_ms: int = 0) -> None:
        self.barriers += 1


class SymmMemTransport(Transport):
    """Args: the EP ``group``, the shared :class:`RegionLayout`, the CUDA ``device`` and the
    Buffer's :class:`~mxep.EPConfig`. Allocates ``regions.total_bytes`` of symmetric memory and
    rendezvouses (collective)."""

    name = "symm_mem"
    token_state_type = SymmMemTokenState

    def __init__(self, group, regions: RegionLayout, device: torch.device, config: EPConfig):
        import torch.distributed._symmetric_memory as symm_mem

        if torch.torch_version.TorchVersion(torch.__version__) < "2.11":   # required before 2.11, deprecated since
            symm_mem.enable_symm_mem_for_group(group.group_name)
        mem = symm_mem.empty(regions.total_bytes, dtype=torch.uint8, device=device)
        handle = symm_mem.rendezvous(mem, group)
        self._attach(group, handle, mem, list(handle.buffer_ptrs), dist.get_rank(group), regions, config)
        # Every rank's stream first drains what it queued before (a previous Buffer's kernels may
        # still be storing into memory that this allocation now reuses); then poison once, so a
        # row that nobody wrote cannot pass for data (tests check bytes), and zero the signal
        # words, whose values must only ever come from this Buffer's calls; then all ranks meet.
        self._barrier()
        mem.fill_(POISON)
        self.clear_signals()
        self._barrier()

    @classmethod
    def over_local_memory(cls, regions: RegionLayout, config: EPConfig, device: torch.device | str = "cpu",
                          group=None) -> "SymmMemTransport":
        """A world-size-1 transport over a plain tensor (no symmetric memory; barriers are
        no-ops): the symmetric-memory code path, host logic and kernels, where there is no
        symmetric memory (CPU tests under the interpreter, host-cost measurements)."""
        if regions.world_size != 1:
            raise ValueError(f"over_local_memory is a one-rank world, got world_size={regions.world_size}")
        (one,) = cls.simulated_ranks(regions, config, device)
        one.group = group
        return one

    @classmethod
    def simulated_ranks(cls, regions: RegionLayout, config: EPConfig, device: torch.device | str = "cpu",
                        mems: list[torch.Tensor] | None = None) -> list["SymmMemTransport"]:
        """``regions.world_size`` ranks over plain tensors of this process (``mems``: uint8
        ``[regions.total_bytes]`` each, default new ones filled with POISON), one transport per
        rank, their peer addresses pointing at each other's tensors (barriers are no-ops): the
        phases must then run rank by rank in order
        (:class:`~mxep.ep.transport.symm_mem.simulated.SimulatedWorld`)."""
        W = regions.world_size
        if mems is None:
            mems = [torch.full((regions.total_bytes,), POISON, dtype=torch.uint8, device=device) for _ in range(W)]
        addrs = [m.data_ptr() for m in mems]
        ranks = []
        for r, m in enumerate(mems):
            self = cls.__new__(cls)
            self._attach(None, _NoBarrier(), m, addrs, r, regions, config)
            self.clear_signals()
            ranks.append(self)
        return ranks

    def _attach(self, group, handle, mem: torch.Tensor, base_addresses: list[int], rank: int, regions: RegionLayout,
                config: EPConfig) -> None:
        """This rank's region views and every rank's allocation offset (``delta``)."""
        super().__init__(torch.zeros(2, dtype=torch.int32, device=mem.device))
        self.group, self.handle, self.mem, self.rank, self.config = group, handle, mem, rank, config
        self.regions = r = regions
        self.scale_layout = r.scale_layout
        self._blocked = r.scale_layout == "blocked"
        W, E, H = r.world_size, r.num_experts, r.hidden
        me = base_addresses[rank]
        delta = torch.tensor([a - me for a in base_addresses], dtype=torch.int64, device=mem.device)
        # Element deltas per dtype (every region offset is 256-byte aligned, so these are exact).
        self.delta_u8, self.delta_i32, self.delta_bf16 = delta, delta // 4, delta // 2
        self.counts = region_view(mem, r.counts_offset, (W, E + W), torch.int32)
        self.signals = region_view(mem, r.signal_offset, (num_signal_words(W),), torch.int32)
        self.dispatch_data = region_view(mem, r.dispatch_offset, (r.rows, H), torch.uint8)
        self.dispatch_scale = region_view(mem, r.scale_offset, (r.rows, H // 32), torch.uint8)
        self.dispatch_region_bf16 = region_view(mem, r.dispatch_offset, (r.rows, H), torch.bfloat16)
        self.combine_region = region_view(mem, r.combine_offset, (r.combine_rows, H), torch.bfloat16)
        # the same bf16 regions as the int16 bits the token kernels take (made once, not per call)
        self._dispatch_bits = self.dispatch_region_bf16.view(torch.int16)
        self._combine_bits = self.combine_region.view(torch.int16)
        if r.top_k:
            S, K = r.rows, r.top_k
            self.slot_rows = region_view(mem, r.table_offset, (S, K), torch.int32)
            self.slot_weights = region_view(mem, r.table_offset + r.table_bytes, (S, K), torch.float32)
            self.weight_grads = region_view(mem, r.table_offset + 2 * r.table_bytes, (S, K), torch.float32)
        self._unpushed: DispatchHandle | None = None   # the plan awaiting its dispatch (sync.py)
        self._combine_region_read = False              # a combine copy-out was queued since the last barrier

    def _barrier(self) -> None:
        # Once every rank has passed a barrier queued after its last combine copy-out, no
        # rank still reads its combine region: the next push combine needs no entry barrier
        # of its own (every rank runs the same calls, so every rank's k-th barrier follows the
        # same copy-outs).
        self.handle.barrier(channel=0, timeout_ms=self.config.barrier_timeout_ms)
        self._combine_region_read = False

    def _new_output(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.mem.device)
        if self.config.poison_outputs:
            out.view(torch.uint8).fill_(POISON)
        return out

    # ================================================================== diagnostics
    def clear_signals(self) -> None:
        """Zero the signal words (at creation, before the first call; never between calls)."""
        self.signals.zero_()

    def data_regions(self) -> torch.Tensor:
        """uint8 view of every byte after the signal words (tests poison it; the signal words
        must keep their values from call to call)."""
        return self.mem[self.regions.dispatch_offset:]

    def status(self) -> int:
        """The status word (sync.py): non-zero after a timed-out wait, a call-sequence mismatch
        or clamped counts."""
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

    # ================================================================== phases (no barriers)
    def exchange_and_plan(self, counts_i32: torch.Tensor, num_rows: int, align: int,
                          phase: str = "all", tokens_per_rank: torch.Tensor | None = None) -> DispatchPlan | None:
        """Counts exchange and plan in one launch (``phase="all"``), or its halves for the
        simulated world (``"put"`` on every rank, then ``"plan"``). ``tokens_per_rank`` (int32
        ``[W]``, the token-level dispatch): the tokens this rank sends each rank travel with the
        counts; ``num_rows`` is then the most pairs (the expert counts may sum to fewer), and the
        plan also holds this rank's group ends and received counts (``DispatchPlan.mine``)."""
        r = self.regions
        ex = CountsExchange(self.counts, counts_i32, tokens_per_rank, num_rows, r.max_tokens_per_rank, r.expert_cap,
                            self.delta_i32, self.signals, self.rank)
        return compute_plan(ex, align, self.config.polls(self.mem.device), phase, mine=tokens_per_rank is not None)

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
                      self.delta_u8, scale_mode, *out, self.config, blocked_scales=self._blocked)
        return out

    def region_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[cap, H]`` / ``[cap, H // 32]``: the MXFP8 receive rows and scales in this
        rank's region (what a zero-copy dispatch returns; scales in :attr:`scale_layout`)."""
        cap = self.regions.capacity
        return self.dispatch_data[:cap], self.dispatch_scale[:cap]

    def push_bf16_dispatch(self, src: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        cap = self.regions.capacity
        out = self._new_output((cap, self.regions.hidden), torch.bfloat16)
        dispatch_push(src, plan, self.rank, cap, self.dispatch_region_bf16, None, self.delta_bf16, None, out, None,
                      self.config)
        return out

    # after the barrier: the rows other ranks stored here go into the outputs; the rows a rank
    # sent itself, and the pad rows' zeros, are there already (the push)
    def copy_out_mxfp8(self, plan: DispatchPlan, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        cap = self.regions.capacity
        copy_out(self.dispatch_data[:cap], plan, self.rank, out[0], self.config, self.dispatch_scale[:cap], out[1],
                 blocked_scales=self._blocked)
        return out

    def copy_out_bf16_dispatch(self, plan: DispatchPlan, out: torch.Tensor) -> torch.Tensor:
        copy_out(self.dispatch_region_bf16[: self.regions.capacity], plan, self.rank, out, self.config)
        return out

    def push_bf16_combine(self, src: torch.Tensor, plan: DispatchPlan, n: int) -> torch.Tensor:
        """Push rows back to their sources; returns this rank's combine output ``[n, H]``,
        holding, so far, the rows of its own tokens that its own experts produced."""
        out = self._new_output((n, self.regions.hidden), torch.bfloat16)
        combine_push(src, plan, self.rank, self.regions.max_tokens_per_rank, self.regions.capacity,
                     self.combine_region, self.delta_bf16, out, self.config)
        return out

    def copy_out_combine(self, plan: DispatchPlan, out: torch.Tensor) -> torch.Tensor:
        return combine_copy_out(self.combine_region, plan, self.rank, out, self.regions.capacity, self.config)

    def is_combine_input(self, t: torch.Tensor) -> bool:
        r = self.combine_input()
        return t.data_ptr() == r.data_ptr() and t.shape == r.shape and t.is_contiguous()

    def pull_combine(self, plan: DispatchPlan, n: int) -> torch.Tensor:
        """After the barrier: every source reads its rows from the owners' combine inputs."""
        out = self._new_output((n, self.regions.hidden), torch.bfloat16)
        return combine_pull(self.combine_input(), self.delta_bf16, plan, self.rank, out, self.regions.capacity,
                            self.config)

    # token level (tokens.py)
    def plan_tokens(self, topk_idx: torch.Tensor, topk_weights: torch.Tensor, align: int, phase: str = "all",
                    route: TokenRoute | None = None
                    ) -> tuple[SymmMemTokenState, torch.Tensor, TokenRoute, DispatchPlan] | None:
        """Route the tokens (:func:`mxep.ep.routing.route_tokens`, or ``route`` when already
        routed), exchange the counts and plan (``phase`` as :meth:`exchange_and_plan`), and
        derive every pair's layout row. Returns ``(state, num_dropped int64 [], route, plan)``
        (``plan.mine``: this rank's group ends and received counts)."""
        r = self.regions
        t, k = topk_idx.shape
        if route is None:
            route = route_tokens(topk_idx, r.num_experts, r.world_size, self.routing_errors)
        plan = self.exchange_and_plan(route.counts, t * k, align, phase, tokens_per_rank=route.tokens_per_rank)
        if plan is None:
            return None
        # Each pair's row is row_base[rank, expert] + its index in the sorted expansion (row_base
        # is "dest_row - i" for the row-level row i): exactly the row the row-level dispatch gives.
        pair_rows, pair_weights, slot_rows, slot_weights, dropped = pair_tables(
            route.expert, route.pair_index, route.pair_owner, topk_weights, plan, self.rank, align,
            r.expert_cap, r.world_size * r.max_tokens_per_rank)
        st = SymmMemTokenState(pair_weights, plan.row_base, plan.src_end, plan.group_end, plan.recv, plan.recv_cum,
                               plan.tok_recv, route.slot, route.pair_owner, pair_rows, slot_rows, slot_weights)
        return st, dropped, route, plan

    def push_tokens_mxfp8(self, x: torch.Tensor, st: SymmMemTokenState, scale_mode: str) -> None:
        push_tokens(x, self.rank, self.regions.max_tokens_per_rank, st.slot, self.dispatch_data, self.dispatch_scale,
                    self.delta_u8, self.config, scale_mode,
                    tables=(st.pair_rows, st.pair_owner, st.pair_weights, self.slot_rows, self.slot_weights,
                            self.delta_i32))

    def expand_tokens(self, st: SymmMemTokenState, align: int) -> tuple[torch.Tensor, torch.Tensor]:
        """After the push's barrier: the received tokens into new uint8 ``[cap, H]`` /
        ``[cap, H // 32]`` outputs (expert-major, pad rows zero); fills ``st.slot_rows`` /
        ``st.slot_weights`` with the received slots' tables."""
        r = self.regions
        cap, H = r.capacity, r.hidden
        out = (self._new_output((cap, H), torch.uint8), self._new_output((cap, H // 32), torch.uint8))
        expand_tokens(self.dispatch_data, self.dispatch_scale, self.slot_rows, self.slot_weights, st.plan(align),
                      self.rank, r.max_tokens_per_rank, *out, st.slot_rows, st.slot_weights, self.config,
                      blocked_scales=self._blocked)
        return out

    def reduce_tokens(self, src: torch.Tensor, st: SymmMemTokenState, align: int, weighted: bool) -> None:
        reduce_tokens(src, st.slot_rows, st.slot_weights if weighted else None, st.plan(align), self.rank,
                      self.regions.max_tokens_per_rank, self._combine_bits, self.delta_bf16, self.config)

    def sum_partials(self, st: SymmMemTokenState) -> torch.Tensor:
        out = self._new_output((st.num_tokens, self.regions.hidden), torch.bfloat16)
        return sum_partials(self._combine_bits, st.slot, self.regions.max_tokens_per_rank, out, self.config)

    def push_token_grads(self, dy: torch.Tensor, st: SymmMemTokenState) -> None:
        push_tokens(dy, self.rank, self.regions.max_tokens_per_rank, st.slot, self._dispatch_bits, None,
                    self.delta_bf16, self.config)

    def expand_token_grads(self, expert_out: torch.Tensor, st: SymmMemTokenState, align: int) -> torch.Tensor:
        r = self.regions
        grad_expert_out = self._new_output((r.capacity, r.hidden), torch.bfloat16)
        return expand_token_grads(self._dispatch_bits, expert_out, st.slot_rows, st.slot_weights, st.plan(align),
                                  self.rank, r.max_tokens_per_rank, grad_expert_out, self.weight_grads,
                                  self.delta_i32, self.config)

    def gather_weight_grads(self, st: SymmMemTokenState) -> torch.Tensor:
        """After the grads' barrier: fp32 ``[t, k]``, the gradient of every pair's gate weight
        (0 for ``-1`` slots and dropped pairs)."""
        return gather_weight_grads(self.weight_grads, st.slot, st.pair_owner, st.pair_rows,
                                   self.regions.max_tokens_per_rank)

    # ================================================================== the Transport contract
    def plan(self, counts_i32, num_rows, align):
        # One launch: counts to every rank, wait for theirs, plan (sync.py). Its ordering
        # argument needs every plan to be followed by its dispatch: a rank writes its next count
        # row into a peer's matrix only after the barrier after the push of this call, hence
        # after the peer's plan read the matrix.
        if self._unpushed is not None:
            raise RuntimeError("mxep: the previous dispatch plan was never dispatched; every plan must be followed "
                               "by its MXFP8 dispatch before the next plan (Buffer.dispatch does both)")
        plan = self.exchange_and_plan(counts_i32, num_rows, align)
        handle = DispatchHandle(self, self.rank, num_rows, plan.group_end_offsets(self.rank),
                                plan.tokens_per_expert(self.rank), plan)
        self._unpushed = handle
        return handle

    def dispatch_mxfp8(self, x, handle, scale_mode, zero_copy=False):
        if handle.dispatched:
            # A second push of one plan could land in an owner still copying out the first.
            raise RuntimeError("mxep: this DispatchHandle's MXFP8 dispatch already ran; plan again for another dispatch")
        if handle is not self._unpushed:
            raise RuntimeError("mxep: only the latest plan of this Buffer can be dispatched")
        handle.dispatched = True
        self._unpushed = None
        # The counts flags double as the entry barrier: every owner has copied out the previous
        # call's rows (stream order) before its plan of this call raised its flag.
        out = self.push_mxfp8(x, handle.state, scale_mode, into_region=zero_copy)
        self._barrier()
        if zero_copy:
            return as_mxfp8(*out, self.scale_layout)
        return as_mxfp8(*self.copy_out_mxfp8(handle.state, out), self.scale_layout)

    def dispatch_bf16(self, src, handle):
        self._barrier()  # entry: owners are done with their dispatch region
        out = self.push_bf16_dispatch(src, handle.state)
        self._barrier()
        return self.copy_out_bf16_dispatch(handle.state, out)

    def combine_input(self):
        """bf16 ``[cap, H]``: this rank's dispatch region, where the pull combine reads the
        expert outputs (aliases the MXFP8 receive rows, which were copied out already)."""
        return self.dispatch_region_bf16[: self.regions.capacity]

    def combine_bf16(self, src, handle):
        if self.is_combine_input(src):
            # Zero-copy: the owners wrote their expert outputs into their own dispatch region
            # (after the dispatch's copy-out, in stream order); once every owner is here, every
            # source pulls its rows. No exit barrier: a peer writes that region again only
            # after a later barrier that this rank reaches once its pull is done.
            self._barrier()
            return self.pull_combine(handle.state, handle.num_rows)
        if self._combine_region_read:
            # Entry: sources are done with their combine region. Skipped when a barrier came
            # after the last copy-out (the dispatch's, in a dispatch -> combine step).
            self._barrier()
        out = self.push_bf16_combine(src, handle.state, handle.num_rows)
        self._barrier()
        self._combine_region_read = True
        return self.copy_out_combine(handle.state, out)

    def token_state_like(self, t, k, device):
        r = self.regions
        W, E, S = r.world_size, r.num_experts, r.rows
        i32, f32 = torch.int32, torch.float32
        return SymmMemTokenState.empty_like(
            {"pair_weights": ((t, k), f32), "row_base": ((W, E), i32), "src_end": ((W, E), i32),
             "group_end": ((E,), i32), "recv": ((E,), i32), "recv_cum": ((W, E), i32), "tok_recv": ((W,), i32),
             "slot": ((t, W), i32), "pair_owner": ((t, k), i32), "pair_rows": ((t, k), i32),
             "slot_rows": ((S, k), i32), "slot_weights": ((S, k), f32)}, device)

    def dispatch_tokens(self, x, topk_idx, topk_weights, scale_mode, align):
        if self._unpushed is not None:
            raise RuntimeError("mxep: the previous dispatch plan was never dispatched; every plan must be followed "
                               "by its dispatch before the next plan")
        st, dropped, route, plan = self.plan_tokens(topk_idx, topk_weights, align)
        self.push_tokens_mxfp8(x, st, scale_mode)
        self._barrier()
        q, s = self.expand_tokens(st, align)
        group_end_offsets, tokens_per_expert = plan.mine   # tensors of their own (the plan kernel's)
        return TokenDispatch(q, s, group_end_offsets, tokens_per_expert, dropped, route.errors, st)

    def _reduce_back(self, src, st, align, weighted):
        if self._combine_region_read:
            self._barrier()   # entry: sources are done reading their combine region
        self.reduce_tokens(src, st, align, weighted)
        self._barrier()
        self._combine_region_read = True
        return self.sum_partials(st)

    def combine_tokens(self, expert_out, state, align):
        return self._reduce_back(expert_out, state, align, True)

    def dispatch_tokens_backward(self, grad_tokens, state, align):
        return self._reduce_back(grad_tokens, state, align, False)

    def combine_tokens_backward(self, dy, expert_out, state, align):
        self._barrier()   # entry: owners are done with their token slots (the dispatch's expand)
        self.push_token_grads(dy, state)
        self._barrier()
        grad_expert_out = self.expand_token_grads(expert_out, state, align)
        self._barrier()
        return grad_expert_out, self.gather_weight_grads(state)
