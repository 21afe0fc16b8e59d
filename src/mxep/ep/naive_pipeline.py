"""The UNFUSED expert-parallel MXFP8 (and bf16) dispatch / combine: today's training flow.

This is the baseline the fused path replaces, written with ``torch.distributed`` only, so it
runs on gloo (CPU) and NCCL (GPU) at any world size, including 1. Its output follows the
layout contract of docs/layout.md exactly (tests check it against mxep.ep.naive).

Dispatch, step by step (torchao main / torchtitan MXFP8 EP)::

    counts [E] --all_to_all--> received counts [W, L]       (tiny collective)
    .tolist() of both                                        (device-to-host sync)
    to_mxfp8(x)                                              (quantize, rank-local)
    all_to_all_single(qdata), all_to_all_single(scale)       (variable splits, rank-major output)
    index_select with a permute index                        (the "permute kernel": regroup
                                                              expert-major + pad; an extra full
                                                              read and write of the data)

Combine is the reverse: index_select drops the pad rows and restores rank-major order, then
all_to_all_single with the splits swapped. Forward only (no autograd through the collectives).

Example (inside an initialized process group; W ranks, E experts)::

    res = unfused_dispatch_mxfp8(x, counts)          # x bf16 [n, H] sorted by expert, counts [E]
    h = grouped_gemm(res.tokens.dequantize(), w, offs=res.group_end_offsets)
    y = unfused_combine(h, res.handle)               # [n, H], rows in x's order
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from mxep.format.mxfp8 import MXFP8Tensor, to_mxfp8
from mxep.format.spec import BLOCK_SIZE, check_scale_mode

__all__ = [
    "UnfusedHandle",
    "UnfusedDispatchResult",
    "unfused_dispatch_mxfp8",
    "unfused_dispatch_bf16",
    "unfused_combine",
]


@dataclass
class UnfusedHandle:
    """What combine needs to undo a dispatch.

    Attributes:
        input_splits: rows this rank sent to each rank in dispatch (host ints, length W).
        output_splits: rows this rank received from each rank in dispatch (host ints, length W).
        dest_rows: int64 [N_recv]; expert-major output row of each received (rank-major) row.
        num_rows: n, rows of the dispatched ``x`` (= rows combine returns).
        num_padded_rows: R, rows of the dispatch output (= rows combine expects).
        group: the process group used (None: the default group).
    """

    input_splits: list[int]
    output_splits: list[int]
    dest_rows: torch.Tensor
    num_rows: int
    num_padded_rows: int
    group: Optional[dist.ProcessGroup] = None


@dataclass
class UnfusedDispatchResult:
    """Dispatch output on this rank (layout per docs/layout.md).

    Attributes:
        tokens: [R, H]; an :class:`MXFP8Tensor` (mxfp8 path) or a bf16 tensor (bf16 path).
            Expert-major, every local expert's group padded; pad rows are zero bytes.
        group_end_offsets: int32 [L], cumulative padded group ends (``torch._grouped_mm`` offs).
        tokens_per_expert: int32 [L], unpadded rows received per local expert.
        handle: pass to :func:`unfused_combine`.
    """

    tokens: Union[MXFP8Tensor, torch.Tensor]
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: UnfusedHandle


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------

def _world_size(group) -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    if group is not None:
        raise RuntimeError("a process group was given but torch.distributed is not initialized")
    return 1  # no process group: a single rank, collectives become local copies


def _validate(x: torch.Tensor, counts: torch.Tensor, world: int, align: int) -> int:
    """Shape/dtype checks (no device sync). Returns L, the local expert count."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [num_rows, hidden], got {getattr(x, 'shape', type(x))}")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bfloat16, got {x.dtype}")
    if x.shape[1] % BLOCK_SIZE != 0:
        raise ValueError(f"hidden size must be a multiple of {BLOCK_SIZE}, got {x.shape[1]}")
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
        raise ValueError(f"num_tokens_per_expert must be a 1-D tensor [E], got {getattr(counts, 'shape', type(counts))}")
    if counts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"num_tokens_per_expert must be int32 or int64, got {counts.dtype}")
    if counts.device != x.device:
        raise ValueError(f"num_tokens_per_expert is on {counts.device} but x is on {x.device}")
    num_experts = counts.shape[0]
    if num_experts == 0 or num_experts % world != 0:
        raise ValueError(f"number of experts ({num_experts}) must be a positive multiple of the world size ({world})")
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive int, got {align!r}")
    return num_experts // world


