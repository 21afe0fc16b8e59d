"""mxep's MXFP8 tokens as torchao's ``MXTensor``, and torchao's MXFP8 grouped GEMM on them
(torchao 0.18.0; the ``torchao`` extra: ``pip install 'mxep[torchao]'``).

torchao is optional: this is the one module that imports it, and only when one of its functions
is called (:func:`require_torchao`); ``import mxep`` never needs it. Without it these functions
raise an ``ImportError`` that names the extra.

* :func:`to_torchao` / :func:`from_torchao`: :class:`mxep.MXFP8Tensor` <->
  ``torchao.prototype.mx_formats.mx_tensor.MXTensor``, sharing storage (no copy): e4m3 ``qdata
  [..., K]`` and row-major e8m0 ``scale [..., K/32]`` (blocks of 32 along the last dim) are the
  same bytes in both. ``MXFP8Tensor.to_torchao()`` / ``MXFP8Tensor.from_torchao(t)`` and
  ``DispatchResult.torchao_tokens()`` call these.
* :func:`grouped_mm_torchao`: ``mxep.grouped_mm_mxfp8(..., impl="torchao")``, torchao's MXFP8
  grouped GEMM on the dispatched tokens (see its docstring for the numerics of the forward and
  the backward, and what runs where), through :func:`grouped_mm_prequantized`, which
  torchtitan's MXFP8 experts on mxep's dispatcher call too.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import torch

from mxep._utils import has_mx_tensor_cores
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.spec import BLOCK_SIZE

__all__ = ["EXTRA_HINT", "require_torchao", "torchao_available", "to_torchao", "from_torchao",
           "kernel_preference_for", "grouped_mm_torchao", "grouped_mm_prequantized", "sm100_operand"]

EXTRA_HINT = "pip install 'mxep[torchao]' (torchao==0.18.0)"

_cache: SimpleNamespace | None = None


def torchao_available() -> bool:
    """Whether torchao can be found (no import: used by ``impl="auto"`` on sm_100)."""
    try:
        return importlib.util.find_spec("torchao") is not None
    except (ImportError, ValueError):   # sys.modules["torchao"] = None, or a broken entry
        return False


def require_torchao(what: str) -> SimpleNamespace:
    """Import the torchao pieces mxep uses, or raise ``ImportError`` naming ``what`` and the
    extra that installs torchao. Returns a namespace: ``MXTensor``, ``grouped_mm``
    (``_to_mxfp8_then_scaled_grouped_mm``), ``mm_module`` (its module), ``KernelPreference``,
    ``ScaleCalculationMode``."""
    global _cache
    if _cache is not None:
        return _cache
    try:
        mx = importlib.import_module("torchao.prototype.mx_formats.mx_tensor")
        cfg = importlib.import_module("torchao.prototype.mx_formats.config")
        mm = importlib.import_module("torchao.prototype.moe_training.mxfp8_grouped_mm")
        common = importlib.import_module("torchao.quantization.quantize_.common")
    except ImportError as e:
        raise ImportError(f"{what} needs torchao, which is not installed (or does not import: {e}); "
                          f"{EXTRA_HINT}") from e
    _cache = SimpleNamespace(MXTensor=mx.MXTensor, grouped_mm=mm._to_mxfp8_then_scaled_grouped_mm, mm_module=mm,
                             KernelPreference=common.KernelPreference, ScaleCalculationMode=cfg.ScaleCalculationMode)
    return _cache


def to_torchao(t: MXFP8Tensor):
    """``MXFP8Tensor`` -> torchao ``MXTensor`` of the same bytes (no copy: ``.qdata`` and
    ``.scale`` are the same tensors, e4m3 ``[..., K]`` and row-major e8m0 ``[..., K/32]``),
    ``block_size=32``, ``orig_dtype`` = ``t.dtype``, ``is_swizzled_scales=False``. Not
    differentiable (a plain wrapper): :func:`grouped_mm_torchao` carries gradients."""
    ta = require_torchao("MXFP8Tensor.to_torchao()")
    if not isinstance(t, MXFP8Tensor):
        raise TypeError(f"to_torchao takes an MXFP8Tensor, got {type(t).__name__}")
    return ta.MXTensor.from_qdata_and_scales(t.qdata, t.scale, t.dtype, block_size=BLOCK_SIZE)


def from_torchao(t) -> MXFP8Tensor:
    """torchao ``MXTensor`` (MXFP8: e4m3 elements, blocks of 32 along the last dim, row-major
    scales) -> :class:`mxep.MXFP8Tensor` of the same bytes (no copy). Other MX tensors (FP4,
    e5m2, other block sizes, blocked / swizzled scales) raise ``ValueError``."""
    ta = require_torchao("MXFP8Tensor.from_torchao()")
    if not isinstance(t, ta.MXTensor):
        raise TypeError(f"from_torchao takes a torchao MXTensor, got {type(t).__name__}")
    if t.elem_dtype != torch.float8_e4m3fn or t.qdata.dtype != torch.float8_e4m3fn:
        raise ValueError(f"from_torchao: MXFP8 (float8_e4m3fn elements) only, got {t.elem_dtype}")
    if t.block_size != BLOCK_SIZE:
        raise ValueError(f"from_torchao: block_size must be {BLOCK_SIZE}, got {t.block_size}")
    if t.is_swizzled_scales:
        raise ValueError("from_torchao: the scales are in the blocked (swizzled) layout; MXFP8Tensor "
                         "holds row-major scales [..., K/32]")
    return MXFP8Tensor(t.qdata, t.scale, t.orig_dtype)


def kernel_preference_for(device: torch.device):
    """torchao's ``KernelPreference`` for tokens on ``device``: ``AUTO`` on sm_100+
    (``torch._scaled_grouped_mm`` on the MX tensor cores), ``EMULATED`` elsewhere (dequantize +
    bf16 ``torch._grouped_mm``, any device)."""
    ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
    return ta.KernelPreference.AUTO if has_mx_tensor_cores(device) else ta.KernelPreference.EMULATED


def sm100_operand(qdata: torch.Tensor, scale: torch.Tensor, offs: torch.Tensor):
    """The activation operand of torchao's sm_100 path (``KernelPreference.AUTO``): an
    ``MXTensor`` of the dispatched e4m3 bytes ``qdata [M, K]`` (no copy) whose scales are already
    in the per-group blocked layout of ``torch._scaled_grouped_mm`` (torchao's
    ``mx_block_rearrange_2d_M_groups_cuda`` of the row-major ``scale [M, K/32]`` at the group
    ends ``offs``; ``is_swizzled_scales=True``).

    Why rearranged here: torchao 0.18.0's ``_compute_fwd_sm100`` reads an unswizzled operand's
    scales as ``.scales``, a name ``MXTensor`` does not have (``AttributeError``); a swizzled one
    is used as it is. tests/integrations/test_torchao.py runs this through torchao's sm_100 code
    and torch's meta checks of the ``torch._scaled_grouped_mm`` calls."""
    ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
    blocked = ta.mm_module.mx_block_rearrange_2d_M_groups_cuda(scale, offs)
    return ta.MXTensor.from_qdata_and_scales(qdata, blocked, torch.bfloat16, block_size=BLOCK_SIZE,
                                             is_swizzled_scales=True)


