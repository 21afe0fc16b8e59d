"""The router's top-k: each token's ``k`` experts and their gates from its router logits, one
kernel forward and one backward.

:class:`mxep.MoE` routes with ``softmax`` over the ``E`` experts' logits, the top ``k``, and the
gates renormalized over those ``k``. The renormalized gates are the softmax over the ``k``
chosen logits alone (the ``E - k`` others cancel), and the top ``k`` of the softmax are the top
``k`` of the logits (it is increasing), so one pass over a token's logits does it: pick the
``k`` largest (ties: the lowest expert index; NaN counts as the largest, as in ``torch.topk``,
so a NaN logit reaches the gates and the output instead of vanishing), then
``g_j = exp(l_j - l_max) / sum_i exp(l_i - l_max)`` over the chosen. Backward, the softmax's:
``dl_j = g_j * (dg_j - sum_i g_i dg_i)`` on the chosen experts, 0 elsewhere.

Why a kernel: torch's expression is softmax, top-k, sum and divide forward (top-k alone launches
several kernels) and about ten autograd ops backward; here one Triton launch each way (host
work per layer, docs/history.md, 2026-12-08). The values equal torch's expression up to the
last bits of the fp32 gates (the order of the roundings differs); the experts are the same
except where two logits tie at the k-th place (``tests/moe/test_router.py``).

Where Triton does not run on the logits (a CPU without the interpreter), under
``torch.compile`` and under a caller's dispatch mode, the same math runs as torch ops
(:func:`topk_gates_reference`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mxep._utils import cdiv, next_power_of_2, runs_eagerly, triton_available_for

__all__ = ["topk_gates", "topk_gates_reference", "TopKGates"]

# rows per program: a [BLOCK_N, next_power_of_2(E)] fp32 tile (BLOCK_N * E_P <= 8192 elements)
_TILE_ELEMENTS = 8192


@triton.jit
def _topk_gates_kernel(logits_ptr, gates_ptr, experts_ptr, n, E,
                       K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < n
    r64 = rows.to(tl.int64)
    cols = tl.arange(0, E_P)
    cm = cols < E
    logit = tl.load(logits_ptr + r64[:, None] * E + cols[None, :], mask=rm[:, None] & cm[None, :],
                    other=float("-inf"))
    logit = tl.where(rm[:, None], logit, 0.0)                # rows past n: finite, never stored
    key = tl.where(logit != logit, float("inf"), logit)     # NaN ranks first, as in torch.topk
    taken = (cols[None, :] >= E) & (rows[:, None] >= 0)     # [BLOCK_N, E_P]: padding is never chosen
    jj = tl.arange(0, K_P)
    vals = tl.zeros([BLOCK_N, K_P], dtype=tl.float32)
    idxs = tl.zeros([BLOCK_N, K_P], dtype=tl.int32)
    for j in tl.static_range(K):
        cand = tl.where(taken, float("-inf"), key)
        best = tl.max(cand, axis=1)
        hit = (cand == best[:, None]) & ~taken
        ix = tl.min(tl.where(hit, cols[None, :], E_P), axis=1)     # the lowest index among ties
        chosen = cols[None, :] == ix[:, None]
        taken = taken | chosen
        v = tl.sum(tl.where(chosen, logit, 0.0), axis=1)           # the logit itself (NaN stays NaN)
        if j == 0:
            top = v                                                 # the row's largest logit
        vals = tl.where(jj[None, :] == j, v[:, None], vals)
        idxs = tl.where(jj[None, :] == j, ix[:, None], idxs)
    km = jj[None, :] < K
    e = tl.where(km, tl.exp(vals - top[:, None]), 0.0)
    g = e / tl.sum(e, axis=1)[:, None]
    m = rm[:, None] & km
    out = r64[:, None] * K + jj[None, :]
    tl.store(gates_ptr + out, g, mask=m)
    tl.store(experts_ptr + out, idxs.to(tl.int64), mask=m)


@triton.jit
def _topk_gates_backward_kernel(dg_ptr, g_ptr, experts_ptr, dl_ptr, n, E,
                                K: tl.constexpr, K_P: tl.constexpr, E_P: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < n
    r64 = rows.to(tl.int64)
    jj = tl.arange(0, K_P)
    m = rm[:, None] & (jj[None, :] < K)
    at = r64[:, None] * K + jj[None, :]
    dg = tl.load(dg_ptr + at, mask=m, other=0.0)
    g = tl.load(g_ptr + at, mask=m, other=0.0)
    ix = tl.load(experts_ptr + at, mask=m, other=0).to(tl.int32)
    dot = tl.sum(g * dg, axis=1)
    v = g * (dg - dot[:, None])
    cols = tl.arange(0, E_P)
    dl = tl.zeros([BLOCK_N, E_P], dtype=tl.float32)
    for j in tl.static_range(K):
        vj = tl.sum(tl.where(jj[None, :] == j, v, 0.0), axis=1)
        ij = tl.sum(tl.where(jj[None, :] == j, ix, 0), axis=1)
        dl = tl.where(cols[None, :] == ij[:, None], vj[:, None], dl)
    tl.store(dl_ptr + r64[:, None] * E + cols[None, :], dl, mask=rm[:, None] & (cols < E)[None, :])


def _block_n(E: int, n: int) -> tuple[int, int]:
    E_P = max(next_power_of_2(E), 2)
    return E_P, max(min(_TILE_ELEMENTS // E_P, 64, next_power_of_2(max(n, 1))), 1)


def topk_gates_forward(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel's launcher, no autograd: contiguous fp32 ``logits [n, E]`` -> ``(gates
    fp32 [n, k], experts int64 [n, k])``."""
    n, E = logits.shape
    gates = torch.empty(n, k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(n, k, dtype=torch.int64, device=logits.device)
    if n:
        E_P, bn = _block_n(E, n)
        _topk_gates_kernel[(cdiv(n, bn),)](logits, gates, experts, n, E, K=k, K_P=max(next_power_of_2(k), 2),
                                           E_P=E_P, BLOCK_N=bn, num_warps=4)
    return gates, experts


def topk_gates_backward(grad_gates: torch.Tensor, gates: torch.Tensor, experts: torch.Tensor, E: int) -> torch.Tensor:
    """The backward kernel's launcher: contiguous fp32 ``grad_gates [n, k]`` and the forward's
    outputs -> fp32 ``grad_logits [n, E]`` (zero off the chosen experts)."""
    n, k = gates.shape
    grad_logits = torch.empty(n, E, dtype=torch.float32, device=gates.device)
    if n:
        E_P, bn = _block_n(E, n)
        _topk_gates_backward_kernel[(cdiv(n, bn),)](grad_gates, gates, experts, grad_logits, n, E, K=k,
                                                    K_P=max(next_power_of_2(k), 2), E_P=E_P, BLOCK_N=bn,
                                                    num_warps=4)
    return grad_logits


class TopKGates(torch.autograd.Function):
    """``(logits fp32 [n, E], k)`` -> ``(gates fp32 [n, k], experts int64 [n, k])``, the Triton
    kernels forward and backward (:func:`topk_gates` picks where they run)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int):
        gates, experts = topk_gates_forward(logits, k)
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(gates, experts)
        ctx.num_experts = logits.shape[1]
        return gates, experts

    @staticmethod
    def backward(ctx, grad_gates, grad_experts):
        gates, experts = ctx.saved_tensors
        if grad_gates is None:
            return None, None
        if grad_gates.dtype != torch.float32:   # (a no-op .float() is still a dispatched op)
            grad_gates = grad_gates.float()
        return topk_gates_backward(grad_gates.contiguous(), gates, experts, ctx.num_experts), None


def topk_gates_reference(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same math in torch ops (autograd through them): ``logits.topk(k)``, then the softmax
    over the chosen values."""
    vals, experts = logits.topk(k, dim=-1)
    return vals.softmax(dim=-1), experts


def topk_gates(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` fp32 ``[n, E]`` -> ``(gates fp32 [n, k], experts int64 [n, k])``: each row's
    ``k`` largest logits in descending order (ties: the lower expert index first) and the
    softmax over them (the softmax over all ``E`` renormalized over the chosen ``k``).
    Differentiable in ``logits`` through the gates. ``1 <= k <= E``."""
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(f"logits must be fp32 [n, E], got {logits.dtype} {tuple(logits.shape)}")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, E={logits.shape[1]}], got {k}")
    if triton_available_for(logits) and runs_eagerly(logits):
        return TopKGates.apply(logits.contiguous(), k)
    return topk_gates_reference(logits, k)
