"""Pure-torch references of :class:`mxep.MoE`.

* :func:`moe_reference` (tests): the dense single-process math. Every (token, expert) pair is
  computed with that expert's weights gathered per row, with the same quantization points
  (MXFP8 rows before each expert GEMM, straight-through in backward) and the same bf16
  roundings, in torch autograd. No communication, no layout, no Triton GEMM: only the math.
* :class:`BF16EPMoE` and :class:`UnfusedMXFP8EPMoE` (benchmarks/bench_moe.py): whole
  expert-parallel layers the way training stacks run them today, with the parameters of
  :class:`mxep.MoE` (``router`` fp32 ``[E, H]``, ``w13`` bf16 ``[L, 2F, H]``, ``w2`` bf16
  ``[L, H, F]``: ``layer.load_state_dict(moe.state_dict())`` gives both the same weights) and
  the same routing expression, so that all of them run from the same weights, routing and
  inputs.
* :class:`BF16LocalMoE` (benchmarks/bench_moe.py, system ``bf16_local``): the plain bf16 MoE of
  one rank holding every expert, the strongest bf16 flow at world 1: :class:`BF16EPMoE` without
  its all-to-all and its host sync.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["moe_reference", "BF16EPMoE", "UnfusedMXFP8EPMoE", "BF16LocalMoE", "expert_mm"]


def moe_reference(x: torch.Tensor, router: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                  scale_mode: str = "rceil", mx_weights: bool = True) -> torch.Tensor:
    """``x`` bf16 ``[n, H]``, ``router`` fp32 ``[E, H]``, ``w13`` bf16 ``[E, 2F, H]`` and ``w2`` bf16
    ``[E, H, F]`` (all experts of all ranks) -> bf16 ``[n, H]``; differentiable w.r.t. all four."""
    from mxep.format.mxfp8 import quantize_straight_through

    n, H = x.shape
    Fh = w2.shape[2]
    if mx_weights:   # MXFP8 weights, blocks along each GEMM's K, straight-through
        w13 = quantize_straight_through(w13, scale_mode).dequantize()
        w2 = quantize_straight_through(w2, scale_mode).dequantize()
    probs = (x.float() @ router.t()).softmax(dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)
    gates = gates / gates.sum(dim=-1, keepdim=True)
    e = experts.flatten()                                            # [n*k]
    rows = x.repeat_interleave(top_k, dim=0)                          # [n*k, H], token-major
    xq = quantize_straight_through(rows, scale_mode).dequantize().float()
    h = torch.bmm(w13[e].float(), xq[:, :, None])[:, :, 0].to(torch.bfloat16)        # [n*k, 2F]
    a = F.silu(h[:, :Fh]) * h[:, Fh:]
    aq = quantize_straight_through(a, scale_mode).dequantize().float()
    o = torch.bmm(w2[e].float(), aq[:, :, None])[:, :, 0].to(torch.bfloat16)         # [n*k, H]
    y = (o.float() * gates.flatten()[:, None]).view(n, top_k, H).sum(dim=1)
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# EP baselines: host-synced splits, all_to_all_single, permute / unpermute
# ---------------------------------------------------------------------------------------------

_GROUPED_MM_RUNS: dict[str, bool] = {}


def _grouped_mm_runs(device: torch.device) -> bool:
    """Whether ``torch._grouped_mm`` (bf16, 2-D x 3-D with offsets) runs on ``device``: CUDA
    sm_90+; elsewhere probed once (a build may lack the kernel)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    if device.type not in _GROUPED_MM_RUNS:
        try:
            a = torch.zeros(8, 8, dtype=torch.bfloat16, device=device)
            b = torch.zeros(1, 8, 8, dtype=torch.bfloat16, device=device)
            torch._grouped_mm(a, b, offs=torch.tensor([8], dtype=torch.int32, device=device))
            _GROUPED_MM_RUNS[device.type] = True
        except Exception:  # noqa: BLE001 - any failure means: use the loop
            _GROUPED_MM_RUNS[device.type] = False
    return _GROUPED_MM_RUNS[device.type]


