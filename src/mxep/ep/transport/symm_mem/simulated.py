"""A simulated EP world: every rank's communication memory in one process.

Runs the *same* kernels and phases as :class:`~mxep.ep.transport.symm_mem.SymmMemTransport`,
with the barriers replaced by phase order (all ranks finish phase k before any starts phase
k+1); the plan kernel runs as its two halves (counts out to every rank, then wait + plan). On
CPU under ``TRITON_INTERPRET=1`` or on one GPU, it tests the fused kernels' peer stores, offsets
and padding without a multi-GPU machine.

Example::

    >>> world = SimulatedWorld(world_size=3, num_experts=6, hidden=64, max_tokens_per_rank=16)
    >>> out = world.dispatch(xs, counts)          # xs[r]: bf16 [n_r, 64], counts[r]: [6]
    >>> out[r].tokens.qdata.shape                 # [capacity, 64] on every rank
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from mxep._utils import padded_group_rows
from mxep.ep.config import EPConfig
from mxep.ep.layout import capacity_rows, check_blocked_settings, layout_capacity
from mxep.ep.transport.base import DispatchHandle, as_mxfp8
from mxep.ep.routing import route_tokens
from mxep.ep.transport.symm_mem.memory import RegionLayout
from mxep.ep.transport.symm_mem.transport import SymmMemTransport
from mxep.format.mxfp8 import MXFP8Tensor

__all__ = ["SimulatedWorld", "SimulatedDispatch"]


class SimulatedDispatch(NamedTuple):
    """One rank's dispatch output (the fields of :class:`mxep.DispatchResult`)."""

    tokens: MXFP8Tensor
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: DispatchHandle


