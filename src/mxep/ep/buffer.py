"""``mxep.Buffer``: the stateful object that owns the communication memory of one EP group
(its transport), checks every call on the host, and exposes the dispatch and combine at both
levels; the autograd Functions and registered ops behind them are in :mod:`mxep.ep.ops`.
"""
from __future__ import annotations

import math
import socket
from typing import NamedTuple

import torch
import torch.distributed as dist

from mxep.ep.config import EPConfig, default_config
from mxep._utils import check_size, has_mx_tensor_cores, padded_group_rows
from mxep.ep.layout import capacity_rows, check_blocked_settings, layout_capacity
from mxep.ep.ops import CombineRows, CombineTokens, DispatchRows, DispatchTokens, register_buffer
from mxep.ep.transport.base import DispatchHandle, Transport, describe_routing_errors, describe_status
from mxep.ep.transport.collective import CollectiveTransport
from mxep.ep.transport.nvshmem import NvshmemTransport, make_exchange, nvshmem_available
from mxep.ep.transport.symm_mem import RegionLayout, SymmMemTransport
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.blocked import SCALE_LAYOUTS
from mxep.format.spec import BLOCK_SIZE, SCALE_MODES, check_scale_mode

__all__ = ["Buffer", "DispatchHandle", "DispatchResult", "a2a_dispatch_and_group_mxfp8_fwd_hp_bwd",
           "resolve_scale_layout", "select_transport"]

TRANSPORTS = ("symm_mem", "collective", "nvshmem")   # (indices travel in the cross-rank settings check)


def select_transport(requested: str, backend: str, device_type: str, num_nodes: int | None,
                     nvshmem_ok: bool) -> tuple[str, str]:
    """The Buffer's transport and the reason, from what it was asked for and where it runs.

    ``"auto"``: on an NCCL group of CUDA devices, ``"symm_mem"`` when every rank is on one node
    (``num_nodes == 1``: NVLink peers), ``"nvshmem"`` when the group spans nodes and PyTorch's
    NVSHMEM backend is available (``nvshmem_ok``), else ``"collective"``; anywhere else (gloo, CPU)
    ``"collective"``. A named transport is taken as asked (the Buffer checks that it can run)."""
    if requested != "auto":
        if requested not in TRANSPORTS:
            raise ValueError(f"transport must be 'auto', {', '.join(repr(t) for t in TRANSPORTS)}; got {requested!r}")
        return requested, "requested"
    if backend != "nccl" or device_type != "cuda":
        return "collective", f"a {backend} group of {device_type} tensors (no GPU peer memory)"
    if num_nodes == 1:
        return "symm_mem", "every rank of the group is on one node (NVLink peers)"
    if nvshmem_ok:
        return "nvshmem", f"the group spans {num_nodes} nodes and PyTorch's NVSHMEM backend is available"
    return "collective", f"the group spans {num_nodes} nodes and PyTorch's NVSHMEM backend is not available"


def _hostname() -> str:
    return socket.gethostname()


def group_nodes(group) -> int:
    """Distinct hosts among the group's ranks (one small all-gather of host names; collective,
    construction-only)."""
    names = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, _hostname(), group=group)   # construction-only
    return len(set(names))


def resolve_scale_layout(scale_layout: str, align: int | None, hidden: int,
                         device: torch.device) -> tuple[str, int]:
    """The Buffer's ``(scale_layout, align)`` from its arguments (see :class:`Buffer`):

    * ``"row_major"``: ``align`` or 32;
    * ``"blocked"``: ``align`` or 128; ``align % 128 == 0`` and ``hidden % 128 == 0`` or a ValueError;
    * ``"auto"``: ``"blocked"`` with ``align`` or 128 on sm_100 where ``hidden % 128 == 0`` and
      the ``align`` passed (if any) is a multiple of 128, else ``"row_major"`` with ``align`` or 32
      (on the CPU and on Hopper: always row-major).
    """
    if scale_layout not in ("auto", *SCALE_LAYOUTS):
        raise ValueError(f"scale_layout must be 'auto', 'row_major' or 'blocked', got {scale_layout!r}")
    if scale_layout == "auto":
        fits = hidden % 128 == 0 and (align is None or align % 128 == 0)
        scale_layout = "blocked" if fits and has_mx_tensor_cores(device) else "row_major"
    if align is None:
        align = 128 if scale_layout == "blocked" else 32
    align = check_size("align", align, 1)
    check_blocked_settings(scale_layout, hidden, align)
    return scale_layout, align