def expert_mm(x: torch.Tensor, w: torch.Tensor, group_end_offsets: torch.Tensor) -> torch.Tensor:
    """``out[r] = x[r] @ w[e]^T`` for the rows ``r`` of group ``e`` (bf16 ``x [R, K]``, ``w [L, N, K]``,
    int32 group ends ``[L]`` with ``R == group_end_offsets[-1]``) -> bf16 ``[R, N]``, differentiable.
    ``torch._grouped_mm`` where it runs (torchtitan's path); else a loop over the experts, which
    reads the group ends on the host (as torchtitan's for-loop fallback does)."""
    if _grouped_mm_runs(x.device):
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=group_end_offsets)
    outs, start = [], 0
    for e, end in enumerate(group_end_offsets.tolist()):   # host sync: the loop fallback only
        outs.append(x[start:end] @ w[e].t())
        start = end
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[1])


def _all_to_all(send: torch.Tensor, input_splits: list[int], output_splits: list[int], group) -> torch.Tensor:
    """Variable-split ``all_to_all_single`` of rows (host-known splits)."""
    recv = send.new_empty(sum(output_splits), *send.shape[1:])
    if dist.is_initialized():
        dist.all_to_all_single(recv, send.contiguous(), output_splits, input_splits, group=group)
    else:   # no process group: one rank
        recv.copy_(send)
    return recv


class _UnfusedDispatch(torch.autograd.Function):
    """Forward: :func:`mxep.ep.naive_pipeline.unfused_dispatch_bf16` / ``_mxfp8`` (counts
    all_to_all, ``.tolist()`` of the splits, [quantize,] all_to_all_single of the rows [and
    scales], permute + pad). Backward: the bf16 gradient back along the same routes (unpermute,
    all_to_all with the splits swapped), pad rows dropped; straight-through for the
    quantization."""

    @staticmethod
    def forward(ctx, rows, counts, group, align, scale_mode, out: dict):
        from mxep.ep.naive_pipeline import unfused_dispatch_bf16, unfused_dispatch_mxfp8

        if scale_mode is None:
            res = unfused_dispatch_bf16(rows, counts, group, align)
        else:
            res = unfused_dispatch_mxfp8(rows, counts, group, align, scale_mode)
        out["result"] = res
        ctx.handle = res.handle
        return res.tokens

    @staticmethod
    def backward(ctx, grad_tokens):
        from mxep.ep.naive_pipeline import unfused_combine

        return unfused_combine(grad_tokens.to(torch.bfloat16).contiguous(), ctx.handle), None, None, None, None, None


class _UnfusedCombine(torch.autograd.Function):
    """Forward: :func:`mxep.ep.naive_pipeline.unfused_combine` (unpermute, drop the pad rows,
    all_to_all back). Backward: the gradient forward along the dispatch's routes and permuted
    into the padded layout (pad rows zero)."""

    @staticmethod
    def forward(ctx, expert_out, handle):
        from mxep.ep.naive_pipeline import unfused_combine

        ctx.handle = handle
        return unfused_combine(expert_out, handle)

    @staticmethod
    def backward(ctx, grad_y):
        h = ctx.handle
        recv = _all_to_all(grad_y.to(torch.bfloat16), h.input_splits, h.output_splits, h.group)
        grad = recv.new_zeros(h.num_padded_rows, recv.shape[1])
        return grad.index_copy_(0, h.dest_rows, recv), None


