"""A simulated EP world of the NVSHMEM transport: every rank's buffers in one process.

The same phases and kernels as :class:`~mxep.ep.transport.nvshmem.NvshmemTransport`, with the
exchanges done by :func:`~mxep.ep.transport.nvshmem.exchange.exchange_ranks` between the phases
of all ranks: on the CPU under ``TRITON_INTERPRET=1``, or on one GPU with the kernels compiled
for it (torch's NVSHMEM refuses a one-rank group, so one GPU cannot run the real exchange).
Same token-level methods and results as :class:`~mxep.ep.transport.symm_mem.simulated.SimulatedWorld`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mxep._utils import padded_group_rows
from mxep.ep.config import EPConfig
from mxep.ep.layout import capacity_rows, check_blocked_settings, layout_capacity
from mxep.ep.transport.base import DispatchHandle, as_mxfp8
from mxep.ep.transport.nvshmem.exchange import exchange_ranks
from mxep.ep.transport.nvshmem.transport import NvshmemTransport
from mxep.ep.transport.symm_mem.simulated import SimulatedDispatch

__all__ = ["SimulatedNvshmemWorld"]


class SimulatedNvshmemWorld:
    """``world_size`` ranks of the NVSHMEM transport in one process (the token-level arguments
    of :class:`mxep.Buffer`; ``scale_layout`` ``"row_major"`` or ``"blocked"``)."""

    def __init__(self, world_size: int, num_experts: int, hidden: int, max_tokens_per_rank: int, top_k: int,
                 align: int = 32, scale_mode: str = "rceil", device: torch.device | str = "cpu",
                 config: EPConfig | None = None, expert_capacity: int | None = None,
                 scale_layout: str = "row_major"):
        if num_experts % world_size or hidden % 32:
            raise ValueError("num_experts must be a multiple of world_size and hidden of 32")
        self.world_size, self.num_experts, self.hidden = world_size, num_experts, hidden
        self.align, self.scale_mode, self.top_k = align, scale_mode, top_k
        self.config = config if config is not None else EPConfig()
        L = num_experts // world_size
        self.capacity = capacity_rows(world_size, L, max_tokens_per_rank * min(top_k, L), align)
        if expert_capacity is not None:
            self.capacity = min(self.capacity, L * padded_group_rows(expert_capacity, align))
        check_blocked_settings(scale_layout, hidden, align)
        self.capacity = layout_capacity(self.capacity, scale_layout)
        device = torch.device(device)
        #: one :class:`NvshmemTransport` per rank without an exchange; this class runs their phases
        self.peers = [NvshmemTransport(None, r, world_size, num_experts, hidden, max_tokens_per_rank, top_k,
                                       self.capacity, device, self.config, expert_capacity or 2**31 - 1, scale_layout)
                      for r in range(world_size)]

    def _exchange(self, sends, counts) -> list[torch.Tensor]:
        recvs = [p.recv_buffer() for p in self.peers]
        exchange_ranks(sends, counts, recvs)
        return recvs

    def dispatch_tokens(self, xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor],
                        topk_weights: Sequence[torch.Tensor]) -> list[SimulatedDispatch]:
        routes = [p.route(i) for p, i in zip(self.peers, topk_idx)]
        views = [p.counts_views(p.send_buffer()) for p in self.peers]
        for p, r, (send, _) in zip(self.peers, routes, views):
            p.put_count_rows(r, send)
        exchange_ranks([v[0] for v in views], [p._one_each for p in self.peers], [v[1] for v in views])
        planned = [p.plan_tokens(r, v[1].view(torch.int32), w, self.align)
                   for p, r, v, w in zip(self.peers, routes, views, topk_weights)]
        sends = [p.send_buffer() for p in self.peers]
        for p, x, (st, _), send in zip(self.peers, xs, planned, sends):
            p.pack_tokens(x.contiguous(), st, send, self.scale_mode)
        recvs = self._exchange(sends, [st.tok_send for st, _ in planned])
        out = []
        for r, (p, (st, _), recv) in enumerate(zip(self.peers, planned, recvs)):
            q, s = p.unpack_tokens(st, recv, self.align)
            L = self.num_experts // self.world_size
            ends, kept = st.group_end[r * L:(r + 1) * L], st.recv[r * L:(r + 1) * L]
            h = DispatchHandle(None, r, xs[r].shape[0], ends, kept, st)
            out.append(SimulatedDispatch(as_mxfp8(q, s, p.scale_layout), ends, kept, h))
        return out

    def _reduce_back(self, srcs, handles, weighted):
        sends = [p.send_buffer() for p in self.peers]
        for p, src, h, send in zip(self.peers, srcs, handles, sends):
            p.reduce_rows(src.contiguous(), h.state, send, weighted)
        recvs = self._exchange(sends, [h.state.tok_recv for h in handles])
        return [p.sum_partials(h.state, recv) for p, h, recv in zip(self.peers, handles, recvs)]

    def combine_tokens(self, expert_outs, handles) -> list[torch.Tensor]:
        return self._reduce_back(expert_outs, handles, True)

    def dispatch_tokens_backward(self, grads, handles) -> list[torch.Tensor]:
        return self._reduce_back(grads, handles, False)

    def combine_tokens_backward(self, dys, expert_outs, handles) -> list[tuple[torch.Tensor, torch.Tensor]]:
        sends = [p.send_buffer() for p in self.peers]
        for p, dy, h, send in zip(self.peers, dys, handles, sends):
            p.pack_grads(dy.contiguous(), h.state, send)
        recvs = self._exchange(sends, [h.state.tok_send for h in handles])
        backs = [p.send_buffer() for p in self.peers]
        grads = [p.expand_grads(e.contiguous(), h.state, recv, back, self.align)
                 for p, e, h, recv, back in zip(self.peers, expert_outs, handles, recvs, backs)]
        recvs = self._exchange(backs, [h.state.tok_recv for h in handles])
        return [(g, p.gather_weight_grads(h.state, recv)) for p, g, h, recv in zip(self.peers, grads, handles, recvs)]
