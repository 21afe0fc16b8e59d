"""An expert-parallel MoE layer on mxep: top-k router, fused MXFP8 dispatch, SwiGLU experts as
two grouped GEMMs on the dispatch layout, bf16 combine, gate-weighted sum. Autograd end to end;
no host sync in forward or backward.

Per call on every rank (``n`` tokens, hidden ``H``, ``E`` experts, ``L = E / world`` local),
with the default token-level dispatch (``dispatch="tokens"``)::

    router   logits = x @ Wr^T (fp32)         -> top-k experts and gates per token   [n, k]
             (softmax over the chosen logits: one kernel, mxep.moe.router)
    dispatch buf.dispatch_tokens(x, experts, gates) -> MXFP8 tokens, expert-major,
             padded; each token crosses to each rank once and is expanded there      [cap, H]
    experts  h = tokens @ W13[e]^T; a = MXFP8(silu(h_gate) * h_up); a @ W2[e]^T          [cap, H] bf16
             (the SwiGLU + quantization kernel stops at the layout's end, like the GEMMs)
    combine  buf.combine_tokens(out, handle, gates): the gate-weighted sum of a token's
             rows, reduced on each owner (fp32), one bf16 partial per (token, rank)    [n, H] bf16

``dispatch="rows"`` is the row-level flow instead (sort the ``n * k`` pairs by expert, gather
``x``, ``Buffer.dispatch``, ``Buffer.combine``, an fp32 ``index_add`` of the gated rows).

Quantization points (MXFP8, straight-through in backward): the dispatched rows, the expert
activation ``a`` and (``mx_weights``) the expert weights. The backward is bf16 throughout
(dispatch, GEMMs, combine).

Eager calls on plain tensors run router, dispatch, experts and combine as one autograd node
(:class:`mxep.moe.fused.TokenLayer`: the same calls, bit for bit, with less host work, and
neither an fp32 copy of ``x`` nor the activation's MXFP8 bytes held for the backward); under
``torch.compile``, in debug mode, with blocked scales or torchao's GEMMs the composed form (the
Buffer's calls, one autograd Function each) runs. :class:`mxep.moe.capture.CapturedStep` replays
a whole training step of the layer as one CUDA graph.

MX weights are quantized once per weight version (``mx_weight_cache``, on by default): the layer
keeps ``w13`` / ``w2`` in the form the expert GEMM consumes (on the default ``"dequant"`` GEMM
path, the bf16 values of the MXFP8 weight, so nothing is dequantized in the forward or the
backward either) and reuses it until the parameter changes (:class:`mxep.gemm.MXWeightCache`).
Gradient accumulation over several micro-batches then quantizes once per optimizer step.
"""
from __future__ import annotations

import torch
from torch import nn

from mxep._utils import check_size, runs_eagerly, triton_available_for
from mxep.ep.buffer import Buffer
from mxep.format.mxfp8 import quantize_straight_through
from mxep.moe.fused import TokenLayer
from mxep.moe.router import topk_gates
from mxep.gemm import IMPLS, MXWeightCache, grouped_mm_layer, grouped_mm_mxfp8, resolve_impl
from mxep.swiglu import swiglu_mxfp8

__all__ = ["MoE", "DISPATCH_PATHS"]

