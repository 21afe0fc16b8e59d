"""``NvshmemTransport``: the token-level dispatch and combine over an exchange of whole rows
(``all_to_all_vdev`` on PyTorch's NVSHMEM symmetric memory: one node or many).

Per forward dispatch (each step one launch or one exchange, no host sync):

1. route the tokens (:func:`mxep.ep.routing.route_tokens`, as every transport);
2. exchange the count rows (expert counts and tokens per rank) so that every rank holds the
   count matrix ``[W, E + W]``, and plan from it with the plan kernel's arithmetic
   (:func:`~mxep.ep.transport.symm_mem.plan.plan_of_counts`): the same layout rows, capacity
   drops and pair tables as the symmetric-memory transport;
3. pack: every token quantized once and written once per destination rank, with its pairs'
   layout rows there and its gate weights (:func:`~mxep.ep.transport.nvshmem.kernels.pack_tokens`);
4. exchange the rows; 5. unpack on the owner into the expert-major padded layout.

The combine: the owner reduces each received token's rows (fp32, gate-weighted, top-k slot
order), one bf16 partial per (token, rank) goes back by the reverse exchange, and the source
adds them in rank order. The backward passes are the same two shapes. Bytes on the wire per
dispatch: one MXFP8 row (+ ``8k`` bytes of tables) per (token, destination rank).

Row level: not provided (``Buffer(transport="nvshmem")`` needs ``top_k``; see the Buffer).

The phases (pack, unpack, reduce, sum, expand) are methods on this rank's buffers, no exchange
inside; :meth:`dispatch_tokens` and the other contract methods put the exchanges between them,
and the simulated world (:class:`~mxep.ep.transport.nvshmem.simulated.SimulatedNvshmemWorld`)
runs the phases of several ranks of one process with :func:`~mxep.ep.transport.nvshmem.exchange.exchange_ranks`.
"""
from __future__ import annotations

import torch

from mxep.ep.config import EPConfig
from mxep.ep.routing import TokenRoute, route_tokens
from mxep.ep.transport.base import TokenDispatch, TokenState, Transport, token_state
from mxep.ep.transport.nvshmem import kernels
from mxep.ep.transport.symm_mem.memory import POISON
from mxep.ep.transport.symm_mem.plan import plan_of_counts
from mxep.ep.transport.symm_mem.tokens import pair_tables

__all__ = ["NvshmemTransport", "NvshmemTokenState"]


@token_state
class NvshmemTokenState(TokenState):
    """The per-call state of a token-level dispatch on the NVSHMEM transport (regular tensors).
    ``S = W * T`` rows of received tokens at most.

    Attributes:
        pair_weights: fp32 ``[t, k]`` the gate weights (as dispatched).
        group_end, recv: int32 ``[E]`` the plan's padded group ends and rows kept per expert.
        tok_send: int32 ``[W]`` tokens this rank sent each rank (its send segments).
        tok_recv: int32 ``[W]`` tokens each rank sent this one (its received segments).
        slot: int32 ``[t, W]`` each token's index in its segment for each rank (``-1``: not sent).
        pair_owner: int32 ``[t, k]`` each pair's owner rank (``-1``: no expert).
        pair_rows: int32 ``[t, k]`` each pair's row in its owner's layout (``-1``: none, or dropped).
        recv_rows: int32 ``[S, k]`` (owner side) each received token's layout rows here (``-1``: none).
        recv_weights: fp32 ``[S, k]`` (owner side) their gate weights.
    """

    group_end: torch.Tensor
    recv: torch.Tensor
    tok_send: torch.Tensor
    tok_recv: torch.Tensor
    slot: torch.Tensor
    pair_owner: torch.Tensor
    pair_rows: torch.Tensor
    recv_rows: torch.Tensor
    recv_weights: torch.Tensor