class SimulatedWorld:
    """``world_size`` ranks' buffers in one process (same arguments as :class:`mxep.Buffer`;
    ``scale_layout`` ``"row_major"`` or ``"blocked"``, no ``"auto"``)."""

    def __init__(self, world_size: int, num_experts: int, hidden: int, max_tokens_per_rank: int,
                 align: int = 32, scale_mode: str = "rceil", device: torch.device | str = "cpu",
                 config: EPConfig | None = None, top_k: int = 0, expert_capacity: int | None = None,
                 scale_layout: str = "row_major"):
        if num_experts % world_size or hidden % 32:
            raise ValueError("num_experts must be a multiple of world_size and hidden of 32")
        self.world_size, self.num_experts, self.hidden = world_size, num_experts, hidden
        self.max_tokens_per_rank, self.align, self.scale_mode = max_tokens_per_rank, align, scale_mode
        self.config = config if config is not None else EPConfig()
        L = num_experts // world_size
        rows_per_rank = max_tokens_per_rank * min(top_k, L) if top_k else max_tokens_per_rank
        self.top_k = top_k
        self.capacity = capacity_rows(world_size, L, rows_per_rank, align)
        if expert_capacity is not None:   # as Buffer(capacity_factor=...): the rows one expert keeps
            self.capacity = min(self.capacity, L * padded_group_rows(expert_capacity, align))
        check_blocked_settings(scale_layout, hidden, align)
        self.scale_layout = scale_layout
        self.capacity = layout_capacity(self.capacity, scale_layout)
        regions = RegionLayout(world_size, num_experts, hidden, max_tokens_per_rank, self.capacity, top_k,
                               expert_capacity or 2**31 - 1, scale_layout)
        #: one :class:`SymmMemTransport` per rank over plain tensors; this class runs their phases
        self.peers = SymmMemTransport.simulated_ranks(regions, self.config, device)

    def plan(self, counts: Sequence[torch.Tensor], num_rows: Sequence[int]) -> list[DispatchHandle]:
        counts = [c.to(torch.int32).contiguous() for c in counts]
        for r, p in enumerate(self.peers):   # the plan kernel's two halves, one phase on every rank at a time
            p.exchange_and_plan(counts[r], num_rows[r], self.align, "put")
        handles = []
        for r, p in enumerate(self.peers):
            plan = p.exchange_and_plan(counts[r], num_rows[r], self.align, "plan")
            handles.append(DispatchHandle(None, r, num_rows[r], plan.group_end_offsets(r), plan.tokens_per_expert(r),
                                          plan))
        return handles

    def dispatch(self, xs: Sequence[torch.Tensor], counts: Sequence[torch.Tensor],
                 zero_copy: bool = False) -> list[SimulatedDispatch]:
        """Fused MXFP8 dispatch on every rank: ``xs[r]`` bf16 ``[n_r, H]``, ``counts[r]`` ``[E]``.
        ``zero_copy``: every rank's tokens are its receive region (no copy-out)."""
        handles = self.plan(counts, [x.shape[0] for x in xs])
        outs = [p.push_mxfp8(xs[r].contiguous(), h.state, self.scale_mode, into_region=zero_copy)
                for r, (p, h) in enumerate(zip(self.peers, handles))]
        # ---- barrier ----
        out = []
        for p, h, o in zip(self.peers, handles, outs):
            tokens = as_mxfp8(*(o if zero_copy else p.copy_out_mxfp8(h.state, o)), self.scale_layout)
            out.append(SimulatedDispatch(tokens, h.group_end_offsets, h.tokens_per_expert, h))
        return out

    def dispatch_bf16(self, srcs: Sequence[torch.Tensor], handles: Sequence[DispatchHandle]) -> list[torch.Tensor]:
        """bf16 rows into the dispatch layout (what the combine's backward does)."""
        outs = [p.push_bf16_dispatch(srcs[r].contiguous(), h.state) for r, (p, h) in enumerate(zip(self.peers, handles))]
        # ---- barrier ----
        return [p.copy_out_bf16_dispatch(h.state, o) for p, h, o in zip(self.peers, handles, outs)]

    def combine_inputs(self) -> list[torch.Tensor]:
        """Every rank's zero-copy combine input (bf16 ``[capacity, H]``, see ``Buffer.combine_input``)."""
        return [p.combine_input() for p in self.peers]

    def combine(self, expert_outs: Sequence[torch.Tensor], handles: Sequence[DispatchHandle]) -> list[torch.Tensor]:
        """Rows of each rank's dispatch layout ``[capacity, H]`` back to their sources: the push
        combine, or, where every ``expert_outs[r]`` is :meth:`combine_inputs` ``[r]``, the pull."""
        if all(p.is_combine_input(e) for p, e in zip(self.peers, expert_outs)):
            # ---- barrier ----
            return [p.pull_combine(h.state, h.num_rows) for p, h in zip(self.peers, handles)]
        outs = [p.push_bf16_combine(expert_outs[r].contiguous(), h.state, h.num_rows)
                for r, (p, h) in enumerate(zip(self.peers, handles))]
        # ---- barrier ----
        return [p.copy_out_combine(h.state, o) for p, h, o in zip(self.peers, handles, outs)]

    # ---------------------------------------------------------------- token-level (top_k > 0)
    def dispatch_tokens(self, xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor],
                        topk_weights: Sequence[torch.Tensor]) -> list[SimulatedDispatch]:
        """Token-level MXFP8 dispatch on every rank: ``xs[r]`` bf16 ``[t_r, H]``, ``topk_idx[r]``
        int ``[t_r, k]`` (``-1``: no expert), ``topk_weights[r]`` fp32 ``[t_r, k]``."""
        if not self.top_k:
            raise ValueError("dispatch_tokens needs a world built with top_k")
        # one routing per rank, as a real rank does (its two plan halves share it)
        routes = [route_tokens(topk_idx[r], self.num_experts, self.world_size, p.routing_errors)
                  for r, p in enumerate(self.peers)]
        for r, p in enumerate(self.peers):
            p.plan_tokens(topk_idx[r], topk_weights[r], self.align, "put", routes[r])
        states = [p.plan_tokens(topk_idx[r], topk_weights[r], self.align, "plan", routes[r])[0]
                  for r, p in enumerate(self.peers)]
        for r, (p, st) in enumerate(zip(self.peers, states)):
            p.push_tokens_mxfp8(xs[r].contiguous(), st, self.scale_mode)
        # ---- barrier ----
        out = []
        for r, (p, st) in enumerate(zip(self.peers, states)):
            plan = st.plan(self.align)
            h = DispatchHandle(None, r, xs[r].shape[0], plan.group_end_offsets(r), plan.tokens_per_expert(r), st)
            tokens = as_mxfp8(*p.expand_tokens(st, self.align), self.scale_layout)
            out.append(SimulatedDispatch(tokens, h.group_end_offsets,
                                         h.tokens_per_expert, h))
        return out

    def _reduce_back(self, srcs, handles, weighted):
        for p, s, h in zip(self.peers, srcs, handles):
            p.reduce_tokens(s.contiguous(), h.state, self.align, weighted)
        # ---- barrier ----
        return [p.sum_partials(h.state) for p, h in zip(self.peers, handles)]

    def combine_tokens(self, expert_outs: Sequence[torch.Tensor], handles: Sequence[DispatchHandle]) -> list[torch.Tensor]:
        """``y[r]`` bf16 ``[t_r, H]``: every token's gate-weighted sum of its expert rows."""
        return self._reduce_back(expert_outs, handles, True)

    def dispatch_tokens_backward(self, grads: Sequence[torch.Tensor], handles: Sequence[DispatchHandle]) -> list[torch.Tensor]:
        """The dispatch's backward: ``x.grad[r]`` bf16 ``[t_r, H]`` from the layout's gradients."""
        return self._reduce_back(grads, handles, False)

    def combine_tokens_backward(self, dys: Sequence[torch.Tensor], expert_outs: Sequence[torch.Tensor],
                                handles: Sequence[DispatchHandle]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The combine's backward: per rank ``(grad_expert_out [cap, H] bf16, grad_topk_weights
        [t, k] fp32)``."""
        for p, dy, h in zip(self.peers, dys, handles):
            p.push_token_grads(dy.contiguous(), h.state)
        # ---- barrier ----
        grads = [p.expand_token_grads(e.contiguous(), h.state, self.align)
                 for p, e, h in zip(self.peers, expert_outs, handles)]
        # ---- barrier ----
        return [(g, p.gather_weight_grads(h.state)) for p, g, h in zip(self.peers, grads, handles)]
