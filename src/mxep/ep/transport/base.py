"""The transport protocol: how rows reach other ranks. One subpackage per transport
(:mod:`~mxep.ep.transport.symm_mem`, :mod:`~mxep.ep.transport.collective`); only
:class:`mxep.Buffer` knows which exist. Every transport produces the same bytes (docs/layout.md).

Every method is collective: all ranks call the same methods in the same order on one stream,
and none waits on the GPU from the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mxep.format.mxfp8 import MXFP8Tensor

__all__ = ["Transport", "DispatchHandle", "as_mxfp8", "describe_status", "TIMEOUT_COUNTS", "SEQUENCE_MISMATCH",
           "BAD_COUNTS"]

# Status codes of the device-side error word (OR-ed), shared by every transport.
TIMEOUT_COUNTS = 1          # the plan waited too long for a peer's count row
SEQUENCE_MISMATCH = 2       # a peer's count row belongs to another call (a rank skipped or repeated one)
BAD_COUNTS = 4              # this rank's counts were negative or did not sum to its rows: clamped


def describe_status(status: int) -> str:
    what = []
    if status & TIMEOUT_COUNTS:
        what.append("the dispatch plan waited too long for a peer's counts (a rank did not call dispatch)")
    if status & SEQUENCE_MISMATCH:
        what.append("a peer's counts belong to another dispatch call (the ranks' call sequences differ)")
    if status & BAD_COUNTS:
        what.append("num_tokens_per_expert was negative or did not sum to the rows passed (clamped: rows past "
                    "the clamped counts were not dispatched)")
    if status & ~(TIMEOUT_COUNTS | SEQUENCE_MISMATCH | BAD_COUNTS):
        what.append(f"unknown status bits in {status}")
    return "; ".join(what)




@dataclass(eq=False)
class DispatchHandle:
    """What combine and the backward passes need from one dispatch (regular device tensors: a
    later dispatch on the same Buffer does not invalidate it).

    Attributes:
        transport: the :class:`Transport` that planned it (a handle is refused by any other).
        rank: this rank in the EP group.
        num_rows: ``n``, rows of ``x`` on this rank.
        group_end_offsets: int32 ``[L]`` cumulative padded group ends on this rank.
        tokens_per_expert: int32 ``[L]`` unpadded rows received per local expert.
        state: the transport's own per-call state (opaque to everything else).
        dispatched: its MXFP8 dispatch ran (one per plan).
    """

    transport: "Transport"
    rank: int
    num_rows: int
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    state: Any
    dispatched: bool = False


def as_mxfp8(q: torch.Tensor, s: torch.Tensor) -> MXFP8Tensor:
    """uint8 data ``[cap, H]`` and scales ``[cap, H // 32]`` -> bf16-typed :class:`MXFP8Tensor`."""
    return MXFP8Tensor(q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), torch.bfloat16)


class Transport:
    """Base class of the transports. Shapes: ``n`` rows on this rank, ``H`` hidden, ``cap`` the
    Buffer's capacity (rows of the dispatch layout on every rank)."""

    name = "abstract"

    def plan(self, counts_i32: torch.Tensor, num_rows: int, align: int) -> DispatchHandle:
        """Exchange counts (``[E]`` int32 per rank) and compute where every row goes."""
        raise NotImplementedError

    def dispatch_mxfp8(self, x: torch.Tensor, handle: DispatchHandle, scale_mode: str,
                       zero_copy: bool = False) -> MXFP8Tensor:
        """Quantize and move rows ``[n, H]`` -> ``[cap, H]`` MXFP8, expert-major, pad rows zero.
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

    def status(self) -> int:
        """The device-side error word of this rank (0: fine, else codes above; host sync: debug
        mode and ``Buffer.check()`` only)."""
        raise NotImplementedError

