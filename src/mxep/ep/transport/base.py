"""The transport contract: how rows and tokens reach other ranks. One subpackage per transport
(:mod:`~mxep.ep.transport.symm_mem`, :mod:`~mxep.ep.transport.nvshmem`,
:mod:`~mxep.ep.transport.collective`), each a subclass of
:class:`Transport` implementing every method below; only :class:`mxep.Buffer` knows which exist.
Every transport produces the same bytes (docs/layout.md) and the same combine bits.

What every method may assume (the Buffer checks it on the host before calling):

* all ranks of the group call the same methods in the same order on one stream (every method is
  collective), and none waits on the GPU from the host;
* tensors are contiguous, on the Buffer's device, with the shapes and dtypes given here:
  ``n <= N`` rows (row level) or ``t <= T`` tokens (token level) on this rank, ``H`` hidden,
  ``E`` experts, ``W`` ranks, ``L = E // W`` local experts, ``k`` top-k, ``cap`` the Buffer's
  capacity (rows of the dispatch layout on every rank);
* values the host cannot check without a sync (counts, expert ids) may be anything: a transport
  clamps them on the device so that no kernel touches memory outside its tensors, and records
  what it clamped in its error word (:meth:`Transport.status`, ``Buffer.check()``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch

from mxep.format.mxfp8 import MXFP8Tensor

__all__ = ["Transport", "DispatchHandle", "TokenState", "token_state", "TokenDispatch", "as_mxfp8", "describe_status",
           "describe_routing_errors", "TIMEOUT_COUNTS", "SEQUENCE_MISMATCH", "BAD_COUNTS"]

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




def describe_routing_errors(bad_ids: int, duplicate_ids: int) -> str:
    what = []
    if bad_ids:
        what.append(f"{bad_ids} topk_idx entries were neither -1 nor an expert id in [0, num_experts) (they "
                    "were treated as -1: not dispatched, no output, no gradient)")
    if duplicate_ids:
        what.append(f"{duplicate_ids} topk_idx entries repeated an expert already chosen earlier in the same "
                    "token's row (expert ids must be distinct within a row; each copy was dispatched)")
    return "; ".join(what)


@dataclass(eq=False)
class DispatchHandle:
    """What combine and the backward passes need from one dispatch.

    Lifetime, the same on every transport: a handle is valid for :meth:`mxep.Buffer.combine` /
    :meth:`mxep.Buffer.combine_tokens` until the next dispatch on the same Buffer (the
    symmetric-memory transport reuses the Buffer's memory for every call); a stale handle is
    refused on the host (``generation``). Autograd's backward passes keep their own copy of the
    state they need and are not bound by this.

    Attributes:
        transport: the :class:`Transport` that planned it (a handle is refused by any other).
        rank: this rank in the EP group.
        num_rows: ``n``, rows of ``x`` on this rank (token level: tokens ``t``).
        group_end_offsets: int32 ``[L]`` cumulative padded group ends on this rank.
        tokens_per_expert: int32 ``[L]`` unpadded rows received per local expert.
        state: the transport's own per-call state (row level: opaque; token level: its
            :class:`TokenState`).
        dispatched: its MXFP8 dispatch ran (one per plan).
        generation: the Buffer's dispatch count when it was made (0: not from a Buffer).
    """

    transport: "Transport"
    rank: int
    num_rows: int
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    state: Any
    dispatched: bool = False
    generation: int = 0


def token_state(cls):
    """Class decorator of a :class:`TokenState` subclass: a dataclass (by identity), plus its
    field names as a constant tuple (``torch.compile`` traces :meth:`TokenState.as_list` /
    :meth:`TokenState.from_list` through it; it cannot trace ``dataclasses.fields``)."""
    cls = dataclass(eq=False)(cls)
    cls.field_names = tuple(f.name for f in fields(cls))
    return cls


@token_state
class TokenState:
    """Base of a transport's per-call state of one token-level dispatch: a dataclass whose fields
    are all tensors, so that the Buffer's registered ops can pass it through ``torch.compile``
    graphs as a list (:meth:`as_list` / :meth:`from_list`; the field order is the list order).
    Every transport's state has ``pair_weights`` fp32 ``[t, k]`` (the gate weights as
    dispatched); the rest is the transport's own."""

    pair_weights: torch.Tensor

    field_names: ClassVar[tuple[str, ...]]   # set by @token_state

    def as_list(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.field_names]

    @classmethod
    def from_list(cls, tensors) -> "TokenState":
        if len(tensors) != len(cls.field_names):
            raise ValueError(f"{cls.__name__} has {len(cls.field_names)} tensors ({', '.join(cls.field_names)}), "
                             f"got {len(tensors)}")
        return cls(*tensors)

    @classmethod
    def empty_like(cls, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device) -> "TokenState":
        """Uninitialized tensors of the given ``{field: (shape, dtype)}`` (the ops' fake
        implementations; every field must be given)."""
        return cls(*(torch.empty(shapes[n][0], dtype=shapes[n][1], device=device) for n in cls.field_names))

    @property
    def num_tokens(self) -> int:
        return self.pair_weights.shape[0]


