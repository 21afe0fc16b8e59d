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
* :func:`grouped_mm_torchao`: ``mxep.grouped_mm_mxfp8(..., impl="torchao")``, torchao's
  ``_to_mxfp8_then_scaled_grouped_mm`` on the dispatched tokens (see its docstring for the
  numerics of the forward and the backward, and what runs where).
"""
from __future__ import annotations

import importlib
import importlib.util
from types import SimpleNamespace

import torch

from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.spec import BLOCK_SIZE

__all__ = ["EXTRA_HINT", "require_torchao", "torchao_available", "to_torchao", "from_torchao",
           "kernel_preference_for", "grouped_mm_torchao", "sm100_input"]

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


def _on_sm100(device: torch.device) -> bool:
    """Whether ``device`` has MX tensor cores (Blackwell, sm_100+): host-side, no sync."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (10, 0)


def kernel_preference_for(device: torch.device):
    """torchao's ``KernelPreference`` for tokens on ``device``: ``AUTO`` on sm_100+
    (``torch._scaled_grouped_mm`` on the MX tensor cores), ``EMULATED`` elsewhere (dequantize +
    bf16 ``torch._grouped_mm``, any device)."""
    ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
    return ta.KernelPreference.AUTO if _on_sm100(torch.device(device)) else ta.KernelPreference.EMULATED


def sm100_input(qdata: torch.Tensor, scale: torch.Tensor):
    """The activation operand mxep passes to torchao's grouped GEMM on the sm_100 path (AUTO):
    an ``MXTensor`` of the dispatched bytes (e4m3 ``qdata [M, K]``, row-major e8m0 ``scale [M,
    K/32]``, no copy). torchao rearranges the scales into the blocked layout of
    ``torch._scaled_grouped_mm`` itself (``mx_block_rearrange_2d_M_groups_cuda``), and its
    weight-gradient dequantizes the same row-major ``.scale``.

    torchao 0.18.0's ``_compute_fwd_sm100`` reads that rearrange's input as ``.scales`` (a
    name ``MXTensor`` does not have: ``AttributeError`` without this), so the operand carries
    ``.scales`` as an alias of ``.scale``. tests/integrations/test_torchao.py runs that code on
    meta tensors and torch's own checks of the ``torch._scaled_grouped_mm`` calls it makes."""
    ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
    a = ta.MXTensor.from_qdata_and_scales(qdata, scale, torch.bfloat16, block_size=BLOCK_SIZE)
    a.scales = a.scale
    return a


class _TokensForTorchAO(torch.autograd.Function):
    """MXFP8Tensor tokens -> torchao's ``A`` operand; the gradient (bf16 ``[M, K]``) passes
    straight through to the tokens (as ``MXFP8Tensor.dequantize``)."""

    @staticmethod
    def forward(ctx, tokens: MXFP8Tensor, sm100: bool, row_end: torch.Tensor):
        if sm100:
            return sm100_input(tokens.qdata, tokens.scale)
        # EMULATED: torchao 0.18.0 cannot take an MXTensor through its backward off sm_100 (its
        # weight gradient dequantizes an MXTensor with triton_mxfp8_dequant_dim0, which outside
        # sm_100 is a stand-in that raises), so the emulated path gets the tokens' bf16 values
        # (mxep's one-pass dequantize, up to the last group end as the dequantize path reads
        # them). torchao's emulated to_mx re-quantizes them with the same blocks of 32: values
        # that are already MXFP8 come back exactly (tests: the forward equals the dequantize
        # path bit for bit), and wgrad_with_hp uses these bf16 values, as on sm_100.
        from mxep.format.dequantize import dequantize_mxfp8_op
        return dequantize_mxfp8_op(tokens.qdata.contiguous(), tokens.scale.contiguous(), row_end)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def grouped_mm_torchao(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor) -> torch.Tensor:
    """``grouped_mm_mxfp8(..., impl="torchao")`` (arguments checked there): torchao's
    ``_to_mxfp8_then_scaled_grouped_mm(A, weight.transpose(-2, -1), group_end_offsets,
    kernel_preference, wgrad_with_hp=True, scale_calculation_mode=RCEIL)``.

    Args:
        tokens: MXFP8Tensor ``[cap, K]`` in the dispatch layout (each group a multiple of 32 rows,
            which mxep's layout guarantees: torchao is called with
            ``pad_token_groups_for_grouped_mm=False``).
        weight: bf16 ``[L, N, K]`` (an MXFP8Tensor weight is dequantized first, straight-through:
            torchao quantizes it again along K, which returns the same values, and along N for
            the input gradient).
        group_end_offsets: int32 ``[L]``.

    Scales: torchao quantizes the weights and the output gradient with RCEIL (mxep's
    ``"rceil"``, bit for bit: tested). Only RCEIL: off sm_100 the tokens are re-quantized by
    torchao's emulation, which gives back the same values under RCEIL for any MXFP8 input
    (``2**s' >= amax/448``, so nothing saturates) but not under FLOOR (a block maximum of 3.75
    re-quantizes to 3.5); tokens quantized with mxep's ``"floor"`` still work (their values are
    what they are), :class:`mxep.MoE` keeps ``scale_mode="floor"`` layers off this path.

    Forward: ``A @ W[e]^T`` per group in MX numerics. On sm_100+ (``KernelPreference.AUTO``) ``A``
    is the MXTensor of the dispatched bytes (:func:`sm100_input`) and torchao runs
    ``torch._scaled_grouped_mm``; elsewhere (``EMULATED``) ``A`` is their bf16 values, which
    torchao's emulation re-quantizes to the same values: bit for bit mxep's ``"dequant"`` path
    with the weight ``to_mxfp8(w)`` (same scale mode).

    Backward (torchao's recipe, unlike mxep's bf16 one): input gradient ``dy @ W[e]`` in MXFP8,
    ``dy`` quantized along its rows (blocks of 32 along N) and ``W`` along N (dim 1); weight
    gradient ``dy[group]^T @ A[group]`` in bf16 (``wgrad_with_hp=True``, which a pre-quantized
    ``A`` requires). Both flow straight through to the bf16 tokens and weights. No host sync in
    mxep's part (torchao's emulated path has none either; its sm_100 kernels are torchao's).
    Memory saved for the backward: on sm_100 the MXFP8 bytes; emulated, the bf16 token values
    and the bf16 weight (torchao's autograd saves its inputs)."""
    ta = require_torchao("grouped_mm_mxfp8(impl='torchao')")
    pref = kernel_preference_for(tokens.device)
    sm100 = pref == ta.KernelPreference.AUTO
    if isinstance(weight, MXFP8Tensor):
        weight = weight.dequantize(torch.bfloat16)
    a = _TokensForTorchAO.apply(tokens, sm100, group_end_offsets[-1:])
    return ta.grouped_mm(a, weight.transpose(-2, -1), group_end_offsets, out_dtype=torch.bfloat16,
                         kernel_preference=pref, wgrad_with_hp=True,
                         scale_calculation_mode=ta.ScaleCalculationMode.RCEIL,
                         pad_token_groups_for_grouped_mm=False)
