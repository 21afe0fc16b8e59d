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
from mxep.ep.routing import route_tokens
from mxep.ep.transport.base import BAD_COUNTS, DispatchHandle, TokenDispatch, TokenState, Transport, as_mxfp8, token_state
from mxep.format.blocked import blocked_scale_offsets
from mxep.format.mxfp8 import to_mxfp8

__all__ = ["CollectiveTransport", "CollectiveTokenState"]


def _finish_rows(out: torch.Tensor, pad_rows: torch.Tensor, capacity: int) -> torch.Tensor:
    """Zero this rank's pad rows (``pad_rows`` int64, scratch-row entries for unused slots) in a
    received ``[capacity + 1, C]`` tensor and drop the scratch row -> ``[capacity, C]``."""
    out.index_fill_(0, pad_rows, 0)
    return out[:capacity]


@token_state
class CollectiveTokenState(TokenState):
    """The per-call state of a token-level dispatch on the collective transport, which expands
    on the source and moves the stably expert-sorted expansion with the row-level path.

    Attributes:
        pair_weights: fp32 ``[t, k]`` the gate weights (as dispatched).
        counts: int32 ``[W, E]`` every rank's (clamped) pair counts per expert, as exchanged: the
            row-level layout of the expansion is computed again from it where a pass needs it
            (a few small sync-free ops, :func:`~mxep.ep.layout.compute_dispatch_layout`), instead
            of keeping its seven tensors per call.
        token_of: int64 ``[t * k]`` the token of each sorted row.
        pair_index: int64 ``[t, k]`` each pair's sorted row (0 for ``-1`` slots).
        owner: int64 ``[t, k]`` each pair's owner rank (``-1``: no expert, or dropped).
    """

    counts: torch.Tensor
    token_of: torch.Tensor
    pair_index: torch.Tensor
    owner: torch.Tensor


