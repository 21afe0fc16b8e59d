"""One autograd node for the token-level :class:`mxep.MoE` (router, dispatch, experts, combine),
the layer's eager path.

The composed form of the same step is the router's autograd (``x.float() @ router^T``, then
``TopKGates``) and five autograd Functions (``DispatchTokens``, two
``GroupedMXFP8MatmulFunction``, ``SwiGLUQuantizeFunction``, ``CombineTokens``), each with its
host-side checks, its ``MXFP8Tensor`` wrapper, its handle and state conversions, and one
autograd node in the backward. :class:`TokenLayer` runs the same transport calls, kernels,
matmuls and ``torch._grouped_mm`` calls in the same order, on the same tensors (on the
dequantizing path the SwiGLU kernel writes the bf16 values GEMM 2 multiplies, the dequantize
kernel's bits, instead of the MXFP8 bytes, so that pass does not run), so its output and every
gradient are bit for bit the composed form's (tests/moe/test_host_work.py checks it). It saves
the same tensors for the backward except two that the backward makes again: the router's fp32
copy of ``x`` and the SwiGLU activation's MXFP8 bytes (the SwiGLU backward kernel re-quantizes
them from ``h`` and writes their values for GEMM 2's weight gradient). What it drops is host
work: one ``Function.apply`` and one backward node instead of six applies and nine nodes, no
wrappers between them (docs/history.md, 2026-12-07 and 2026-12-08).

The composed form stays where it is needed: under ``torch.compile`` / ``torch.export`` (the
registered ops are the graph's nodes), for tensor subclasses, in ``debug`` mode (a check after
every call), with blocked scales and with ``gemm_impl="torchao"``; :meth:`mxep.MoE.forward`
picks (``MoE._one_node``).
"""
from __future__ import annotations

import torch

from mxep.ep.ops import _buffer
from mxep.gemm.grouped_gemm import expert_gemm_backward, expert_gemm_forward, expert_gemm_values, weight_for_backward
from mxep.moe.router import topk_gates_backward, topk_gates_forward
from mxep.swiglu.swiglu import swiglu_backward, swiglu_quantize_forward, swiglu_values_forward

__all__ = ["TokenLayer"]