class _EPMoEBaseline(nn.Module):
    """Router, sort, unfused dispatch, experts, unfused combine, gate-weighted sum; the
    subclasses choose the wire format and the expert math."""

    scale_mode_on_wire: bool = False

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, group=None,
                 device: torch.device | str | None = None, align: int = 8, scale_mode: str = "rceil"):
        super().__init__()
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if num_experts % world:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({world})")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        L = num_experts // world
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        self.group, self.align, self.scale_mode = group, align, scale_mode
        self.router = nn.Parameter(torch.randn(num_experts, hidden, device=device) / hidden ** 0.5)
        self.w13 = nn.Parameter((torch.randn(L, 2 * ffn_hidden, hidden, device=device) / hidden ** 0.5).bfloat16())
        self.w2 = nn.Parameter((torch.randn(L, hidden, ffn_hidden, device=device) / ffn_hidden ** 0.5).bfloat16())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`mxep.MoE.route` (the same expression: the same experts and gates)."""
        probs = (x.float() @ self.router.t()).softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        return gates / gates.sum(dim=-1, keepdim=True), experts

    def experts(self, tokens, group_end_offsets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` bf16 ``[n, H]`` -> bf16 ``[n, H]`` (host syncs: the split sizes)."""
        n, k = x.shape[0], self.top_k
        gates, experts = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)                    # (token, expert) pairs, expert-major
        token_of = order // k
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        state: dict = {}
        tokens = _UnfusedDispatch.apply(x[token_of].contiguous(), counts, self.group, self.align,
                                        self.scale_mode if self.scale_mode_on_wire else None, state)
        res = state["result"]
        out = self.experts(tokens, res.group_end_offsets)                   # [R, H] bf16
        rows = _UnfusedCombine.apply(out, res.handle)                       # [n*k, H]
        weighted = rows.float() * gates.flatten()[order, None]
        return torch.zeros(n, self.hidden, device=x.device).index_add(0, token_of, weighted).to(x.dtype)