def _exchange_counts(counts: torch.Tensor, world: int, local: int, num_rows: int, group):
    """all_to_all the per-expert counts, then read the splits on the host.

    Returns (recv_counts int64 [W, L] on the device, input_splits, output_splits, recv_host [W][L]).
    ``recv_counts[s, e]`` = rows source rank s sends to my local expert e.
    """
    send = counts.to(torch.int64).view(world, local).contiguous()
    recv = torch.empty_like(send)
    if world == 1 and not dist.is_initialized():
        recv.copy_(send)
    else:
        dist.all_to_all_single(recv, send, group=group)
    # host sync: the cost the fused path removes
    send_host = send.tolist()
    # host sync: the cost the fused path removes
    recv_host = recv.tolist()
    if any(c < 0 for row in send_host for c in row):
        raise ValueError("num_tokens_per_expert must be non-negative")
    if sum(map(sum, send_host)) != num_rows:
        raise ValueError(f"num_tokens_per_expert sums to {sum(map(sum, send_host))} but x has {num_rows} rows")
    input_splits = [sum(row) for row in send_host]
    output_splits = [sum(row) for row in recv_host]
    return recv, input_splits, output_splits, recv_host


def _padded_sizes(received_per_expert: list[int], align: int) -> list[int]:
    return [max(-(-c // align) * align, align) for c in received_per_expert]


@dataclass
class _Permutation:
    gather_index: torch.Tensor  # int64 [R]: received row feeding each output row; N_recv (zero row) for pads
    dest_rows: torch.Tensor  # int64 [N_recv]: output row of each received row
    group_end_offsets: torch.Tensor  # int32 [L]
    tokens_per_expert: torch.Tensor  # int32 [L]


def _build_permutation(recv_counts: torch.Tensor, num_recv: int, num_padded: int, align: int) -> _Permutation:
    """Rank-major received rows -> expert-major padded rows, as index tensors (device ops only).

    The received buffer holds blocks (s, e) in order s-major: all of source 0's rows (its local
    experts 0..L-1 in order), then source 1, ... Output: expert-major, within an expert source
    0 first, every group padded to max(round_up(c, align), align) (docs/layout.md).
    ``num_recv`` / ``num_padded`` are host ints derived from the already-synced counts.
    """
    world, local = recv_counts.shape
    dev = recv_counts.device
    tokens = recv_counts.sum(0)  # [L]
    padded = torch.clamp((tokens + align - 1) // align * align, min=align)
    ends = torch.cumsum(padded, 0)
    group_start = ends - padded
    dest_start = group_start.unsqueeze(0) + (torch.cumsum(recv_counts, 0) - recv_counts)  # [W, L]
    flat = recv_counts.flatten()
    src_start = torch.cumsum(flat, 0) - flat  # start of block (s, e) in the receive buffer
    block = torch.repeat_interleave(torch.arange(world * local, device=dev), flat, output_size=num_recv)
    row = torch.arange(num_recv, device=dev)
    dest_rows = dest_start.flatten()[block] + (row - src_start[block])
    gather_index = torch.full((num_padded,), num_recv, dtype=torch.int64, device=dev)
    gather_index[dest_rows] = row
    return _Permutation(gather_index, dest_rows, ends.to(torch.int32), tokens.to(torch.int32))


def _all_to_all_rows(send: torch.Tensor, input_splits: list[int], output_splits: list[int], group,
                     extra_zero_rows: int = 0) -> torch.Tensor:
    """Variable-split all_to_all_single along dim 0.

    Returns ``[sum(output_splits) + extra_zero_rows, ...]``: received rows (rank-major) followed by
    zeroed rows (the gather source for pad rows). 1-byte float types (fp8 data, e8m0 scales) travel
    as uint8: gloo refuses float8 dtypes ("Invalid scalar type"); NCCL does not care.
    """
    one_byte = send.element_size() == 1 and send.dtype != torch.uint8
    wire = send.view(torch.uint8) if one_byte else send
    num_recv = sum(output_splits)
    buf = torch.empty((num_recv + extra_zero_rows, *wire.shape[1:]), dtype=wire.dtype, device=wire.device)
    if extra_zero_rows:
        buf[num_recv:].zero_()
    recv = buf[:num_recv]  # a contiguous prefix: collectives write into it in place
    if len(input_splits) == 1 and not dist.is_initialized():
        recv.copy_(wire)
    else:
        dist.all_to_all_single(recv, wire.contiguous(), output_splits, input_splits, group=group)
    return buf.view(send.dtype) if one_byte else buf


def _dispatch(x: torch.Tensor, counts: torch.Tensor, group, align: int, quantize: Optional[str]):
    world = _world_size(group)
    local = _validate(x, counts, world, align)
    if quantize is not None:
        check_scale_mode(quantize)
    recv_counts, input_splits, output_splits, recv_host = _exchange_counts(counts, world, local, x.shape[0], group)
    num_recv = sum(output_splits)
    num_padded = sum(_padded_sizes([sum(col) for col in zip(*recv_host)], align))
    perm = _build_permutation(recv_counts, num_recv, num_padded, align)

    if quantize is None:
        recv = _all_to_all_rows(x.contiguous(), input_splits, output_splits, group, extra_zero_rows=1)
        tokens = recv.index_select(0, perm.gather_index)  # permute + pad: one gather pass
    else:
        q = to_mxfp8(x.contiguous(), quantize)
        recv_q = _all_to_all_rows(q.qdata, input_splits, output_splits, group, extra_zero_rows=1)
        recv_s = _all_to_all_rows(q.scale, input_splits, output_splits, group, extra_zero_rows=1)
        # permute + pad: one gather pass per tensor (on uint8 views: index ops on fp8 are patchy)
        qdata = recv_q.view(torch.uint8).index_select(0, perm.gather_index).view(torch.float8_e4m3fn)
        scale = recv_s.view(torch.uint8).index_select(0, perm.gather_index).view(torch.float8_e8m0fnu)
        tokens = MXFP8Tensor(qdata, scale, x.dtype)

    handle = UnfusedHandle(input_splits, output_splits, perm.dest_rows, x.shape[0], num_padded, group)
    return UnfusedDispatchResult(tokens, perm.group_end_offsets, perm.tokens_per_expert, handle)


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------

def unfused_dispatch_mxfp8(x: torch.Tensor, num_tokens_per_expert: torch.Tensor, group=None, align: int = 32,
                           scale_mode: str = "rceil") -> UnfusedDispatchResult:
    """Quantize to MXFP8, all_to_all, permute into the padded expert-major layout (docs/layout.md).

    Args:
        x: bf16 [n, H], rows sorted by global expert id; H % 32 == 0; n may be 0.
        num_tokens_per_expert: int32/int64 [E] on x's device; rows of x per global expert.
        group: process group (None: default group; torch.distributed uninitialized: world size 1).
        align: group padding multiple (32 for MXFP8 1x32 blocks along M; 128 for some kernels).
        scale_mode: "rceil" (training recipe) or "floor"; see mxep.format.mxfp8.

    Returns:
        UnfusedDispatchResult with ``tokens`` an MXFP8Tensor [R, H] (scale e8m0 [R, H // 32]).
    """
    return _dispatch(x, num_tokens_per_expert, group, align, quantize=scale_mode)


def unfused_dispatch_bf16(x: torch.Tensor, num_tokens_per_expert: torch.Tensor, group=None,
                          align: int = 8) -> UnfusedDispatchResult:
    """The bf16 EP flow: all_to_all of bf16 rows + permute/pad, no quantization (benchmark baseline).

    Same arguments and layout as :func:`unfused_dispatch_mxfp8` (``align`` defaults to 8, the
    bf16 convention; pass 32 to compare layouts with the MXFP8 path). ``tokens`` is bf16 [R, H].
    """
    return _dispatch(x, num_tokens_per_expert, group, align, quantize=None)


def unfused_combine(expert_out: torch.Tensor, handle: UnfusedHandle, group=None) -> torch.Tensor:
    """Reverse of dispatch: drop pad rows, undo the permute, all_to_all back -> [n, H] in x's order.

    ``expert_out`` is [R, H] (typically bf16) in the dispatch output layout; its pad rows are never
    read. ``group`` defaults to the group the dispatch used.
    """
    if not isinstance(expert_out, torch.Tensor) or expert_out.dim() != 2:
        raise ValueError(f"expert_out must be a 2-D tensor [R, H], got {getattr(expert_out, 'shape', type(expert_out))}")
    if expert_out.shape[0] != handle.num_padded_rows:
        raise ValueError(f"expert_out has {expert_out.shape[0]} rows, the dispatch produced {handle.num_padded_rows}")
    if isinstance(expert_out, MXFP8Tensor):
        expert_out = expert_out.dequantize()
    group = handle.group if group is None else group
    send = expert_out.index_select(0, handle.dest_rows)  # unpermute: rank-major, pad rows dropped
    # Reverse exchange: what I received from rank s goes back to rank s.
    return _all_to_all_rows(send, handle.output_splits, handle.input_splits, group)