class DispatchResult(NamedTuple):
    """Output of :meth:`Buffer.dispatch`.

    Attributes:
        tokens: :class:`MXFP8Tensor` ``[capacity, H]`` (``.qdata`` float8_e4m3fn, ``.scale``
            float8_e8m0fnu ``[capacity, H // 32]``, ``.scale_layout`` the Buffer's), expert-major
            and padded per docs/layout.md in rows ``[0, group_end_offsets[-1])``; later rows are
            undefined. With ``scale_layout="blocked"`` the scale bytes of those rows are in
            sm_100's blocked layout (docs/layout.md, "Blocked scales"): torchao's
            ``torch_to_blocked_2d_M_groups(row_major_scale, group_end_offsets)[0]`` in its first
            ``group_end_offsets[-1]`` rows, bit for bit; hand them to the GEMM as swizzled scales. Presents to autograd
            as bf16: ``tokens.dequantize()`` is differentiable back to ``x`` in bf16.
        group_end_offsets: int32 ``[E // W]`` cumulative padded group ends (``torch._grouped_mm``
            ``offs``).
        tokens_per_expert: int32 ``[E // W]`` unpadded received rows per local expert.
        handle: :class:`DispatchHandle` for :meth:`Buffer.combine`.
        num_dropped: int64 ``[]`` on the device (token-level dispatch): (token, expert) pairs of
            this rank that ``capacity_factor`` dropped (0 without one); None for the row level.
        routing_errors: int32 ``[2]`` on the device (token-level dispatch): this call's
            ``topk_idx`` entries that were neither ``-1`` nor an expert id (treated as ``-1``),
            and entries repeating an expert earlier in their row (each copy dispatched). Both
            must be 0; :meth:`Buffer.check` raises on either (``debug=True``: after the call).
            None for the row level.
    """

    tokens: MXFP8Tensor
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: DispatchHandle
    num_dropped: torch.Tensor | None = None
    routing_errors: torch.Tensor | None = None

    def torchao_tokens(self):
        """``tokens`` as torchao's ``MXTensor`` ``[capacity, H]`` (the same e4m3 bytes and
        row-major e8m0 scales, no copy), e.g. for torchao's MXFP8 grouped GEMM with
        ``offs=group_end_offsets`` (each group a multiple of 32 rows). Needs the ``torchao``
        extra; see :meth:`mxep.MXFP8Tensor.to_torchao`."""
        return self.tokens.to_torchao()