# "tokens" (default): each token crosses to each rank once and is expanded there, the gate-
# weighted sum happens on the owners (Buffer.dispatch_tokens / combine_tokens). "rows": the
# (token, expert) pairs sorted and gathered on the source, the row-level dispatch, an fp32
# index_add of the gated rows (the torchao / torchtitan flow; kept for same-run comparisons
# until a multi-GPU measurement decides, docs/benchmarks.md).
DISPATCH_PATHS = ("tokens", "rows")


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, expert-parallel over ``group``.

    Args:
        hidden: ``H`` (a multiple of 32).
        ffn_hidden: ``F``, each expert's inner size (a multiple of 32).
        num_experts: ``E`` (a multiple of the group size); rank r holds experts
            ``[r * L, (r + 1) * L)``, ``L = E // world``.
        top_k: experts per token.
        max_tokens_per_rank: the most tokens one rank passes to one call (sizes the Buffer for
            ``max_tokens_per_rank * top_k`` rows).
        group: the EP process group (None: the default group).
        align, scale_mode, transport: as :class:`mxep.Buffer` (``transport="nvshmem"``, the
            multi-node path, needs the token-level ``dispatch="tokens"``).
        mx_weights: quantize ``w13`` / ``w2`` to MXFP8 (blocks of 32 along their K),
            straight-through to the bf16 parameters, so that both operands of each expert GEMM
            are MXFP8 (an MX GEMM's numerics); False: bf16 weights.
        mx_weight_cache: (with ``mx_weights``) quantize each expert weight once per weight
            version instead of at every forward, and keep it as the GEMM consumes it: with
            ``gemm_impl`` resolving to ``"dequant"`` a bf16 copy of the MXFP8 weight's values
            (bit-identical outputs and gradients: the GEMM would dequantize to the same bits,
            in the forward and again in the backward), with ``"fused"`` the MXFP8 bytes. The
            entry is rebuilt at the first forward after the parameter changed: an in-place
            write bumps its version counter ``param._version`` (an optimizer step,
            ``with torch.no_grad(): moe.w13.add_(...)``, ``load_state_dict``), a new tensor
            (``param.data = t``, ``.to(device)``, a new Parameter) changes its address. Writes
            that bypass the counter (through ``param.data``, or straight into the storage)
            are not seen: call :meth:`clear_mx_weight_cache` after those. Memory, held
            between steps: the bf16 copy equals the parameter's size (``6 L F H`` bytes for
            ``w13`` and ``w2`` together; ``"fused"``: about half of that). No host sync (the
            version counter is host-side metadata). False: quantize at every forward (and,
            on the ``"dequant"`` path, dequantize in every forward and backward).
        device: where the parameters live (the Buffer follows the group's backend).
        gemm_impl: the expert GEMMs' ``impl`` (:func:`mxep.grouped_mm_mxfp8`): ``"auto"``
            (torchao's MX grouped GEMM on sm_100+ where torchao is installed, else dequantize +
            ``torch._grouped_mm``), ``"dequant"``, ``"fused"`` (no transient bf16 copy of the
            dispatched tokens: less memory, slower) or ``"torchao"`` (the ``torchao`` extra;
            emulated off sm_100). Backward: bf16 on ``"dequant"`` / ``"fused"``; torchao's
            recipe on ``"torchao"`` (MXFP8 input gradients, bf16 weight gradients). With
            ``"torchao"`` the GEMMs get the bf16 parameters ``w13`` / ``w2`` whatever
            ``mx_weights`` says: torchao quantizes them itself, along K for the forward (RCEIL:
            the same MXFP8 values as ``mx_weights``' quantization, identical outputs) and along N for the input gradient; the weight cache holds nothing then.
            ``"torchao"`` needs ``scale_mode="rceil"``; ``"auto"`` with ``"floor"`` stays on
            ``"dequant"``.
            The SwiGLU's MXFP8 output is the second GEMM's input on every path.

    Parameters (this rank's): ``router`` fp32 ``[E, H]`` (replicated on every rank: reduce its
    gradient over the group like any replicated parameter), ``w13`` bf16 ``[L, 2F, H]`` (gate
    rows first, then up), ``w2`` bf16 ``[L, H, F]``.

    Example (one process, gloo)::

        >>> import torch, torch.distributed as dist, mxep
        >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29541", rank=0, world_size=1)
        >>> moe = mxep.MoE(hidden=64, ffn_hidden=32, num_experts=4, top_k=2, max_tokens_per_rank=16)
        >>> x = torch.randn(10, 64, dtype=torch.bfloat16, requires_grad=True)
        >>> y = moe(x)                      # [10, 64] bf16
        >>> y.float().sum().backward()      # x.grad, moe.w13.grad, moe.w2.grad, moe.router.grad
        >>> y.shape, x.grad.dtype
        (torch.Size([10, 64]), torch.bfloat16)
        >>> dist.destroy_process_group()
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, max_tokens_per_rank: int,
                 group=None, align: int = 32, scale_mode: str = "rceil", mx_weights: bool = True,
                 mx_weight_cache: bool = True,
                 device: torch.device | str | None = None, gemm_impl: str = "auto", dispatch: str = "tokens",
                 capacity_factor: float | None = None, transport: str = "auto"):
        super().__init__()
        # Sizes are checked here, under the caller's names and values (the Buffer is built for
        # max_tokens_per_rank * top_k rows: its own check would report the product).
        hidden = check_size("hidden", hidden, 1)
        ffn_hidden = check_size("ffn_hidden", ffn_hidden, 1)
        num_experts = check_size("num_experts", num_experts, 1)
        top_k = check_size("top_k", top_k)
        max_tokens_per_rank = check_size("max_tokens_per_rank", max_tokens_per_rank)
        if ffn_hidden % 32:
            raise ValueError(f"ffn_hidden must be a positive multiple of 32 (MXFP8 blocks), got {ffn_hidden}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if dispatch not in DISPATCH_PATHS:
            raise ValueError(f"dispatch must be one of {DISPATCH_PATHS}, got {dispatch!r}")
        self.dispatch = dispatch
        if dispatch == "tokens":
            self.buffer = Buffer(group, num_experts=num_experts, hidden=hidden, max_tokens_per_rank=max_tokens_per_rank,
                                 top_k=top_k, align=align, scale_mode=scale_mode, capacity_factor=capacity_factor,
                                 transport=transport)
        else:
            if capacity_factor is not None:
                raise ValueError("capacity_factor needs the token-level dispatch (dispatch='tokens')")
            self.buffer = Buffer(group, num_experts=num_experts, hidden=hidden,
                                 max_tokens_per_rank=max_tokens_per_rank * top_k, align=align, scale_mode=scale_mode,
                                 transport=transport)
        L = num_experts // self.buffer.world_size
        self.hidden, self.ffn_hidden, self.num_experts, self.top_k = hidden, ffn_hidden, num_experts, top_k
        self.max_tokens_per_rank, self.align, self.scale_mode = max_tokens_per_rank, align, scale_mode
        self.mx_weights = mx_weights
        self.mx_weight_cache = mx_weight_cache
        self._w13_cache, self._w2_cache = MXWeightCache(), MXWeightCache()
        if gemm_impl not in IMPLS:
            raise ValueError(f"gemm_impl must be one of {IMPLS}, got {gemm_impl!r}")
        if gemm_impl == "torchao":   # say so now, with the extra's name, not at the first forward
            from mxep.integrations.torchao import require_torchao
            require_torchao("mxep.MoE(gemm_impl='torchao')")
            if scale_mode != "rceil":
                raise ValueError("gemm_impl='torchao' needs scale_mode='rceil' (torchao's MXFP8 recipe quantizes "
                                 "the weights and the output gradient with RCEIL: one layer, one scale mode)")
        self.gemm_impl = gemm_impl
        self._impl_memo: dict = {}   # (gemm_impl, scale_mode, device) -> resolved_gemm_impl()
        self.router = nn.Parameter(torch.randn(num_experts, hidden, device=device) / hidden ** 0.5)
        self.w13 = nn.Parameter((torch.randn(L, 2 * ffn_hidden, hidden, device=device) / hidden ** 0.5).bfloat16())
        self.w2 = nn.Parameter((torch.randn(L, hidden, ffn_hidden, device=device) / ffn_hidden ** 0.5).bfloat16())

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[n, H]`` -> (gates fp32 ``[n, k]``: the softmax over the experts' fp32 logits
        ``x @ router^T``, renormalized over the chosen; experts int64 ``[n, k]``: the top ``k``,
        descending). One kernel after the logits' GEMM, forward and backward
        (:func:`mxep.moe.router.topk_gates`)."""
        return topk_gates(x.float() @ self.router.t(), self.top_k)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w13, w2)`` as the expert GEMMs take them: the bf16 parameters, or (``mx_weights``)
        their MXFP8 form, straight-through to the parameters (cached per weight version with
        ``mx_weight_cache``)."""
        impl = self.resolved_gemm_impl()
        if not self.mx_weights or impl == "torchao":
            return self.w13, self.w2
        # Under torch.compile the cache (host-side state keyed on version counters) is not
        # traced: the graph quantizes the weights itself in every forward.
        if self.mx_weight_cache and not torch.compiler.is_compiling():
            return (self._w13_cache(self.w13, impl, self.scale_mode),
                    self._w2_cache(self.w2, impl, self.scale_mode))
        return quantize_straight_through(self.w13, self.scale_mode), quantize_straight_through(self.w2, self.scale_mode)

    def resolved_gemm_impl(self) -> str:
        """The expert GEMMs' implementation on this layer's device (``gemm_impl`` with
        ``"auto"`` resolved): ``"dequant"``, ``"fused"`` or ``"torchao"``."""
        key = (self.gemm_impl, self.scale_mode, self.w13.device)   # (attributes a caller may change)
        impl = self._impl_memo.get(key)
        if impl is None:   # a host-side answer, the same at every call: worked out once
            impl = resolve_impl(self.gemm_impl, self.hidden, 2 * self.ffn_hidden, self.w13.device)
            if impl == "torchao" and self.scale_mode != "rceil":   # "auto" on sm_100 (explicit: refused above)
                impl = "dequant"
            self._impl_memo[key] = impl
        return impl

    def clear_mx_weight_cache(self) -> None:
        """Drop the cached MX weights (rebuilt at the next forward): needed only after writes to
        ``w13`` / ``w2`` that their version counters do not see (``param.data``)."""
        self._w13_cache.clear()
        self._w2_cache.clear()

    def _gemm_weights(self, impl: str) -> tuple:
        """``(w13, w2, v13, v2)`` for the expert GEMMs on a resolved ``impl`` (``"dequant"`` /
        ``"fused"``): the tensors that take the gradients (the parameters, or their MXFP8
        straight-through) and the cached MX weights the GEMMs multiply by instead (or None)."""
        if self.mx_weights and self.mx_weight_cache and not torch.compiler.is_compiling():
            # The cached MX weights go in as the GEMMs' values and the parameters take the
            # gradient (grouped_mm_layer / TokenLayer: bit for bit the straight-through of
            # expert_weights(), one autograd node fewer per GEMM).
            return (self.w13, self.w2, self._w13_cache.values(self.w13, impl, self.scale_mode),
                    self._w2_cache.values(self.w2, impl, self.scale_mode))
        w13, w2 = self.expert_weights()
        return w13, w2, None, None

    def _experts(self, res) -> torch.Tensor:
        """SwiGLU experts on the dispatch layout: two grouped GEMMs, the activation re-quantized
        to MXFP8 between them -> bf16 ``[capacity, H]``."""
        impl = self.resolved_gemm_impl()
        offs = res.group_end_offsets
        if impl == "torchao":
            w13, w2 = self.expert_weights()
            h = grouped_mm_mxfp8(res.tokens, w13, offs, impl)                     # [cap, 2F]
            a = swiglu_mxfp8(h, offs, self.scale_mode)                             # MXFP8 [cap, F]
            return grouped_mm_mxfp8(a, w2, offs, impl)                            # [cap, H]
        w13, w2, v13, v2 = self._gemm_weights(impl)
        end = offs[-1:]   # the two GEMMs share the layout end (one slice, not four)
        h = grouped_mm_layer(res.tokens, w13, offs, impl, v13, end)                  # [cap, 2F]
        a = swiglu_mxfp8(h, offs, self.scale_mode)                                   # MXFP8 [cap, F]
        return grouped_mm_layer(a, w2, offs, impl, v2, end)                          # [cap, H]

    def _one_node(self, x: torch.Tensor, impl: str) -> bool:
        """Whether this call takes :class:`mxep.moe.fused.TokenLayer` (router, dispatch, experts
        and combine as one autograd node: the same bits, less host work): eager calls on plain
        tensors where the kernels run, outside debug mode, with row-major scales and mxep's own
        GEMMs. Elsewhere the composed form (:meth:`route`, then the Buffer's calls, one
        autograd Function each) runs."""
        buf = self.buffer
        return (impl != "torchao" and not buf.debug and buf.scale_layout == "row_major"
                and triton_available_for(x) and runs_eagerly(x, self.w13, self.w2, self.router))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` bf16 ``[n, H]``, ``n <= max_tokens_per_rank`` -> bf16 ``[n, H]``."""
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [n, {self.hidden}], got {tuple(x.shape)}")
        if x.shape[0] > self.max_tokens_per_rank:
            raise ValueError(f"{x.shape[0]} tokens exceed max_tokens_per_rank={self.max_tokens_per_rank}")
        if self.dispatch == "tokens":
            impl = self.resolved_gemm_impl()
            if self._one_node(x, impl):
                buf = self.buffer
                buf._check_x(x)   # (the routing is the layer's own: its shapes need no check)
                w13, w2, v13, v2 = self._gemm_weights(impl)
                y = TokenLayer.apply(x.contiguous(), self.router, w13, w2, v13, v2, self.top_k, buf._id, impl,
                                     self.scale_mode)
                buf._new_generation()   # a dispatch ran: handles of earlier ones are stale
                return y
            gates, experts = self.route(x)
            res = self.buffer.dispatch_tokens(x, experts, gates)
            return self.buffer.combine_tokens(self._experts(res), res.handle, gates)
        gates, experts = self.route(x)
        n, k = x.shape[0], self.top_k
        flat = experts.flatten()
        order = flat.argsort(stable=True)                    # (token, expert) pairs, expert-major
        token_of = order // k
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        res = self.buffer.dispatch(x[token_of].contiguous(), counts)
        rows = self.buffer.combine(self._experts(res), res.handle)                            # [n*k, H]
        weighted = rows.float() * gates.flatten()[order, None]
        return torch.zeros(n, self.hidden, device=x.device).index_add(0, token_of, weighted).to(x.dtype)