class NvshmemTransport(Transport):
    """Args: ``exchange`` (:func:`~mxep.ep.transport.nvshmem.exchange.make_exchange`; None: the
    phases only, for the simulated world), ``rank`` / ``world_size`` in the EP group, the Buffer's
    sizes (``capacity``: rows of the dispatch layout; ``expert_cap``: the ``capacity_factor``
    bound, ``2**31 - 1`` for none), ``device``, ``config`` and ``scale_layout``.

    Memory (from the exchange: symmetric on GPUs), per rank: three buffers of ``W * T`` rows of
    ``R`` bytes (:func:`~mxep.ep.transport.nvshmem.kernels.packed_row`: ``max(H + H/32 + 8k,
    2H)`` rounded to 16): two send buffers used in turn (a peer may still read the last call's
    rows from one: ``all_to_all_vdev`` pulls) and one receive buffer."""

    name = "nvshmem"
    token_state_type = NvshmemTokenState

    def __init__(self, exchange, rank: int, world_size: int, num_experts: int, hidden: int, max_tokens_per_rank: int,
                 top_k: int, capacity: int, device: torch.device, config: EPConfig, expert_cap: int = 2**31 - 1,
                 scale_layout: str = "row_major"):
        super().__init__(torch.zeros(2, dtype=torch.int32, device=device))
        self.exchange = exchange
        self.rank, self.world_size = rank, world_size
        self.num_experts, self.hidden, self.top_k = num_experts, hidden, top_k
        self.max_tokens_per_rank, self.capacity, self.expert_cap = max_tokens_per_rank, capacity, expert_cap
        self.device, self.config, self.scale_layout = device, config, scale_layout
        W, E, T = world_size, num_experts, max_tokens_per_rank
        self.row_bytes, table_at, weights_at = kernels.packed_row(hidden, top_k)
        self._offsets = (table_at, weights_at)
        self.rows = W * T
        nbytes = max(self.rows * self.row_bytes, W * (E + W) * 4, 16)
        alloc = exchange.alloc if exchange is not None else (
            lambda n: torch.empty(n, dtype=torch.uint8, device=device))
        self._send = [alloc(nbytes), alloc(nbytes)]
        self._recv = alloc(nbytes)
        for b in (*self._send, self._recv):
            b.fill_(POISON)   # rows nobody wrote cannot pass for data
        self.buffer_bytes = 3 * nbytes
        self._turn = 0
        self._one_each = torch.ones(W, dtype=torch.int32, device=device)

    # ================================================================== buffers
    def send_buffer(self) -> torch.Tensor:
        """uint8 ``[S, R]``: the send buffer of the next exchange (the two alternate)."""
        buf = self._send[self._turn]
        self._turn ^= 1
        return self.rows_of(buf)

    def recv_buffer(self) -> torch.Tensor:
        """uint8 ``[S, R]``: the receive buffer (every exchange lands here)."""
        return self.rows_of(self._recv)

    def rows_of(self, flat: torch.Tensor) -> torch.Tensor:
        """The ``[n, R]`` view of a buffer's allocation (uint8, flat)."""
        R = self.row_bytes
        return flat[: (flat.numel() // R) * R].view(-1, R)

    def counts_views(self, send: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 ``[W, (E + W) * 4]`` views of a send buffer's allocation and of the receive
        buffer's, for the count rows' exchange."""
        width = (self.num_experts + self.world_size) * 4
        W = self.world_size
        base = self._send[0] if send.data_ptr() == self._send[0].data_ptr() else self._send[1]
        return base[: W * width].view(W, width), self._recv[: W * width].view(W, width)

    def _new_output(self, shape, dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if self.config.poison_outputs:
            out.view(torch.uint8).fill_(POISON)
        return out

    # ================================================================== phases (no exchange)
    def route(self, topk_idx: torch.Tensor) -> TokenRoute:
        return route_tokens(topk_idx, self.num_experts, self.world_size, self.routing_errors)

    def put_count_rows(self, route: TokenRoute, send_counts: torch.Tensor) -> None:
        """This rank's count row (expert counts, then tokens per rank) into every rank's row of
        the counts' send view (int32 ``[W, E + W]`` as bytes)."""
        row = torch.cat([route.counts, route.tokens_per_rank])
        send_counts.view(torch.int32).copy_(row.expand(self.world_size, -1))

    def plan_tokens(self, route: TokenRoute, count_matrix: torch.Tensor, topk_weights: torch.Tensor,
                    align: int) -> tuple[NvshmemTokenState, torch.Tensor]:
        """From the exchanged count matrix (int32 ``[W, E + W]``): the plan and every pair's layout
        row (the symmetric-memory transport's kernels). Returns ``(state, num_dropped int64 [])``."""
        plan = plan_of_counts(count_matrix, self.rank, align, self.expert_cap)
        pair_rows, pair_weights, _, _, dropped = pair_tables(
            route.expert, route.pair_index, route.pair_owner, topk_weights.detach(), plan, self.rank, align,
            self.expert_cap, 0)
        k = route.pair_owner.shape[1]
        st = NvshmemTokenState(pair_weights, plan.group_end, plan.recv, route.tokens_per_rank, plan.tok_recv,
                               route.slot, route.pair_owner, pair_rows,
                               torch.empty(self.rows, k, dtype=torch.int32, device=self.device),
                               torch.empty(self.rows, k, dtype=torch.float32, device=self.device))
        return st, dropped

    def pack_tokens(self, x: torch.Tensor, st: NvshmemTokenState, send: torch.Tensor, scale_mode: str) -> None:
        kernels.pack_tokens(x, st.slot, st.tok_send, send, self.config, scale_mode,
                            (st.pair_rows, st.pair_owner, st.pair_weights), self._offsets)

    def unpack_tokens(self, st: NvshmemTokenState, recv: torch.Tensor, align: int) -> tuple[torch.Tensor, torch.Tensor]:
        """After the exchange: new uint8 ``[cap, H]`` / ``[cap, H // 32]`` outputs (expert-major,
        pad rows zero); fills ``st.recv_rows`` / ``st.recv_weights``."""
        cap, H = self.capacity, self.hidden
        out = (self._new_output((cap, H), torch.uint8), self._new_output((cap, H // 32), torch.uint8))
        kernels.unpack_tokens(recv, self._offsets, st.tok_recv, self.max_tokens_per_rank, st.group_end, st.recv,
                              self.rank, align, *out, st.recv_rows, st.recv_weights, self.config,
                              blocked_scales=self.scale_layout == "blocked")
        return out

    def reduce_rows(self, src: torch.Tensor, st: NvshmemTokenState, send: torch.Tensor, weighted: bool) -> None:
        kernels.reduce_rows(src, st.recv_rows, st.recv_weights if weighted else None, st.tok_recv,
                            self.max_tokens_per_rank, send, self.config)

    def sum_partials(self, st: NvshmemTokenState, recv: torch.Tensor) -> torch.Tensor:
        out = self._new_output((st.num_tokens, self.hidden), torch.bfloat16)
        return kernels.sum_partials(recv, st.slot, st.tok_send, out, self.config)

    def pack_grads(self, dy: torch.Tensor, st: NvshmemTokenState, send: torch.Tensor) -> None:
        kernels.pack_tokens(dy, st.slot, st.tok_send, send, self.config)

    def expand_grads(self, expert_out: torch.Tensor, st: NvshmemTokenState, recv: torch.Tensor, send: torch.Tensor,
                     align: int) -> torch.Tensor:
        geo = self._new_output((self.capacity, self.hidden), torch.bfloat16)
        return kernels.expand_grads(recv, expert_out, st.recv_rows, st.recv_weights, st.tok_recv,
                                    self.max_tokens_per_rank, st.group_end, st.recv, self.rank, align, geo, send,
                                    self.config)

    def gather_weight_grads(self, st: NvshmemTokenState, recv: torch.Tensor) -> torch.Tensor:
        return kernels.gather_weight_grads(recv, st.slot, st.tok_send, st.pair_owner, st.pair_rows)

    def dispatch_outputs(self, q: torch.Tensor, s: torch.Tensor, st: NvshmemTokenState, dropped: torch.Tensor,
                         route: TokenRoute) -> TokenDispatch:
        L = self.num_experts // self.world_size
        mine = slice(self.rank * L, (self.rank + 1) * L)
        return TokenDispatch(q, s, st.group_end[mine].clone(), st.recv[mine].clone(), dropped, route.errors, st)

    # ================================================================== the Transport contract
    def _exchange(self, send: torch.Tensor, counts: torch.Tensor, recv: torch.Tensor) -> None:
        if self.exchange is None:
            raise RuntimeError("mxep: this NvshmemTransport has no exchange (a simulated rank): run its phases "
                               "through SimulatedNvshmemWorld")
        self.exchange(send, counts, recv)

    def token_state_like(self, t, k, device):
        W, E, S = self.world_size, self.num_experts, self.rows
        i32, f32 = torch.int32, torch.float32
        return NvshmemTokenState.empty_like(
            {"pair_weights": ((t, k), f32), "group_end": ((E,), i32), "recv": ((E,), i32), "tok_send": ((W,), i32),
             "tok_recv": ((W,), i32), "slot": ((t, W), i32), "pair_owner": ((t, k), i32), "pair_rows": ((t, k), i32),
             "recv_rows": ((S, k), i32), "recv_weights": ((S, k), f32)}, device)

    def dispatch_tokens(self, x, topk_idx, topk_weights, scale_mode, align):
        route = self.route(topk_idx)
        send_counts, recv_counts = self.counts_views(self.send_buffer())
        self.put_count_rows(route, send_counts)
        self._exchange(send_counts, self._one_each, recv_counts)
        st, dropped = self.plan_tokens(route, recv_counts.view(torch.int32), topk_weights, align)
        send = self.send_buffer()
        self.pack_tokens(x, st, send, scale_mode)
        self._exchange(send, st.tok_send, self.recv_buffer())
        q, s = self.unpack_tokens(st, self.recv_buffer(), align)
        return self.dispatch_outputs(q, s, st, dropped, route)

    def _reduce_back(self, src, st, weighted):
        send = self.send_buffer()
        self.reduce_rows(src, st, send, weighted)
        self._exchange(send, st.tok_recv, self.recv_buffer())
        return self.sum_partials(st, self.recv_buffer())

    def combine_tokens(self, expert_out, state, align):
        return self._reduce_back(expert_out, state, True)

    def dispatch_tokens_backward(self, grad_tokens, state, align):
        return self._reduce_back(grad_tokens, state, False)

    def combine_tokens_backward(self, dy, expert_out, state, align):
        send = self.send_buffer()
        self.pack_grads(dy, state, send)
        self._exchange(send, state.tok_send, self.recv_buffer())
        back = self.send_buffer()
        grad_expert_out = self.expand_grads(expert_out, state, self.recv_buffer(), back, align)
        self._exchange(back, state.tok_recv, self.recv_buffer())
        return grad_expert_out, self.gather_weight_grads(state, self.recv_buffer())

    # ---- row level: not on this transport
    def _no_rows(self, *args, **kwargs):
        raise RuntimeError("mxep: the NVSHMEM transport serves the token-level API only (Buffer(top_k=k)."
                           "dispatch_tokens / combine_tokens); the row-level dispatch runs on 'symm_mem' or "
                           "'collective'")

    plan = dispatch_mxfp8 = dispatch_bf16 = combine_bf16 = combine_input = _no_rows

    def status(self) -> int:
        # This transport has no device-side error word: its counts come from the routing (valid
        # by construction) and every index is bounded in the kernels; routing errors are counted
        # in routing_errors, which Buffer.check() reads.
        return 0