class BF16EPMoE(_EPMoEBaseline):
    """The bf16 expert-parallel MoE layer as torchtitan's standard path runs it.

    Per call: router and top-k (as :class:`mxep.MoE`); rows sorted by expert; the counts
    exchanged with an ``all_to_all_single`` and read on the host (``.tolist()``: a device sync)
    for the split sizes; ``all_to_all_single`` of the bf16 rows with those splits; a permute
    into the expert-major layout, every group padded to ``align`` rows (8: what
    ``torch._grouped_mm`` needs); SwiGLU experts as two bf16 ``torch._grouped_mm`` (a per-expert
    loop where it does not run); unpermute, ``all_to_all_single`` back, gate-weighted sum.
    Autograd end to end (the backward's all-to-alls reuse the forward's splits: no further sync).

    Args: as :class:`mxep.MoE` (``hidden``, ``ffn_hidden``, ``num_experts``, ``top_k``, ``group``,
    ``device``); ``align``: group padding in rows. Parameters: as :class:`mxep.MoE`.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, group=None,
                 device: torch.device | str | None = None, align: int = 8):
        super().__init__(hidden, ffn_hidden, num_experts, top_k, group, device, align)

    def experts(self, tokens: torch.Tensor, group_end_offsets: torch.Tensor) -> torch.Tensor:
        Fh = self.ffn_hidden
        h = expert_mm(tokens, self.w13, group_end_offsets)                 # [R, 2F]
        a = F.silu(h[:, :Fh]) * h[:, Fh:]
        return expert_mm(a, self.w2, group_end_offsets)                    # [R, H]


class UnfusedMXFP8EPMoE(_EPMoEBaseline):
    """The MXFP8 expert-parallel MoE layer unfused, as torchao-style MXFP8 EP runs it.

    Per call: router, top-k, sort (as :class:`mxep.MoE`); quantize the rows to MXFP8; counts
    all-to-all and host-synced splits; ``all_to_all_single`` of the e4m3 data and of the e8m0
    scales; permute + pad (groups of ``align = 32`` rows); the experts as MX grouped GEMMs
    emulated on Hopper (no MX MMA): dequantize the tokens, the weights (quantized to MXFP8 at
    every forward, straight-through) and the MXFP8 SwiGLU output, then bf16
    ``torch._grouped_mm`` with fp32 accumulation (the numerics of ``mxep.MoE``'s experts);
    unpermute, all-to-all back in bf16, gate-weighted sum. Backward in bf16 (as ``mxep.MoE``'s):
    straight-through for every quantization. Built on :mod:`mxep.ep.naive_pipeline`.

    Args: as :class:`BF16EPMoE`, plus ``scale_mode``; ``align`` defaults to 32.
    """

    scale_mode_on_wire = True

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, group=None,
                 device: torch.device | str | None = None, align: int = 32, scale_mode: str = "rceil"):
        super().__init__(hidden, ffn_hidden, num_experts, top_k, group, device, align, scale_mode)

    def experts(self, tokens, group_end_offsets: torch.Tensor) -> torch.Tensor:
        from mxep.format.mxfp8 import quantize_straight_through

        Fh, sm = self.ffn_hidden, self.scale_mode
        w13 = quantize_straight_through(self.w13, sm).dequantize()
        h = expert_mm(tokens.dequantize(), w13, group_end_offsets)         # [R, 2F]
        a = quantize_straight_through(F.silu(h[:, :Fh]) * h[:, Fh:], sm).dequantize()
        w2 = quantize_straight_through(self.w2, sm).dequantize()
        return expert_mm(a, w2, group_end_offsets)                         # [R, H]


class BF16LocalMoE(nn.Module):
    """The plain bf16 MoE layer of one rank that holds every expert (no expert parallelism).

    Per call, the math of :class:`mxep.MoE` in bf16 with nothing between the steps: router and
    top-k (the same expression); the ``n * k`` (token, expert) pairs stably sorted by expert
    and the tokens gathered in that order; the group ends from the counts per expert (a
    scatter-add and a cumsum on the device: no host sync, no padding); SwiGLU experts as two
    bf16 ``torch._grouped_mm`` (``mxep.moe.naive.expert_mm``; a per-expert loop, which reads
    the group ends on the host, only where ``torch._grouped_mm`` does not run, e.g. the CPU
    smoke run of an old torch); the gate-weighted rows summed per token with an fp32
    ``index_add``. Autograd end to end (torch's own formulas).

    Args: ``hidden``, ``ffn_hidden``, ``num_experts``, ``top_k``, ``device`` as :class:`mxep.MoE`.
    Parameters as :class:`mxep.MoE` at world 1 (``load_state_dict(moe.state_dict())``): ``router``
    fp32 ``[E, H]``, ``w13`` bf16 ``[E, 2F, H]``, ``w2`` bf16 ``[E, H, F]``.

    Example::

        >>> layer = BF16LocalMoE(hidden=64, ffn_hidden=32, num_experts=4, top_k=2)
        >>> layer(torch.randn(10, 64).bfloat16()).shape
        torch.Size([10, 64])
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int,
                 device: torch.device | str | None = None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        E = num_experts
        self.router = nn.Parameter(torch.randn(E, hidden, device=device) / hidden ** 0.5)
        self.w13 = nn.Parameter((torch.randn(E, 2 * ffn_hidden, hidden, device=device) / hidden ** 0.5).bfloat16())
        self.w2 = nn.Parameter((torch.randn(E, hidden, ffn_hidden, device=device) / ffn_hidden ** 0.5).bfloat16())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`mxep.MoE.route` (the same expression: the same experts and gates)."""
        probs = (x.float() @ self.router.t()).softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        return gates / gates.sum(dim=-1, keepdim=True), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` bf16 ``[n, H]`` -> bf16 ``[n, H]``."""
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [n, {self.hidden}], got {tuple(x.shape)}")
        n, k, Fh = x.shape[0], self.top_k, self.ffn_hidden
        gates, experts = self.route(x)
        flat = experts.flatten()
        order = flat.argsort(stable=True)                    # (token, expert) pairs, expert-major
        token_of = order // k
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        ends = counts.cumsum(0, dtype=torch.int32)            # group ends, on the device
        h = expert_mm(x[token_of], self.w13, ends)                                   # [n*k, 2F]
        a = F.silu(h[:, :Fh]) * h[:, Fh:]
        o = expert_mm(a, self.w2, ends)                                              # [n*k, H]
        weighted = o.float() * gates.flatten()[order, None]
        return torch.zeros(n, self.hidden, device=x.device).index_add(0, token_of, weighted).to(x.dtype)