class CollectiveTransport(Transport):
    """Args: the EP ``group``, the Buffer's sizes (``capacity``: rows of the dispatch layout;
    ``top_k``: 0 for a row-level Buffer; ``expert_cap``: the ``capacity_factor`` bound),
    ``device`` and ``scale_layout`` (:attr:`Transport.scale_layout`; ``"blocked"`` needs
    ``capacity % 128 == 0``)."""

    name = "collective"
    token_state_type = CollectiveTokenState

    def __init__(self, group, num_experts: int, hidden: int, max_tokens_per_rank: int, capacity: int,
                 device: torch.device, top_k: int = 0, align: int = 32, expert_cap: int | None = None,
                 scale_layout: str = "row_major"):
        super().__init__(torch.zeros(2, dtype=torch.int32, device=device))
        self.scale_layout = scale_layout
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.num_experts = num_experts
        self.hidden, self.capacity, self.top_k, self.align = hidden, capacity, top_k, align
        self.expert_cap = expert_cap
        # The token-level path expands on the source: it moves the rows of the sorted expansion,
        # at most T * min(k, L) ... of them per peer, so its row budget is T * k.
        self.max_tokens_per_rank = max_tokens_per_rank * top_k if top_k else max_tokens_per_rank
        self.device = device
        self._combine_input = None
        # The device-side error word (as the symmetric-memory transport's status word):
        # BAD_COUNTS when a rank's counts had to be clamped.
        self._status = torch.zeros((), dtype=torch.int32, device=device)

    def plan(self, counts_i32, num_rows, align):
        counts, bad = clamp_counts(counts_i32, num_rows)
        self._status.bitwise_or_(bad.to(torch.int32) * BAD_COUNTS)
        return self._handle_of(self._exchange_counts(counts), num_rows, align)

    def _handle_of(self, all_counts: torch.Tensor, num_rows: int, align: int) -> DispatchHandle:
        """The row-level handle of the layout of the count matrix ``all_counts`` ``[W, E]``."""
        layout = compute_dispatch_layout(all_counts, self.max_tokens_per_rank, align, self.capacity, self.expert_cap)
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
                           splits: tuple[int, ...], blocked: tuple[bool, ...] | None = None) -> list[torch.Tensor]:
        """Send rows ``payload [n, C]`` to their owners (one fixed-size all-to-all) and place them
        in the expert-major layout; ``splits`` cuts the columns into separate outputs (MXFP8 data
        and scales travel in one message but land in two tensors); ``blocked[i]``: output ``i``
        (uint8 scales) is placed in the blocked layout (mxep/format/blocked.py) instead of by
        rows."""
        W, N = self.world, self.max_tokens_per_rank
        send = torch.zeros(W * N + 1, payload.shape[1], dtype=payload.dtype, device=payload.device)
        if n:
            send.index_copy_(0, self._send_slots(layout, n), payload)
        recv = self._all_to_all_rows(send[: W * N])
        rows = self._recv_rows(layout)
        outs = []
        for i, part in enumerate(recv.split(splits, dim=1)):
            if blocked is not None and blocked[i]:
                outs.append(self._place_blocked(part, rows, layout.pad_rows[self.rank]))
                continue
            out = torch.empty(self.capacity + 1, part.shape[1], dtype=payload.dtype, device=payload.device)
            outs.append(_finish_rows(out.index_copy_(0, rows, part), layout.pad_rows[self.rank], self.capacity))
        return outs

    def _place_blocked(self, part: torch.Tensor, rows: torch.Tensor, pad_rows: torch.Tensor) -> torch.Tensor:
        """Received scale rows ``part`` uint8 ``[W * N, C]`` -> uint8 ``[capacity, C]`` in the
        blocked layout: each row's 4-byte words go straight to their blocked positions (the same
        one scatter as the row-major placement, at word granularity), and the pad rows' words
        are zeroed. The scratch row (``capacity``, unused slots) lands in one extra tile row past
        the output, which is cut off."""
        C = part.shape[1]
        words = torch.empty((self.capacity + 128) * C // 4, dtype=torch.int32, device=part.device)
        words.index_copy_(0, blocked_scale_offsets(rows, C).flatten(), part.contiguous().view(torch.int32).flatten())
        words.index_fill_(0, blocked_scale_offsets(pad_rows, C).flatten(), 0)
        return words.view(torch.uint8)[: self.capacity * C].view(self.capacity, C)

    def dispatch_mxfp8(self, x, handle, scale_mode, zero_copy=False):
        # zero_copy: nothing to alias here; fresh tensors keep the same contract (valid until
        # the next dispatch, and longer)
        H = x.shape[1]
        t = to_mxfp8(x, scale_mode)
        packed = torch.cat([t.qdata.view(torch.uint8), t.scale.view(torch.uint8)], dim=1)
        q, s = self._scatter_to_layout(packed, handle.state, x.shape[0], (H, H // 32),
                                       (False, self.scale_layout == "blocked"))
        return as_mxfp8(q, s, self.scale_layout)

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

    # ------------------------------------------------------------------ token-level
    # The portable path expands on the source: the rows of the stably expert-sorted expansion go
    # through the row-level collective dispatch (the same bytes, docs/layout.md), and the combine
    # reduces on the source with the same arithmetic as the symmetric-memory kernels (per owner,
    # fp32 in top-k slot order, rounded to bf16; then the owners' partials in rank order), so
    # both transports give the same bits.
    def token_state_like(self, t, k, device):
        W, E = self.world, self.num_experts
        i32, i64, f32 = torch.int32, torch.int64, torch.float32
        return CollectiveTokenState.empty_like(
            {"pair_weights": ((t, k), f32), "counts": ((W, E), i32), "token_of": ((t * k,), i64),
             "pair_index": ((t, k), i64), "owner": ((t, k), i64)}, device)

    def _rows_handle(self, st: CollectiveTokenState, align: int) -> DispatchHandle:
        """The row-level handle of the sorted expansion."""
        t, k = st.pair_weights.shape
        return self._handle_of(st.counts, t * k, align)

    def dispatch_tokens(self, x, topk_idx, topk_weights, scale_mode, align):
        t, k = topk_idx.shape
        route = route_tokens(topk_idx, self.num_experts, self.world, self.routing_errors)
        order = torch.argsort(route.expert.flatten(), stable=True)
        all_counts = self._exchange_counts(route.counts)   # (valid by construction: no clamp)
        rows = self._handle_of(all_counts, t * k, align)
        token_of = order // k
        tokens = self.dispatch_mxfp8(x.index_select(0, token_of), rows, scale_mode)
        lay = rows.state
        pair_index = route.pair_index.long().clamp(min=0)
        # capacity_factor drops: a pair whose sorted row has no destination row
        dropped = (route.pair_owner >= 0) & (lay.dest_row[self.rank].long().gather(0, pair_index.flatten())
                                             .view(t, k) < 0)
        owner = torch.where(dropped, -1, route.pair_owner.long())
        st = CollectiveTokenState(topk_weights.detach().to(torch.float32, copy=True), all_counts, token_of,
                                  pair_index, owner)
        return TokenDispatch(tokens.qdata, tokens.scale, rows.group_end_offsets.clone(),
                             rows.tokens_per_expert.clone(), dropped.sum(), route.errors, st)

    def _two_level_sum(self, pair_rows: torch.Tensor, st: CollectiveTokenState,
                       weights: torch.Tensor | None) -> torch.Tensor:
        t, k, H = pair_rows.shape
        y = torch.zeros(t, H, dtype=torch.float32, device=pair_rows.device)
        for d in range(self.world):
            part = torch.zeros(t, H, dtype=torch.float32, device=pair_rows.device)
            for j in range(k):
                v = pair_rows[:, j].float()
                if weights is not None:
                    v = v * weights[:, j:j + 1]
                part = part + torch.where((st.owner[:, j] == d)[:, None], v, 0.0)
            y = y + part.to(torch.bfloat16).float()
        return y.to(torch.bfloat16)

    def _rows_by_pair(self, src, st, align):
        t, k = st.owner.shape
        rows = self.combine_bf16(src, self._rows_handle(st, align))        # sorted expansion order
        return rows.index_select(0, st.pair_index.flatten()).view(t, k, rows.shape[1])

    def combine_tokens(self, expert_out, state, align):
        return self._two_level_sum(self._rows_by_pair(expert_out, state, align), state, state.pair_weights)

    def dispatch_tokens_backward(self, grad_tokens, state, align):
        return self._two_level_sum(self._rows_by_pair(grad_tokens, state, align), state, None)

    def combine_tokens_backward(self, dy, expert_out, state, align):
        st = state
        t, k = st.owner.shape
        valid = st.owner >= 0
        g = (st.pair_weights[:, :, None] * dy[:, None, :].float()).to(torch.bfloat16)     # [t, k, H]
        sorted_rows = torch.zeros(t * k, dy.shape[1], dtype=torch.bfloat16, device=dy.device)
        sorted_rows.index_copy_(0, st.pair_index.flatten()[valid.flatten()], g.flatten(0, 1)[valid.flatten()])
        grad_expert_out = self.dispatch_bf16(sorted_rows, self._rows_handle(st, align))
        # the expert rows at the source again (the portable path keeps no copy from the forward)
        rows = self._rows_by_pair(expert_out, st, align)
        grad_w = torch.where(valid, (dy[:, None, :].float() * rows.float()).sum(-1), 0.0)
        return grad_expert_out, grad_w
