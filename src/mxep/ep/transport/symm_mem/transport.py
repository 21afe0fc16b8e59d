"""``SymmMemTransport``: PyTorch symmetric memory on the GPUs of one NVLink node.

The one protocol (docs/design.md), per forward dispatch: the plan kernel exchanges the counts
with release/acquire flags and plans (one launch); the fused kernel quantizes each row in
registers and stores it at its final expert-major row on the owner over NVLink; a
symmetric-memory barrier; a local copy-out of the rows other ranks stored here. No host sync,
no extra collective. The combine: push + barrier + copy-out for a regular ``expert_out``, or
barrier + pull for the zero-copy input.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from mxep.ep.config import EPConfig
from mxep.ep.transport.base import DispatchHandle, Transport, as_mxfp8
from mxep.ep.routing import TokenRoute, route_tokens
from mxep.ep.transport.symm_mem.memory import POISON, PeerMemory, RegionLayout, TokenState
from mxep.ep.transport.symm_mem.plan import DispatchPlan
from mxep.ep.transport.symm_mem.tokens import pair_tables

__all__ = ["SymmMemTransport", "plan_token_state"]


class _NoBarrier:
    """The symmetric-memory handle of a one-rank world without symmetric memory: a barrier with
    nobody to wait for. Counts barriers like the real one (``barriers``: tests read it)."""

    barriers = 0

    def barrier(self, channel: int = 0, timeout_ms: int = 0) -> None:
        self.barriers += 1


class SymmMemTransport(Transport):
    name = "symm_mem"

    def __init__(self, group, regions: RegionLayout, device: torch.device, config: EPConfig):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group
        self.rank = dist.get_rank(group)
        self.config = config
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # required by older torch, a no-op later
            symm_mem.enable_symm_mem_for_group(group.group_name)
        mem = symm_mem.empty(regions.total_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(mem, group)
        self.peer = PeerMemory(mem, list(self.handle.buffer_ptrs), self.rank, regions, config)
        # Every rank's stream first drains what it queued before (a previous Buffer's kernels may
        # still be storing into memory that this allocation now reuses); then poison once, so a
        # row that nobody wrote cannot pass for data (tests check bytes), and zero the signal
        # words, whose values must only ever come from this Buffer's calls; then all ranks meet.
        self._barrier()
        mem.fill_(POISON)
        self.peer.clear_signals()
        self._barrier()
        self._init_state()

    def _init_state(self) -> None:
        self._unpushed: DispatchHandle | None = None   # the plan awaiting its dispatch (sync.py)
        self._combine_region_read = False              # a combine copy-out was queued since the last barrier

    @classmethod
    def over_local_memory(cls, regions: RegionLayout, config: EPConfig, device: torch.device | str = "cpu",
                          group=None) -> "SymmMemTransport":
        """A world-size-1 transport over a plain tensor (no symmetric memory; barriers are
        no-ops): the symmetric-memory code path, host logic and kernels, where there is no
        symmetric memory (CPU tests under the interpreter, host-cost measurements)."""
        if regions.world_size != 1:
            raise ValueError(f"over_local_memory is a one-rank world, got world_size={regions.world_size}")
        self = cls.__new__(cls)
        self.group, self.rank, self.handle, self.config = group, 0, _NoBarrier(), config
        mem = torch.full((regions.total_bytes,), POISON, dtype=torch.uint8, device=device)
        self.peer = PeerMemory(mem, [mem.data_ptr()], 0, regions, config)
        self.peer.clear_signals()
        self._init_state()
        return self

    def _barrier(self) -> None:
        # Once every rank has passed a barrier queued after its last combine copy-out, no
        # rank still reads its combine region: the next push combine needs no entry barrier
        # of its own (every rank runs the same calls, so every rank's k-th barrier follows the
        # same copy-outs).
        self.handle.barrier(channel=0, timeout_ms=self.config.barrier_timeout_ms)
        self._combine_region_read = False

    def plan(self, counts_i32, num_rows, align):
        # One launch: counts to every rank, wait for theirs, plan (sync.py). Its ordering
        # argument needs every plan to be followed by its dispatch: a rank writes its next count
        # row into a peer's matrix only after the barrier after the push of this call, hence
        # after the peer's plan read the matrix.
        if self._unpushed is not None:
            raise RuntimeError("mxep: the previous dispatch plan was never dispatched; every plan must be followed "
                               "by its MXFP8 dispatch before the next plan (Buffer.dispatch does both)")
        plan = self.peer.exchange_and_plan(counts_i32, num_rows, align)
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
        out = self.peer.push_mxfp8(x, handle.state, scale_mode, into_region=zero_copy)
        self._barrier()
        if zero_copy:
            return as_mxfp8(*out)
        return as_mxfp8(*self.peer.copy_out_mxfp8(handle.state, out))

    def status(self) -> int:
        return self.peer.status()   # debug-only: host sync

    def dispatch_bf16(self, src, handle):
        self._barrier()  # entry: owners are done with their dispatch region
        out = self.peer.push_bf16_dispatch(src, handle.state)
        self._barrier()
        return self.peer.copy_out_bf16_dispatch(handle.state, out)

    def combine_input(self):
        return self.peer.combine_input

    def combine_bf16(self, src, handle):
        if self.peer.is_combine_input(src):
            # Zero-copy: the owners wrote their expert outputs into their own dispatch region
            # (after the dispatch's copy-out, in stream order); once every owner is here, every
            # source pulls its rows. No exit barrier: a peer writes that region again only
            # after a later barrier that this rank reaches once its pull is done.
            self._barrier()
            return self.peer.pull_combine(handle.state, handle.num_rows)
        if self._combine_region_read:
            # Entry: sources are done with their combine region. Skipped when a barrier came
            # after the last copy-out (the dispatch's, in a dispatch -> combine step).
            self._barrier()
        out = self.peer.push_bf16_combine(src, handle.state, handle.num_rows)
        self._barrier()
        self._combine_region_read = True
        return self.peer.copy_out_combine(handle.state, out)

    # ------------------------------------------------------------------ token-level (tokens.py)
    # The per-call state travels as a list of tensors (the plan's, then TokenState's; the gate
    # weights fp32 [t, k] last, as on every transport), so that the Buffer's registered ops can
    # pass it through torch.compile graphs.
    def token_state_like(self, t: int, k: int, device) -> list[torch.Tensor]:
        r = self.peer.regions
        W, E, S = r.world_size, r.num_experts, r.rows
        i32, f32 = torch.int32, torch.float32
        shapes = [((W, E), i32), ((W, E), i32), ((E,), i32), ((E,), i32), ((W, E), i32), ((W,), i32),
                  ((t, W), i32), ((t, k), i32), ((t, k), i32), ((S, k), i32), ((S, k), f32), ((t, k), f32)]
        return [torch.empty(sh, dtype=dt, device=device) for sh, dt in shapes]

    def _state(self, ts: list[torch.Tensor], align: int) -> TokenState:
        r = self.peer.regions
        plan = DispatchPlan(*ts[:5], r.num_experts // r.world_size, align, ts[5])
        slot, owner, pair_rows, rows, weights, pair_weights = ts[6:]
        return TokenState(plan, slot, owner, pair_rows, pair_weights, rows, weights)

    def dispatch_tokens(self, x, topk_idx, topk_weights, scale_mode, align):
        """-> ``(qdata, scale, group_end_offsets, tokens_per_expert, state tensors)``."""
        if self._unpushed is not None:
            raise RuntimeError("mxep: the previous dispatch plan was never dispatched; every plan must be followed "
                               "by its dispatch before the next plan")
        st = plan_token_state(self.peer, topk_idx, topk_weights, align, "all")
        self.peer.push_tokens_mxfp8(x, st, scale_mode)
        self._barrier()
        q, s = self.peer.expand_tokens(st)
        p = st.plan
        state = [p.row_base, p.src_end, p.group_end, p.recv, p.recv_cum, p.tok_recv,
                 st.slot, st.pair_owner, st.pair_rows, st.rows, st.weights, st.pair_weights]
        return (q, s, p.group_end_offsets(self.rank).clone(), p.tokens_per_expert(self.rank).clone(), st.num_dropped,
                state)

    def _reduce_back(self, src, st, weighted):
        if self._combine_region_read:
            self._barrier()   # entry: sources are done reading their combine region
        self.peer.reduce_tokens(src, st, weighted)
        self._barrier()
        self._combine_region_read = True
        return self.peer.sum_partials(st)

    def combine_tokens(self, expert_out, state, align):
        return self._reduce_back(expert_out, self._state(state, align), True)

    def dispatch_tokens_backward(self, grad_tokens, state, align):
        return self._reduce_back(grad_tokens, self._state(state, align), False)

    def combine_tokens_backward(self, dy, expert_out, state, align):
        st = self._state(state, align)
        self._barrier()   # entry: owners are done with their token slots (the dispatch's expand)
        self.peer.push_token_grads(dy, st)
        self._barrier()
        grad_expert_out = self.peer.expand_token_grads(expert_out, st)
        self._barrier()
        return grad_expert_out, self.peer.gather_weight_grads(st)


def plan_token_state(peer: PeerMemory, topk_idx: torch.Tensor, topk_weights: torch.Tensor, align: int,
                     phase: str, route: TokenRoute | None = None) -> TokenState | None:
    """Route the tokens (:func:`mxep.ep.routing.route_tokens`, or ``route`` when already
    routed), exchange the counts and plan (``phase`` as :meth:`PeerMemory.exchange_and_plan`),
    and derive every pair's layout row."""
    r = peer.regions
    t, k = topk_idx.shape
    if route is None:
        route = route_tokens(topk_idx, r.num_experts, r.world_size)
    plan = peer.exchange_and_plan(route.counts, t * k, align, phase, tokens_per_rank=route.tokens_per_rank)
    if plan is None:
        return None
    # Each pair's row is row_base[rank, expert] + its index in the sorted expansion (row_base is
    # "dest_row - i" for the row-level row i): exactly the row the row-level dispatch gives it.
    pair_rows, pair_weights, rows, weights, dropped = pair_tables(
        route.expert, route.pair_index, route.pair_owner, topk_weights.detach(), plan, peer.rank, align,
        r.expert_cap, r.world_size * r.max_tokens_per_rank)
    return TokenState(plan, route.slot, route.pair_owner, pair_rows, pair_weights, rows, weights, dropped)
