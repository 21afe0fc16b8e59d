"""A simulated EP world: every rank's communication memory in one process.

Runs the *same* kernels and phases as :class:`~mxep.comm.transport.SymmMemTransport`, with the
barriers replaced by phase order (all ranks finish phase k before any starts phase k+1). With
``TUNING["sync"] == "flags"`` the signal words are real: the plan kernel runs as its two halves
(counts out to every rank, then wait + plan), and every copy-out checks the push flags
(``"counts_flags"``: the plan's two halves, then the barrier's phase order). On CPU
under ``TRITON_INTERPRET=1`` or on one GPU, it tests the fused kernels' peer stores, offsets and
padding without a multi-GPU machine.

Example::

    >>> world = SimulatedWorld(world_size=3, num_experts=6, hidden=64, max_tokens_per_rank=16)
    >>> out = world.dispatch(xs, counts)          # xs[r]: bf16 [n_r, 64], counts[r]: [6]
    >>> out[r].tokens.qdata.shape                 # [capacity, 64] on every rank
"""
from __future__ import annotations

from typing import Sequence

import torch

from mxep.comm.buffer import DispatchResult
from mxep.comm.layout import capacity_rows
from mxep.comm.peer_memory import PeerMemory, RegionLayout
from mxep.comm.transport import DispatchHandle, as_mxfp8
from mxep.kernels.rows import COUNTS_BY_FLAGS, TUNING

__all__ = ["SimulatedWorld"]

POISON = 0xA5


class SimulatedWorld:
    """``world_size`` ranks' buffers in one process (same arguments as :class:`mxep.Buffer`)."""

    def __init__(self, world_size: int, num_experts: int, hidden: int, max_tokens_per_rank: int,
                 align: int = 32, scale_mode: str = "rceil", device: torch.device | str = "cpu"):
        if num_experts % world_size or hidden % 32:
            raise ValueError("num_experts must be a multiple of world_size and hidden of 32")
        self.world_size, self.num_experts, self.hidden = world_size, num_experts, hidden
        self.max_tokens_per_rank, self.align, self.scale_mode = max_tokens_per_rank, align, scale_mode
        self.capacity = capacity_rows(world_size, num_experts // world_size, max_tokens_per_rank, align)
        regions = RegionLayout(world_size, num_experts, hidden, max_tokens_per_rank, self.capacity)
        mems = [torch.full((regions.total_bytes,), POISON, dtype=torch.uint8, device=device) for _ in range(world_size)]
        addrs = [m.data_ptr() for m in mems]
        self.peers = [PeerMemory(m, addrs, r, regions) for r, m in enumerate(mems)]
        for p in self.peers:
            p.clear_signals()

    def plan(self, counts: Sequence[torch.Tensor], num_rows: Sequence[int]) -> list[DispatchHandle]:
        counts = [c.to(torch.int32).contiguous() for c in counts]
        sync = TUNING["sync"]
        if sync in COUNTS_BY_FLAGS:   # the plan kernel's two halves, one phase on every rank at a time
            for r, p in enumerate(self.peers):
                p.exchange_and_plan(counts[r], self.align, "put")
            return [DispatchHandle(r, num_rows[r], plan=p.exchange_and_plan(counts[r], self.align, "plan"),
                                   sync=sync) for r, p in enumerate(self.peers)]
        for r, p in enumerate(self.peers):
            p.put_counts(counts[r])
        # ---- barrier ----
        return [DispatchHandle(r, num_rows[r], plan=p.plan(self.align)) for r, p in enumerate(self.peers)]

    def dispatch(self, xs: Sequence[torch.Tensor], counts: Sequence[torch.Tensor],
                 zero_copy: bool = False) -> list[DispatchResult]:
        """Fused MXFP8 dispatch on every rank: ``xs[r]`` bf16 ``[n_r, H]``, ``counts[r]`` ``[E]``.
        ``zero_copy``: every rank's tokens are its receive region (no copy-out)."""
        handles = self.plan(counts, [x.shape[0] for x in xs])
        flags = handles[0].sync == "flags"   # push flags instead of the barrier
        outs = [p.push_mxfp8(xs[r].contiguous(), h.plan, self.scale_mode, signal=flags, into_region=zero_copy)
                for r, (p, h) in enumerate(zip(self.peers, handles))]
        # ---- barrier (or: each copy-out / wait kernel waits for the other ranks' push flags) ----
        out = []
        for p, h, o in zip(self.peers, handles, outs):
            if zero_copy:
                if flags:
                    p.wait_pushes()
                tokens = as_mxfp8(*o)
            else:
                tokens = as_mxfp8(*p.copy_out_mxfp8(h.plan, o, wait=flags))
            out.append(DispatchResult(tokens, h.group_end_offsets, h.tokens_per_expert, h))
        return out

    def dispatch_bf16(self, srcs: Sequence[torch.Tensor], handles: Sequence[DispatchHandle]) -> list[torch.Tensor]:
        """bf16 rows into the dispatch layout (what the combine's backward does)."""
        outs = [p.push_bf16_dispatch(srcs[r].contiguous(), h.plan) for r, (p, h) in enumerate(zip(self.peers, handles))]
        # ---- barrier ----
        return [p.copy_out_bf16_dispatch(h.plan, o) for p, h, o in zip(self.peers, handles, outs)]

    def combine_inputs(self) -> list[torch.Tensor]:
        """Every rank's zero-copy combine input (bf16 ``[capacity, H]``, see ``Buffer.combine_input``)."""
        return [p.combine_input for p in self.peers]

    def combine(self, expert_outs: Sequence[torch.Tensor], handles: Sequence[DispatchHandle],
                mode: str = "push") -> list[torch.Tensor]:
        """Rows of each rank's dispatch layout ``[capacity, H]`` back to their sources.

        ``mode``: ``"push"`` (owners store into the sources' regions, sources copy out) or
        ``"pull"`` (owners stage into their own region unless ``expert_outs[r]`` is already
        :meth:`combine_inputs` ``[r]``, then sources read). Same bytes either way."""
        if mode == "push":
            flags = TUNING["sync"] == "flags"   # free / completion flags instead of the barriers
            outs = [p.push_bf16_combine(expert_outs[r].contiguous(), h.plan, h.num_rows, signal=flags)
                    for r, (p, h) in enumerate(zip(self.peers, handles))]
            # ---- barrier (or: each copy-out waits for the owners' completion flags) ----
            return [p.copy_out_combine(h.plan, o, signal=flags) for p, h, o in zip(self.peers, handles, outs)]
        if mode != "pull":
            raise ValueError(f"mode must be 'push' or 'pull', got {mode!r}")
        for r, (p, h) in enumerate(zip(self.peers, handles)):
            if not p.is_combine_input(expert_outs[r]):
                p.stage_combine_input(expert_outs[r].contiguous(), h.plan)
        # ---- barrier ----
        return [p.pull_combine(h.plan, h.num_rows) for p, h in zip(self.peers, handles)]