class _PrequantizedGroupedMM(torch.autograd.Function):
    """torchao's ``_MXFP8GroupedMM`` (``wgrad_with_hp=True``, groups already padded) on mxep's
    MXFP8 tokens, through torchao's own compute functions (``_compute_fwd`` / ``_compute_dgrad``
    / ``_compute_wgrad``: its sm_100 kernels, or its emulated ones), with no second quantization
    of the tokens.

    Why not torchao's entry point with an ``MXTensor``: torchao 0.18.0's backward dequantizes a
    pre-quantized operand with ``triton_mxfp8_dequant_dim0``, which exists only where its sm_100
    Triton kernels do (elsewhere a stand-in that raises: CPU and Hopper), and its sm_100 forward
    reads unswizzled scales as ``.scales`` (see :func:`sm100_operand`). Here mxep dequantizes the
    tokens for the weight gradient (the same bits: e4m3 times a power of two is exact in bf16)
    and saves only their MXFP8 bytes (1.03 bytes per element) for it."""

    @staticmethod
    def forward(ctx, tokens: MXFP8Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype,
                kernel_preference, scale_calculation_mode) -> torch.Tensor:
        ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
        if kernel_preference == ta.KernelPreference.EMULATED:
            a = ta.MXTensor.from_qdata_and_scales(tokens.qdata, tokens.scale, tokens.dtype, block_size=BLOCK_SIZE)
        else:
            a = sm100_operand(tokens.qdata, tokens.scale, offs)
        out = ta.mm_module._compute_fwd(a, B_t, offs, BLOCK_SIZE, out_dtype, scale_calculation_mode,
                                        kernel_preference)
        ctx.save_for_backward(tokens.qdata, tokens.scale, B_t, offs)
        ctx.dtype, ctx.out_dtype = tokens.dtype, out_dtype
        ctx.kernel_preference, ctx.scale_calculation_mode = kernel_preference, scale_calculation_mode
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from mxep.format.dequantize import dequantize_mxfp8_op

        mm = require_torchao("grouped_mm_mxfp8(impl='torchao')").mm_module
        qdata, scale, B_t, offs = ctx.saved_tensors
        pref, mode = ctx.kernel_preference, ctx.scale_calculation_mode
        grad_out = grad_out.contiguous()
        # input gradient: torchao's recipe (grad_output quantized along dim 0, weights along dim 1)
        grad_a = mm._compute_dgrad(grad_out, B_t, offs, BLOCK_SIZE, ctx.out_dtype, mode, pref)
        # weight gradient in bf16 (wgrad_with_hp) from the tokens, dequantized up to the last
        # group end on the device (rows past it are never read; no host sync)
        a_hp = dequantize_mxfp8_op(qdata.contiguous(), scale.contiguous(), offs[-1:])
        if ctx.dtype != torch.bfloat16:
            a_hp = a_hp.to(ctx.dtype)
        grad_b_t = mm._compute_wgrad(grad_out, a_hp, offs, BLOCK_SIZE, ctx.out_dtype, mode, True, pref)
        # the tokens' gradient: bf16, straight through the quantization (to the dispatch)
        return grad_a.to(ctx.dtype), grad_b_t, None, None, None, None