class TokenLayer(torch.autograd.Function):
    """``(x bf16 [n, H], router fp32 [E, H], w13, w2, v13, v2, top_k, buffer_id, impl,
    scale_mode)`` -> bf16 ``[n, H]``: the layer's router (``topk_gates(x.float() @ router^T,
    top_k)``), then ``buf.combine_tokens(experts(buf.dispatch_tokens(x, topk_idx, gates)),
    handle, gates)``, as one node.

    ``w13`` / ``w2``: the parameters (bf16 ``[L, 2F, H]`` / ``[L, H, F]``) or their MXFP8Tensor
    (``quantize_straight_through``), which receive the gradients; ``v13`` / ``v2``: the MX weight
    cache's entries the GEMMs multiply by instead (bf16 MXFP8 values, or MXFP8Tensors for
    ``impl="fused"``), or None. ``impl``: ``"dequant"`` or ``"fused"`` (resolved). Gradients: ``x``
    (bf16: the experts' path plus the router's, added in bf16 as autograd adds them),
    ``router`` (fp32), ``w13`` / ``w2`` (bf16).

    Not saved, made again in the backward: the router's fp32 copy of ``x`` (``n * H * 4`` bytes
    a layer; the composed form's ``x.float() @ router^T`` keeps it for autograd's matmul
    backward) and the activation's MXFP8 bytes (``cap * F * 1.03`` bytes; the SwiGLU backward
    writes their bf16 values from ``h``, which is saved anyway)."""

    @staticmethod
    def forward(ctx, x, router, w13, w2, v13, v2, top_k: int, buffer_id: str, impl: str, scale_mode: str):
        buf = _buffer(buffer_id)
        tr, align = buf.transport, buf.align
        W13 = w13 if v13 is None else v13
        W2 = w2 if v2 is None else v2
        with torch._C._AutoDispatchBelowADInplaceOrView():   # as the registered ops run (no view bookkeeping)
            gates, topk_idx = topk_gates_forward(torch.mm(x.float(), router.t()), top_k)
            d = tr.dispatch_tokens(x, topk_idx, gates, buf.scale_mode, align)
            # the dequantizing GEMMs take the MXFP8 bytes as uint8 (no dtype views: 6 ops a step)
            raw = impl == "dequant"
            q, s, offs = d.qdata, d.scale, d.group_end_offsets
            if not raw:
                q, s = q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu)
            end = offs[-1:]
            h = expert_gemm_forward(q, s, W13, offs, end, impl)                        # [cap, 2F]
            if raw:   # GEMM 2 multiplies the MXFP8 activation's bf16 values: no bytes, no dequantize pass
                a = swiglu_values_forward(h, offs, scale_mode, hw_cast=h.is_cuda)      # bf16 [cap, F]
                eo = expert_gemm_values(a, W2, offs)                                    # [cap, H]
            else:
                aq, ascale = swiglu_quantize_forward(h, offs, scale_mode, hw_cast=h.is_cuda)  # MXFP8 [cap, F]
                eo = expert_gemm_forward(aq, ascale, W2, offs, end, impl)               # [cap, H]
            y = tr.combine_tokens(eo, d.state, align)
        state = d.state.as_list()
        w13_saved, w2_saved = weight_for_backward(W13), weight_for_backward(W2)
        ctx.counts = (len(state), len(w13_saved))
        ctx.buffer_id, ctx.scale_mode = buffer_id, scale_mode
        # (the activation's MXFP8 bytes are not saved: the SwiGLU backward makes its values again from h)
        ctx.save_for_backward(x, router, gates, topk_idx, *state, q, s, offs, end, h, eo, *w13_saved, *w2_saved)
        return y

    @staticmethod
    def backward(ctx, dy):
        n_state, n_w13 = ctx.counts
        saved = ctx.saved_tensors   # (read once: checkpointing unpacks each only once)
        (x, router, gates, topk_idx), saved = saved[:4], saved[4:]
        state, (q, s, offs, end, h, eo) = saved[:n_state], saved[n_state:n_state + 6]
        w13_saved, w2_saved = saved[n_state + 6:n_state + 6 + n_w13], saved[n_state + 6 + n_w13:]
        buf = _buffer(ctx.buffer_id)
        tr, align = buf.transport, buf.align
        st = tr.token_state_type.from_list(state)
        need_x, need_router, need_w13, need_w2 = ctx.needs_input_grad[:4]
        need_h = need_x or need_w13   # (the composed form's SwiGLU node runs only then)
        grad_x = grad_router = grad_w13 = None
        with torch._C._AutoDispatchBelowADInplaceOrView():
            # the composed form's backward nodes, in its order: combine, GEMM 2 (its weight
            # gradient after the SwiGLU backward, which makes its input), SwiGLU, GEMM 1,
            # dispatch, then the router's top-k and matmul
            if dy.dtype != torch.bfloat16:   # (a no-op .to() is still a dispatched op)
                dy = dy.to(torch.bfloat16)
            grad_eo, grad_gates = tr.combine_tokens_backward(dy.contiguous(), eo, st, align)
            grad_a, grad_w2 = expert_gemm_backward(grad_eo, None, None, w2_saved, offs, end, need_h, False)
            if need_w2:   # the activation's values again from h, in the SwiGLU backward's pass
                grad_h, a = swiglu_backward(h, grad_a, offs, values_scale_mode=ctx.scale_mode, hw_cast=h.is_cuda)
                _, grad_w2 = expert_gemm_backward(grad_eo, None, None, w2_saved, offs, end, False, True, values=a)
            elif need_h:
                grad_h = swiglu_backward(h, grad_a, offs)
            if need_h:
                grad_tokens, grad_w13 = expert_gemm_backward(grad_h, q, s, w13_saved, offs, end, need_x, need_w13)
                if need_x:
                    grad_x = tr.dispatch_tokens_backward(grad_tokens, st, align)
            if need_x or need_router:
                if grad_gates.dtype != torch.float32:
                    grad_gates = grad_gates.float()
                grad_logits = topk_gates_backward(grad_gates.contiguous(), gates, topk_idx, router.shape[0])
                if need_router:   # autograd's mm backward for a transposed operand: the same product
                    grad_router = torch.mm(grad_logits.t(), x.float())
                if need_x:
                    grad_x = grad_x + torch.mm(grad_logits, router).to(torch.bfloat16)
        return (grad_x, grad_router, grad_w13, grad_w2, None, None, None, None, None, None)