class TokenDispatch(NamedTuple):
    """What :meth:`Transport.dispatch_tokens` returns (all on the device, no host sync).

    Attributes:
        qdata: uint8 or float8_e4m3fn ``[cap, H]`` the MXFP8 tokens, expert-major, padded.
        scale: uint8 or float8_e8m0fnu ``[cap, H // 32]`` their scales.
        group_end_offsets: int32 ``[L]`` (a tensor of its own, not a view of the state).
        tokens_per_expert: int32 ``[L]``.
        num_dropped: int64 ``[]`` this rank's (token, expert) pairs that the expert capacity dropped.
        routing_errors: int32 ``[2]`` this call's ``topk_idx`` entries that were out of range
            (neither ``-1`` nor in ``[0, E)``) and that repeated an earlier expert of their row.
        state: the transport's :class:`TokenState`.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_dropped: torch.Tensor
    routing_errors: torch.Tensor
    state: TokenState


def as_mxfp8(q: torch.Tensor, s: torch.Tensor, scale_layout: str = "row_major") -> MXFP8Tensor:
    """uint8 data ``[cap, H]`` and scales ``[cap, H // 32]`` (in ``scale_layout``) -> bf16-typed
    :class:`MXFP8Tensor`."""
    return MXFP8Tensor(q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), torch.bfloat16,
                       scale_layout=scale_layout)


class Transport:
    """Base class of the transports: every method a transport provides, with what it takes and
    returns (see the module docstring for what it may assume). A new transport subclasses this,
    implements every method, and passes the transport-parametrized tests (tests/ep)."""

    name = "abstract"
    #: the :class:`TokenState` subclass of this transport's token-level calls
    token_state_type: type[TokenState] = TokenState
    #: the layout of the scales that :meth:`dispatch_mxfp8` and :meth:`dispatch_tokens` return
    #: (fixed at construction): ``"row_major"`` ``[cap, H // 32]``, or ``"blocked"``
    #: (:mod:`mxep.format.blocked`: the same ``[cap, H // 32]`` bytes in sm_100's tiles of
    #: 128 rows x 4 scales; ``cap % 128 == 0``, ``H % 128 == 0`` and every group a multiple of
    #: 128 rows, so rows ``[0, group_end_offsets[-1])`` are byte for byte torchao's
    #: ``torch_to_blocked_2d_M_groups`` of the row-major scales; the rest is undefined)
    scale_layout: str = "row_major"

    def __init__(self, routing_errors: torch.Tensor):
        #: int32 ``[2]`` on the device, since construction: ``topk_idx`` entries out of range and
        #: repeated within a row (the routing kernels add to it; ``Buffer.check()`` reads it)
        self.routing_errors = routing_errors

    # ---- row level: rows already expanded and sorted by expert ----------------------------
    def plan(self, counts_i32: torch.Tensor, num_rows: int, align: int) -> DispatchHandle:
        """Exchange the counts (int32 ``[E]``: rows of this rank per global expert, may be bad:
        clamped to describe ``num_rows`` rows, and recorded) and compute where every row goes.
        Returns a handle whose ``group_end_offsets`` / ``tokens_per_expert`` are final."""
        raise NotImplementedError

    def dispatch_mxfp8(self, x: torch.Tensor, handle: DispatchHandle, scale_mode: str,
                       zero_copy: bool = False) -> MXFP8Tensor:
        """Quantize and move bf16 rows ``[n, H]`` -> MXFP8 ``[cap, H]``, expert-major, pad rows
        zero (docs/layout.md). ``zero_copy``: the result may alias the transport's memory
        (valid until the next dispatch, see ``Buffer.dispatch``)."""
        raise NotImplementedError

    def dispatch_bf16(self, src: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Move bf16 rows ``[n, H]`` into the dispatch layout -> bf16 ``[cap, H]``, pad rows zero
        (the combine's backward)."""
        raise NotImplementedError

    def combine_bf16(self, src: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Move bf16 rows of the dispatch layout ``[cap, H]`` back to their sources -> ``[n, H]``,
        a bit-exact copy of each row (pad rows never read)."""
        raise NotImplementedError

    def combine_input(self) -> torch.Tensor:
        """bf16 ``[cap, H]`` that :meth:`combine_bf16` can read without a staging copy."""
        raise NotImplementedError

    # ---- token level: tokens with their top-k expert ids ------------------------------------
    def token_state_like(self, t: int, k: int, device) -> TokenState:
        """A :class:`TokenState` of uninitialized tensors, shaped as :meth:`dispatch_tokens`
        makes it for ``t`` tokens of top-``k`` (the registered ops' fake implementations)."""
        raise NotImplementedError

    def dispatch_tokens(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        scale_mode: str, align: int) -> TokenDispatch:
        """``x`` bf16 ``[t, H]``, ``topk_idx`` int32/int64 ``[t, k]`` (``-1``: none; other values
        outside ``[0, E)`` are treated as ``-1`` and counted), ``topk_weights`` float ``[t, k]``
        -> :class:`TokenDispatch`: every token quantized once and, on each owner, written into
        each of its experts' rows (the row-level dispatch of the stably expert-sorted
        expansion, bit for bit); ``capacity_factor`` drops as the Buffer's ``expert_capacity``
        says. Adds this call's routing errors to :attr:`routing_errors`."""
        raise NotImplementedError

    def combine_tokens(self, expert_out: torch.Tensor, state: TokenState, align: int) -> torch.Tensor:
        """bf16 ``[cap, H]`` in the dispatch's layout -> bf16 ``[t, H]``: ``y[t]`` = per owner
        rank, the fp32 sum over the token's experts there of ``pair_weight * row`` in top-k slot
        order, rounded to bf16; then those partials summed in fp32 in rank order, bf16."""
        raise NotImplementedError

    def dispatch_tokens_backward(self, grad_tokens: torch.Tensor, state: TokenState, align: int) -> torch.Tensor:
        """The dispatch's backward: bf16 ``[cap, H]`` gradient of the tokens -> bf16 ``[t, H]``,
        the unweighted two-level sum of :meth:`combine_tokens`."""
        raise NotImplementedError

    def combine_tokens_backward(self, dy: torch.Tensor, expert_out: torch.Tensor, state: TokenState,
                                align: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The combine's backward: ``dy`` bf16 ``[t, H]`` -> ``(grad_expert_out bf16 [cap, H]``
        with ``pair_weight * dy[t]`` (rounded to bf16) at each pair's row, pad rows zero, ``grad
        of pair_weights fp32 [t, k]`` = ``<dy[t], expert_out[row]>``, 0 for ``-1`` and dropped
        pairs)."""
        raise NotImplementedError

    # ---- diagnostics -------------------------------------------------------------------------
    def status(self) -> int:
        """The device-side error word of this rank (0: fine, else the codes above; a host
        sync: debug mode and ``Buffer.check()`` only)."""
        raise NotImplementedError