@torch._dynamo.nonstrict_trace
def grouped_mm_prequantized(tokens: MXFP8Tensor, B_t: torch.Tensor, offs: torch.Tensor, out_dtype: torch.dtype,
                            kernel_preference, scale_calculation_mode) -> torch.Tensor:
    """torchao's MXFP8 grouped GEMM on mxep's dispatched tokens, without quantizing them again:
    the one implementation behind :func:`grouped_mm_torchao` and torchtitan's MXFP8 experts on
    mxep's dispatcher (:mod:`mxep.integrations.torchtitan`).

    Args:
        tokens: MXFP8Tensor ``[M, K]`` (e4m3 ``qdata``, row-major e8m0 ``scale [M, K/32]``),
            expert-major, each group a multiple of 32 rows; rows past ``offs[-1]`` never read.
        B_t: ``[L, K, N]`` per-group column-major (``w.transpose(-2, -1)`` of ``[L, N, K]``).
        offs: int32 ``[L]`` group end offsets on the device.
        out_dtype: the output's dtype (bf16).
        kernel_preference: torchao's ``KernelPreference`` (``EMULATED`` off sm_100).
        scale_calculation_mode: torchao's ``ScaleCalculationMode`` for what torchao quantizes
            (the weights, the output gradient).

    Returns ``[M, N]``. Backward: torchao's recipe with ``wgrad_with_hp=True``. Opaque to dynamo
    (as torchao's own entry point is): AOT autograd traces it, so ``MXTensor`` is made and read by
    the fake-tensor tracer."""
    return _PrequantizedGroupedMM.apply(tokens, B_t, offs, out_dtype, kernel_preference, scale_calculation_mode)


def grouped_mm_torchao(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_mxfp8(..., impl="torchao")`` (arguments checked there): torchao's MXFP8
    grouped GEMM (:func:`grouped_mm_prequantized`) with ``wgrad_with_hp=True`` and RCEIL.

    Args:
        tokens: MXFP8Tensor ``[cap, K]`` in the dispatch layout (each group a multiple of 32 rows,
            which mxep's layout guarantees).
        weight: bf16 ``[L, N, K]`` (an MXFP8Tensor weight is dequantized first, straight-through:
            torchao quantizes it again along K, which returns the same values, and along N for
            the input gradient).
        group_end_offsets: int32 ``[L]``.

    Forward: ``A @ W[e]^T`` per group in MX numerics: on sm_100+ (``KernelPreference.AUTO``)
    ``torch._scaled_grouped_mm`` on the dispatched bytes (:func:`sm100_operand`); elsewhere
    (``EMULATED``) torchao dequantizes them: bit for bit mxep's ``"dequant"`` path with the
    weight ``to_mxfp8(w)`` (RCEIL).

    Backward (torchao's recipe, unlike mxep's bf16 one): input gradient ``dy @ W[e]`` in MXFP8,
    ``dy`` quantized along its rows (blocks of 32 along N) and ``W`` along N (dim 1); weight
    gradient ``dy[group]^T @ A[group]`` in bf16 (``wgrad_with_hp=True``, which a pre-quantized
    ``A`` requires). Both flow straight through to the bf16 tokens and weights. torchao quantizes
    the weights and the output gradient with RCEIL (mxep's ``"rceil"``): :class:`mxep.MoE` keeps
    ``scale_mode="floor"`` layers off this path. No host sync in mxep's part. Memory saved for
    the backward: the tokens' MXFP8 bytes and the bf16 weight."""
    ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
    if isinstance(weight, MXFP8Tensor):
        weight = weight.dequantize(torch.bfloat16)
    return grouped_mm_prequantized(tokens, weight.transpose(-2, -1), group_end_offsets, torch.bfloat16,
                                   kernel_preference_for(tokens.device), ta.ScaleCalculationMode.RCEIL)