class Buffer:
    """Communication memory and fused MXFP8 dispatch / bf16 combine for one EP group.

    Args:
        group: the EP process group (``None``: the default group). Expert ``g`` lives on rank
            ``g // (num_experts // world)`` of this group.
        num_experts: ``E``, global experts (a multiple of the group size).
        hidden: ``H``, a multiple of 32.
        max_tokens_per_rank: ``N``, the most rows any rank passes to one dispatch (counting
            top-k duplicates). Memory is sized once for the worst case, every row of every rank
            going to one rank: ``capacity = W * N + (E // W) * align`` rows.
        align: per-expert group padding in rows. Default: 128 where the scales are blocked, else
            32 (MXFP8 weight-gradient blocks of 32 rows must not straddle two experts).
        scale_mode: ``"rceil"`` or ``"floor"`` (see :mod:`mxep.format.mxfp8`).
        transport: ``"auto"`` (:func:`select_transport`: on an NCCL group of CUDA tensors,
            ``"symm_mem"`` when the group is on one node, ``"nvshmem"`` when it spans nodes and
            PyTorch's NVSHMEM backend is available, else ``"collective"``; ``print(buf)`` says
            which and why), ``"symm_mem"`` (one NVLink node), ``"nvshmem"`` (token level only:
            one exchange of whole rows per phase, ``all_to_all_vdev``; on the CPU a gloo stand-in
            of the exchange, on one rank a local copy) or ``"collective"``.
        debug: also run checks that need a device-to-host sync: counts sum to ``n`` with none
            negative (before the dispatch), and the device-side error word is clear after every
            dispatch and combine (:meth:`check`). Off by default: the hot path never waits on
            the GPU; bad counts are then clamped on the device (no kernel touches memory outside
            its tensors) and recorded in the error word, which :meth:`check` reads.
        device: the device of the inputs (default: the current CUDA device on an NCCL group,
            else the CPU).
        top_k: None (default): a row-level Buffer (:meth:`dispatch` / :meth:`combine` of rows
            already expanded and sorted by expert; ``max_tokens_per_rank`` counts rows). ``k``: a
            token-level Buffer (:meth:`dispatch_tokens` / :meth:`combine_tokens`;
            ``max_tokens_per_rank`` = ``T`` counts tokens; symmetric memory for ``W * T`` token
            slots, the output for ``capacity = W * T * min(k, L) + L * align`` rows).
        capacity_factor: token-level only. None (default): dropless, the output sized for the
            worst case above. A factor ``f``: every expert keeps at most ``ceil(f * W * T * k /
            E)`` rows (``expert_capacity``: ``f`` times the balanced expectation); the pairs past
            it in its group's order (source rank, then token, then top-k slot) are dropped
            deterministically: they add zero to the combine and get zero gradient;
            ``DispatchResult.num_dropped`` counts this rank's on the device and ``debug=True``
            raises on a drop. The output then holds ``capacity = L * padded(expert_capacity)``
            rows, which is what a many-layer model saves for the expert GEMMs' backward.
        config: the :class:`~mxep.EPConfig` of the kernels (default: :func:`mxep.default_config`
            for the device and ``hidden``). Frozen; kept for the Buffer's lifetime.
        scale_layout: the layout of the dispatched tokens' e8m0 scales (both levels, both
            transports), ``[capacity, H // 32]`` either way:
            ``"row_major"``: ``scale[i, j]`` scales elements ``[32j, 32j + 32)`` of row ``i``
            (the Hopper GEMMs, ``torch._grouped_mm`` after a dequantize);
            ``"blocked"``: the tiles of 128 rows x 4 scales that sm_100's block-scaled MMA reads
            (``torch._scaled_grouped_mm``; torchao's ``is_swizzled_scales=True``), written by
            the dispatch kernels themselves where they would write the row-major bytes, so no
            rearrange pass runs before the GEMM. Needs ``align % 128 == 0`` (default 128 then)
            and ``hidden % 128 == 0`` (ValueError otherwise); ``capacity`` is rounded up to a
            multiple of 128;
            ``"auto"`` (default): ``"blocked"`` on sm_100 when ``hidden % 128 == 0`` and ``align``
            is left at its default or a multiple of 128, else ``"row_major"`` (always on the CPU
            and on Hopper). :func:`resolve_scale_layout` gives the choice; ``buf.scale_layout``
            and ``buf.align`` hold it.

    Every rank of the group must pass the same settings: they are compared once, here, with one
    small collective, and a mismatch raises naming the setting and every rank's value.

    Waits: on the symmetric-memory transport every device-side wait is bounded (the counts
    exchange by ``config.wait_polls`` polls, recorded in the error word; the barriers by
    ``config.barrier_timeout_ms``, after which PyTorch traps the kernel). On the collective
    transport a rank that skips a call leaves the others in the collective until the process
    group's own timeout (``init_process_group(timeout=...)``).

    Memory (symmetric, per rank, ``transport == "symm_mem"``): ``W*E*4 + 4*(W+2) + max(cap*(H + H/32),
    2*cap*H) + 2*N*H`` bytes, each region rounded up to 256 (see ``symm_bytes``). Each dispatch
    also allocates its output (``cap * (H + H/32)`` bytes, of which the received rows are written).

    Example (one process, gloo)::

        >>> import torch, torch.distributed as dist, mxep
        >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=0, world_size=1)
        >>> buf = mxep.Buffer(None, num_experts=4, hidden=64, max_tokens_per_rank=8)
        >>> x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> counts = torch.tensor([2, 0, 3, 0])
        >>> res = buf.dispatch(x, counts)
        >>> res.group_end_offsets.tolist(), res.tokens_per_expert.tolist()  # debug-only (doc example)
        ([32, 64, 96, 128], [2, 0, 3, 0])
        >>> y = buf.combine(res.tokens.dequantize(), res.handle)   # back to [5, 64], original order
        >>> y.sum().backward()                                      # x.grad: bf16 [5, 64]
        >>> dist.destroy_process_group()
    """

    def __init__(self, group, num_experts: int, hidden: int, max_tokens_per_rank: int, align: int | None = None,
                 scale_mode: str = "rceil", transport: str = "auto", debug: bool = False,
                 device: torch.device | str | None = None, config: EPConfig | None = None,
                 top_k: int | None = None, capacity_factor: float | None = None, scale_layout: str = "auto"):
        if not dist.is_initialized():
            raise RuntimeError("mxep.Buffer needs torch.distributed to be initialized")
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        num_experts = check_size("num_experts", num_experts, 1)
        hidden = check_size("hidden", hidden, 1)
        max_tokens_per_rank = check_size("max_tokens_per_rank", max_tokens_per_rank, 0)
        backend = dist.get_backend(self.group)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:   # "cuda": the current device, as torch means it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.scale_layout, align = resolve_scale_layout(scale_layout, align, hidden, self.device)
        if num_experts % self.world_size:
            raise ValueError(f"num_experts ({num_experts}) must be a positive multiple of the group size ({self.world_size})")
        if hidden % BLOCK_SIZE:
            raise ValueError(f"hidden ({hidden}) must be a positive multiple of {BLOCK_SIZE}")
        check_scale_mode(scale_mode)
        if config is not None and not isinstance(config, EPConfig):
            raise TypeError(f"config must be an mxep.EPConfig, got {type(config).__name__}")
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.world_size
        self.hidden = hidden
        self.max_tokens_per_rank = max_tokens_per_rank
        self.align = align
        self.scale_mode = scale_mode
        self.debug = bool(debug)
        self.top_k = None if top_k is None else check_size("top_k", top_k, 1)
        if self.top_k is not None and self.top_k > num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({num_experts})")
        # Output rows on one rank in the true worst case: every row of every rank (row-level),
        # or every token's pairs for one rank, at most min(k, L) per token (token-level).
        rows = max_tokens_per_rank if self.top_k is None else max_tokens_per_rank * min(self.top_k, self.num_local_experts)
        self.capacity = capacity_rows(self.world_size, self.num_local_experts, rows, align)
        self.capacity_factor, self.expert_capacity = None, None
        if capacity_factor is not None:
            if self.top_k is None:
                raise ValueError("capacity_factor bounds the token-level dispatch: build the Buffer with top_k")
            if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
                raise ValueError(f"capacity_factor must be a positive number, got {capacity_factor!r}")
            self.capacity_factor = float(capacity_factor)
            # rows one expert keeps: the factor times the balanced expectation W * T * k / E
            self.expert_capacity = max(1, math.ceil(self.capacity_factor * self.world_size * max_tokens_per_rank
                                                    * self.top_k / num_experts))
            self.capacity = min(self.capacity, self.num_local_experts * padded_group_rows(self.expert_capacity, align))
        # blocked scales: whole 128-row tiles, so the [capacity, H // 32] tensor reads back in one reshape
        self.capacity = layout_capacity(self.capacity, self.scale_layout)

        self.config = config if config is not None else default_config(self.device, hidden)
        nodes = None
        if transport == "auto" and backend == "nccl" and self.device.type == "cuda":
            nodes = group_nodes(self.group)
        transport, self.transport_reason = select_transport(transport, backend, self.device.type, nodes,
                                                            nvshmem_available())
        if transport == "symm_mem" and self.device.type != "cuda":
            raise ValueError("transport='symm_mem' needs CUDA devices")
        if transport == "nvshmem" and self.top_k is None:
            raise ValueError("transport='nvshmem' serves the token-level API only: build the Buffer with top_k=k and "
                             "use dispatch_tokens / combine_tokens (the row-level dispatch runs on 'symm_mem' or "
                             "'collective')")
        self._check_ranks_agree(transport)
        self.regions = RegionLayout(self.world_size, num_experts, hidden, max_tokens_per_rank, self.capacity,
                                    self.top_k or 0, self.expert_capacity or 2**31 - 1, self.scale_layout)
        if transport == "symm_mem":
            self.transport: Transport = SymmMemTransport(self.group, self.regions, self.device, self.config)
        elif transport == "nvshmem":
            self.transport = NvshmemTransport(make_exchange(self.group, self.device, self.world_size), self.rank,
                                              self.world_size, num_experts, hidden, max_tokens_per_rank, self.top_k,
                                              self.capacity, self.device, self.config,
                                              self.expert_capacity or 2**31 - 1, self.scale_layout)
        else:
            self.transport = CollectiveTransport(self.group, num_experts, hidden, max_tokens_per_rank, self.capacity,
                                                 self.device, self.top_k or 0, align, self.expert_capacity,
                                                 self.scale_layout)
        self._id = register_buffer(self)   # how the ops name this Buffer (mxep.ep.ops)
        self._generation = 0               # dispatches so far: a handle is valid until the next

    def _check_ranks_agree(self, transport: str) -> None:
        """Compare the settings every rank passed, with one small all-gather; raise naming the
        first setting that differs and every rank's value."""
        settings = {"hidden": self.hidden, "num_experts": self.num_experts,
                    "max_tokens_per_rank": self.max_tokens_per_rank, "align": self.align,
                    "scale_mode": SCALE_MODES.index(self.scale_mode), "transport": TRANSPORTS.index(transport),
                    "top_k": self.top_k or 0, "expert_capacity": self.expert_capacity or 0,
                    "scale_layout": SCALE_LAYOUTS.index(self.scale_layout)}
        mine = torch.tensor(list(settings.values()), dtype=torch.int64, device=self.device)
        every = torch.empty(self.world_size * mine.numel(), dtype=torch.int64, device=self.device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(every, mine, group=self.group)   # a flat output: gloo's all_gather_single refuses [W, n]
        every = every.view(self.world_size, -1).cpu()   # construction-only: host read of the ranks' settings
        for k, (name, _) in enumerate(settings.items()):
            col = every[:, k].tolist()   # construction-only
            if len(set(col)) > 1:
                if name == "scale_mode":
                    col = [SCALE_MODES[v] for v in col]
                elif name == "transport":
                    col = [TRANSPORTS[v] for v in col]
                elif name == "scale_layout":
                    col = [SCALE_LAYOUTS[v] for v in col]
                values = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(col))
                raise ValueError(f"mxep.Buffer: the ranks of the EP group passed different {name} ({values}); "
                                 "every rank must build its Buffer with the same settings")

    @property
    def transport_name(self) -> str:
        """``"symm_mem"`` (fused, NVLink peer stores), ``"nvshmem"`` (token level, one row exchange
        per phase, across nodes) or ``"collective"`` (fixed-size all-to-all)."""
        return self.transport.name

    @property
    def symm_bytes(self) -> int:
        """Communication-buffer bytes this Buffer holds per rank: symmetric memory on
        ``symm_mem``, the exchange buffers on ``nvshmem`` (symmetric with the NVSHMEM exchange),
        0 on the collective path."""
        if self.transport_name == "symm_mem":
            return self.regions.total_bytes
        return getattr(self.transport, "buffer_bytes", 0)

    def __repr__(self) -> str:
        how = self.transport_reason
        exchange = getattr(self.transport, "exchange", None)
        if exchange is not None:
            how += f"; exchange: {exchange.name}"
        return (f"mxep.Buffer(transport={self.transport_name!r} ({how}), rank={self.rank}/{self.world_size}, "
                f"num_experts={self.num_experts}, hidden={self.hidden}, max_tokens_per_rank="
                f"{self.max_tokens_per_rank}, align={self.align}, capacity={self.capacity}, "
                f"scale_mode={self.scale_mode!r}, scale_layout={self.scale_layout!r}, symm_bytes={self.symm_bytes})")

    # ------------------------------------------------------------------ validation (host only)
    def _check_x(self, x: torch.Tensor, name: str = "x") -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor")
        if x.dtype != torch.bfloat16:
            raise TypeError(f"{name} must be bfloat16, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"{name} must be [n, {self.hidden}], got {tuple(x.shape)}")
        if x.shape[0] > self.max_tokens_per_rank:
            raise ValueError(f"{name} has {x.shape[0]} rows but this Buffer was built for "
                             f"max_tokens_per_rank={self.max_tokens_per_rank}")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device}, the Buffer on {self.device}")

    def _check_counts(self, counts: torch.Tensor, n: int) -> torch.Tensor:
        if not isinstance(counts, torch.Tensor):
            raise TypeError("num_tokens_per_expert must be a torch.Tensor")
        if counts.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"num_tokens_per_expert must be int32 or int64, got {counts.dtype}")
        if tuple(counts.shape) != (self.num_experts,):
            raise ValueError(f"num_tokens_per_expert must have shape [{self.num_experts}], got {tuple(counts.shape)}")
        if counts.device != self.device:
            raise ValueError(f"num_tokens_per_expert is on {counts.device}, expected {self.device}")
        if self.debug:
            total, low = int(counts.sum()), int(counts.min())  # debug-only: host sync
            if total != n or low < 0:
                raise ValueError(f"num_tokens_per_expert must be >= 0 and sum to n={n}; got sum {total}, min {low}")
        if counts.dtype == torch.int64:
            # saturate instead of wrapping: a huge int64 count must stay visibly bad (clamped on
            # the device and recorded), not wrap into a plausible int32 one
            counts = counts.clamp(-1, 2**31 - 1)
        return counts.to(torch.int32).contiguous()

    def _check_handle(self, handle: DispatchHandle) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle must be a DispatchHandle, got {type(handle).__name__}")
        if handle.transport is not self.transport:
            raise ValueError("handle belongs to a dispatch on another Buffer; pass the handle of a dispatch on this one")
        if not torch.compiler.is_compiling() and handle.generation != self._generation:
            raise RuntimeError(f"mxep: this handle is stale: it belongs to dispatch #{handle.generation} of this Buffer, "
                               f"and dispatch #{self._generation} came after it. A handle is valid until the next "
                               "dispatch on its Buffer (every transport: the symmetric-memory one reuses the Buffer's "
                               "memory); combine each dispatch before the next, or use one Buffer per in-flight "
                               "dispatch")

    def _new_generation(self, handle: DispatchHandle | None = None) -> None:
        # Host-side bookkeeping only (no sync). Inside a torch.compile trace it is skipped: the
        # count would be a guarded constant that changes every call (a recompile per step); a
        # compiled region dispatches and combines in one graph. handle None: a dispatch whose
        # handle never leaves mxep (mxep.MoE's one-node step), which still makes earlier ones stale.
        if not torch.compiler.is_compiling():
            self._generation += 1
            if handle is not None:
                handle.generation = self._generation

    def check(self, op: str = "the last call") -> None:
        """Raise if this rank recorded an error on the device: a wait that timed out, a
        call-sequence mismatch between ranks, counts that had to be clamped, or (token level)
        ``topk_idx`` entries out of range or repeated within a row since the Buffer was built
        (host sync: call it where a sync is acceptable, e.g. once per step or in tests;
        ``debug=True`` calls it after every dispatch and combine)."""
        status = self.transport.status()   # debug-only: host sync
        if status:
            raise RuntimeError(f"mxep: rank {self.rank}, {op}: {describe_status(status)}; the outputs of that "
                               "call are invalid")
        bad_ids, repeated = self.transport.routing_errors.tolist()   # debug-only: host sync
        if bad_ids or repeated:
            raise RuntimeError(f"mxep: rank {self.rank}, {op}: {describe_routing_errors(bad_ids, repeated)} (counted "
                               "since this Buffer was built)")

    # ------------------------------------------------------------------ raw ops (no autograd)
    def _row_level_only(self, what: str) -> None:
        if self.top_k is not None:
            raise RuntimeError(f"mxep.Buffer.{what} is the row-level API; this Buffer was built with top_k="
                               f"{self.top_k} for the token-level one (dispatch_tokens / combine_tokens): build a "
                               "Buffer without top_k for rows")

    def _token_level_only(self, what: str) -> None:
        if self.top_k is None:
            raise RuntimeError(f"mxep.Buffer.{what} is the token-level API: build the Buffer with top_k=k")

    def plan(self, num_tokens_per_expert: torch.Tensor, num_rows: int) -> DispatchHandle:
        """Exchange counts (device-side) and compute the layout of one dispatch."""
        self._row_level_only("plan")
        counts = self._check_counts(num_tokens_per_expert, num_rows)
        handle = self.transport.plan(counts, num_rows, self.align)
        self._new_generation(handle)   # a plan starts a dispatch: earlier handles are stale from here
        return handle

    # ------------------------------------------------------------------ public, differentiable
    def dispatch(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor, zero_copy: bool = False) -> DispatchResult:
        """Quantize ``x`` to MXFP8 and send every row to its expert's rank, expert-major and padded.

        Args:
            x: bf16 ``[n, H]``, ``n <= max_tokens_per_rank``, rows sorted by global expert id.
            num_tokens_per_expert: int32/int64 ``[E]`` on ``x``'s device, summing to ``n``.
            zero_copy: return the tokens where the other ranks' pushes put them, this rank's
                receive region, instead of copying them out into new tensors (saves one local
                read + write of every received row, and a launch; the low-latency mode of
                DeepEP has the same contract). The tokens are then valid until the next
                dispatch on this Buffer (or the backward of a combine, or a write into
                :meth:`combine_input`, which is the same memory): consume them first (e.g. the
                expert GEMM), and do not save them for a backward. On the collective transport
                they are fresh tensors either way.

        Returns:
            :class:`DispatchResult`. Differentiable w.r.t. ``x``: the bf16 gradient of
            ``tokens.dequantize()`` travels back (never quantized); ``x.grad[i]`` is the
            gradient at the row where ``x[i]`` landed.
        """
        self._row_level_only("dispatch")
        self._check_x(x)
        handle = self.plan(num_tokens_per_expert, x.shape[0])
        tokens = DispatchRows.apply(x, self._id, handle, zero_copy)
        return DispatchResult(tokens, handle.group_end_offsets, handle.tokens_per_expert, handle)

    def combine_input(self) -> torch.Tensor:
        """The zero-copy combine input: bf16 ``[capacity, H]``, in the dispatch layout.

        Write the expert outputs here (e.g. a grouped GEMM with ``out=``, or any kernel that
        fills rows ``[0, group_end_offsets[-1])``) and pass this tensor to :meth:`combine`:
        on the symmetric-memory transport it is this rank's own receive region, so the combine
        skips the staging copy and every source reads its rows straight from the owners over
        NVLink into its output (one barrier, one kernel). Pad rows are never read.

        Lifetime: it aliases the dispatch's receive region. Write it only after :meth:`dispatch`
        returned (the dispatch output was copied out by then, in stream order) and call
        :meth:`combine` before the next dispatch, or backward through a combine, on this
        Buffer; those overwrite it. The tokens of a ``zero_copy`` dispatch live in the same
        memory: a kernel must not read them while writing here (a grouped GEMM reading those
        tokens writes a regular ``expert_out`` instead). On the collective transport it is a
        plain tensor owned by the Buffer (same API, no saving).

        Example (in the same setting as the class example)::

            >>> res = buf.dispatch(x.detach(), counts)
            >>> out = buf.combine_input()
            >>> _ = torch.mul(res.tokens.dequantize(), 2, out=out)    # the "experts"
            >>> y = buf.combine(out, res.handle)                        # [5, 64]: 2 * x, MXFP8 round trip
            >>> torch.equal(y, 2 * mxep.to_mxfp8(x.detach()).dequantize())
            True
        """
        return self.transport.combine_input()

    def combine(self, expert_out: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """Send rows of the dispatch layout back to their source ranks, original order.

        Args:
            expert_out: bf16 ``[capacity, H]`` in the layout of ``handle``'s dispatch (only rows
                ``< group_end_offsets[-1]`` that are not pad rows are read).
            handle: the :class:`DispatchHandle` of that dispatch.

        Returns:
            bf16 ``[n, H]``: row ``i`` is ``expert_out`` at the row where ``x[i]`` landed (a
            bit-exact copy). Differentiable: the backward sends the bf16 gradient into the
            dispatch layout (pad rows zero).
        """
        self._row_level_only("combine")
        self._check_handle(handle)
        if expert_out.dtype != torch.bfloat16:
            raise TypeError(f"expert_out must be bfloat16, got {expert_out.dtype}")
        if tuple(expert_out.shape) != (self.capacity, self.hidden):
            raise ValueError(f"expert_out must be [{self.capacity}, {self.hidden}] (the dispatch layout), "
                             f"got {tuple(expert_out.shape)}")
        return CombineRows.apply(expert_out, self._id, handle)

    # ------------------------------------------------------------------ token-level (top_k)
    def _check_routing(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> None:
        self._check_x(x)
        t, k = x.shape[0], self.top_k
        if not isinstance(topk_idx, torch.Tensor) or topk_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_idx must be an int32/int64 tensor, got {getattr(topk_idx, 'dtype', type(topk_idx))}")
        if tuple(topk_idx.shape) != (t, k):
            raise ValueError(f"topk_idx must be [{t}, {k}] (tokens x top_k), got {tuple(topk_idx.shape)}")
        if not isinstance(topk_weights, torch.Tensor) or not topk_weights.is_floating_point():
            raise TypeError("topk_weights must be a floating-point tensor (fp32 [t, k])")
        if tuple(topk_weights.shape) != (t, k):
            raise ValueError(f"topk_weights must be [{t}, {k}], got {tuple(topk_weights.shape)}")
        if topk_idx.device != self.device or topk_weights.device != self.device:
            raise ValueError(f"topk_idx and topk_weights must be on {self.device}")
        if self.debug:
            lo, hi = int(topk_idx.min()) if topk_idx.numel() else 0, int(topk_idx.max()) if topk_idx.numel() else 0  # debug-only
            if lo < -1 or hi >= self.num_experts:
                raise ValueError(f"topk_idx must hold expert ids in [0, {self.num_experts}) or -1; got [{lo}, {hi}]")

    def dispatch_tokens(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        """Token-level fused MXFP8 dispatch: every token crosses to each rank that owns one of
        its experts at most once (quantized once, at its source) and is expanded there into its
        local experts' rows of the expert-major, padded layout.

        Args:
            x: bf16 ``[t, H]``, ``t <= max_tokens_per_rank`` tokens in any order (not expanded).
            topk_idx: int32/int64 ``[t, top_k]`` global expert ids, distinct within a row; ``-1``
                marks a slot with no expert (skipped, its weight ignored). Other values outside
                ``[0, E)`` are routed as ``-1`` and ids repeated within a row are dispatched as
                given; both are counted on the device (``routing_errors``, :meth:`check`; with
                ``debug=True`` out-of-range ids raise before the call, repeats after it).
            topk_weights: fp32 ``[t, top_k]`` gate weights (travel with the tokens; the combine
                applies them).

        Returns:
            :class:`DispatchResult`: ``tokens`` MXFP8 ``[capacity, H]`` bit for bit the row-level
            dispatch of the stably expert-sorted expansion of the (token, expert) pairs with id
            >= 0 (docs/layout.md: on the owner, expert e's group holds source 0's tokens that
            chose e in token order, then source 1's, ...); ``group_end_offsets`` /
            ``tokens_per_expert`` int32 ``[E // W]``; ``handle`` for :meth:`combine_tokens`, valid
            until the next dispatch on this Buffer; ``num_dropped`` int64 ``[]``;
            ``routing_errors`` int32 ``[2]``.
            Differentiable w.r.t. ``x`` (bf16, straight-through: ``x.grad[t]`` = the sum over
            its pairs of the gradient at the pair's row) and, through :meth:`combine_tokens`,
            ``topk_weights``. No host sync.

        Memory (symmetric, per rank): ``W*(E+W)*4 + 4*(W+2) + max(W*T*(H + H/32), 2*W*T*H)
        + 2*W*T*H + 3*4*W*T*k`` bytes (token slots, returned partials, slot tables; each region
        rounded up to 256): ``W * T`` token slots, not ``W * T * k`` rows (``symm_bytes``). The
        output holds ``capacity = W * T * min(k, L) + L * align`` rows.
        """
        self._token_level_only("dispatch_tokens")
        self._check_routing(x, topk_idx, topk_weights)
        q, group_end_offsets, tokens_per_expert, dropped, errors, *state = DispatchTokens.apply(
            x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous(), self._id, self.scale_layout)
        handle = DispatchHandle(self.transport, self.rank, x.shape[0], group_end_offsets, tokens_per_expert,
                                self.transport.token_state_type.from_list(state))
        self._new_generation(handle)
        if self.debug and self.expert_capacity is not None and int(dropped):   # debug-only: host sync
            raise RuntimeError(f"mxep: rank {self.rank}, dispatch_tokens: capacity_factor={self.capacity_factor} "
                               f"dropped {int(dropped)} (token, expert) pairs of this rank")   # debug-only
        return DispatchResult(q, group_end_offsets, tokens_per_expert, handle, dropped, errors)

    def combine_tokens(self, expert_out: torch.Tensor, handle: DispatchHandle,
                       topk_weights: torch.Tensor | None = None) -> torch.Tensor:
        """``y[t] = sum_j topk_weights[t, j] * expert_out[row(t, j)]``: each owner reduces a
        token's rows over its local experts in fp32 (gate-weighted, in top-k slot order) and
        sends one bf16 partial per (token, rank) back; the source adds the partials in fp32 in
        rank order. Bit-identical from run to run.

        Args:
            expert_out: bf16 ``[capacity, H]`` in the layout of ``handle``'s dispatch (pad rows
                and rows past ``group_end_offsets[-1]`` are never read).
            handle: the handle of that :meth:`dispatch_tokens`.
            topk_weights: the tensor passed to that dispatch, to receive its gradient (its
                values are the dispatched ones, which travelled with the tokens); None: no
                gradient for the weights.

        Returns:
            bf16 ``[t, H]``. Differentiable: ``expert_out.grad[row(t, j)] = topk_weights[t, j] *
            dy[t]`` (bf16, pad rows zero) and ``topk_weights.grad[t, j] = <dy[t],
            expert_out[row(t, j)]>`` (fp32); ``dy`` crosses once per (token, rank) in bf16.
        """
        self._token_level_only("combine_tokens")
        self._check_handle(handle)
        if expert_out.dtype != torch.bfloat16 or tuple(expert_out.shape) != (self.capacity, self.hidden):
            raise ValueError(f"expert_out must be bf16 [{self.capacity}, {self.hidden}] (the dispatch layout), got "
                             f"{expert_out.dtype} {tuple(expert_out.shape)}")
        return CombineTokens.apply(expert_out.contiguous(), topk_weights, self._id, *handle.state.as_list())


def a2a_dispatch_and_group_mxfp8_fwd_hp_bwd(x: torch.Tensor, num_tokens_per_expert: torch.Tensor, buffer):
    """Functional alias of :meth:`mxep.Buffer.dispatch` (MXFP8 forward, high-precision backward).

    Args:
        x: bf16 ``[n, H]`` rows sorted by global expert id.
        num_tokens_per_expert: int32/int64 ``[E]`` on ``x``'s device.
        buffer: the :class:`mxep.Buffer` of the EP group.

    Returns:
        :class:`mxep.DispatchResult` ``(tokens, group_end_offsets, tokens_per_expert, handle)``.
    """
    return buffer.dispatch(x, num_tokens_per_expert)
