"""MX expert weights for :func:`mxep.grouped_mm_mxfp8`, quantized once per weight version.

An MX GEMM takes its weight operand in MXFP8 (blocks of 32 along K). A training step reads each
expert weight in the forward GEMM and again in the backward (``grad_tokens = dy @ W``), and
gradient accumulation repeats both for every micro-batch, while the weight itself changes only
at the optimizer step. :class:`MXWeightCache` keeps one parameter's weight in the form the GEMM
consumes and hands it out again for as long as the parameter is unchanged:

* GEMM ``impl`` ``"dequant"`` (the default wherever ``torch._grouped_mm`` runs): the bf16 tensor
  ``dequant(to_mxfp8(w))``. Its values are exactly the MXFP8 weight's (an e4m3 value times a
  power of two is exact in bf16), and the ``"dequant"`` GEMM runs the same ``torch._grouped_mm``
  on the same bf16 values either way, so a bf16 weight that holds them gives the MX GEMM's
  numerics bit for bit, with no dequantization in the forward or the backward. Built in one pass
  (:func:`mxep.format.quantize.mxfp8_round_trip`: the MXFP8 bytes are never stored). Memory: one
  bf16 copy, the parameter's size.
* ``impl`` ``"torchao"``: nothing is cached, the bf16 weight itself is handed back (torchao
  quantizes it along K for the forward and along N for the input gradient, each time).
* ``impl`` ``"fused"`` (the Triton kernel reads the e4m3 bytes): the :class:`~mxep.MXFP8Tensor`
  (``1 + 1/32`` bytes per element, about half the parameter's size); the GEMM's backward still
  dequantizes it (once per backward: it holds no bf16 copy, which is what ``"fused"`` is for).

Validity: an entry is the parameter's as long as the parameter is the same tensor object, at the
same address with the same shape / strides / dtype / device, and its version counter
(``param._version``, host-side metadata: no sync) has not moved. Every in-place write through
autograd's view of the tensor bumps the counter: an optimizer step (``p.add_``, ``p.copy_``,
foreach / fused optimizers), ``with torch.no_grad(): p.add_(...)``, ``load_state_dict`` (a
``copy_``); a new tensor (``p.data = t``, ``module.to(...)``, a new ``nn.Parameter``) changes the
address or the object. Either makes the next call rebuild the entry (the stale one is released
first, so its memory can serve the new one). Not seen: writes through ``p.data`` (a tensor with
a version counter of its own) or by code that writes the storage behind autograd's back; call
:meth:`MXWeightCache.clear` after those.

The gradient passes straight through to the bf16 parameter, unquantized (as
:func:`mxep.format.mxfp8.quantize_straight_through`). The cached tensor itself is never written
in place (a rebuild allocates a new one), so a graph that saved an older one for its backward
keeps valid values.
"""
from __future__ import annotations

import weakref

import torch

from mxep._utils import triton_available_for
from mxep.format.dequantize import dequantize_mxfp8_op
from mxep.format.mxfp8 import MXFP8Tensor, to_mxfp8
from mxep.format.quantize import mxfp8_round_trip
from mxep.format.spec import check_scale_mode
from mxep.gemm.grouped_gemm import resolve_impl

__all__ = ["MXWeightCache"]


class _CachedStraightThrough(torch.autograd.Function):
    """``(param, cached) -> cached`` as a new tensor object (the cache's own tensor never gets a
    ``grad_fn``); the gradient goes to ``param`` unchanged."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, cached: torch.Tensor):
        if isinstance(cached, MXFP8Tensor):
            return MXFP8Tensor(cached.qdata, cached.scale, cached.dtype)
        return cached.detach()   # same storage and version counter, a tensor of its own

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class MXWeightCache:
    """One weight's MXFP8 form for :func:`mxep.grouped_mm_mxfp8`, rebuilt when the weight changes.

    ``cache(weight, impl, scale_mode)`` -> what to pass to ``grouped_mm_mxfp8(tokens, ., offs,
    impl)`` as its weight: a bf16 ``[L, N, K]`` tensor holding the MXFP8 weight's values (``impl``
    resolving to ``"dequant"``) or an :class:`~mxep.MXFP8Tensor` (``"fused"``), differentiable
    straight through to ``weight``. Quantizes (and dequantizes) only when ``weight`` changed since
    the last call (see the module docstring for what counts as a change); no host sync.

    Attributes:
        builds: how many times the entry was (re)built (tests, diagnostics).

    Example::

        >>> w = torch.nn.Parameter(torch.randn(2, 64, 96).bfloat16())
        >>> cache = MXWeightCache()
        >>> a, b = cache(w), cache(w)          # quantized once
        >>> cache.builds, torch.equal(a, b)
        (1, True)
        >>> with torch.no_grad():
        ...     _ = w.mul_(2)                   # an in-place update bumps w._version
        >>> _ = cache(w); cache.builds
        2
    """

    def __init__(self):
        self._key = None
        self._ref = None
        self._value: torch.Tensor | None = None
        self.builds = 0

    def clear(self) -> None:
        """Drop the entry (the next call rebuilds it): after writes the version counter cannot
        see, e.g. through ``param.data``."""
        self._key = self._ref = self._value = None

    @property
    def nbytes(self) -> int:
        """Device bytes the entry holds (0 when empty)."""
        return sum(t.untyped_storage().nbytes() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        """The plain tensors the entry holds (its bf16 copy, or the MXFP8 bytes and scales)."""
        v = self._value
        if v is None:
            return []
        return [v.qdata, v.scale] if isinstance(v, MXFP8Tensor) else [v]

    def __call__(self, weight: torch.Tensor, impl: str = "auto", scale_mode: str = "rceil") -> torch.Tensor:
        form = self._form(weight, impl, scale_mode)
        if form == "torchao":   # torchao quantizes the bf16 weight itself (along K and along N)
            return weight
        return _CachedStraightThrough.apply(weight, self._entry(weight, scale_mode, form))

    def values(self, weight: torch.Tensor, impl: str = "auto", scale_mode: str = "rceil") -> torch.Tensor:
        """The entry itself, outside autograd (built or rebuilt as :meth:`__call__` does): bf16
        ``[L, N, K]`` MXFP8 values (``impl`` resolving to ``"dequant"``) or an
        :class:`~mxep.MXFP8Tensor` (``"fused"``), for :func:`mxep.gemm.grouped_mm_layer`, which
        sends the gradient to ``weight`` itself (one autograd node fewer than ``cache(weight)``).
        Never written in place. ``"torchao"``: ``weight``."""
        form = self._form(weight, impl, scale_mode)
        return weight if form == "torchao" else self._entry(weight, scale_mode, form)

    @staticmethod
    def _form(weight: torch.Tensor, impl: str, scale_mode: str) -> str:
        if weight.dtype != torch.bfloat16 or weight.dim() != 3:
            raise ValueError(f"MXWeightCache: weight must be bf16 [L, N, K], got {weight.dtype} {tuple(weight.shape)}")
        check_scale_mode(scale_mode)
        L, N, K = weight.shape
        return resolve_impl(impl, K, N, weight.device)

    def _entry(self, weight: torch.Tensor, scale_mode: str, form: str) -> torch.Tensor:
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, weight.device,
               weight._version, scale_mode, form, torch.is_inference_mode_enabled())
        if self._key != key or self._ref is None or self._ref() is not weight:
            self.clear()   # release the stale copy before allocating its successor
            self._value = self._build(weight, scale_mode, form)
            self._key, self._ref = key, weakref.ref(weight)
            self.builds += 1
        return self._value

    @staticmethod
    def _build(weight: torch.Tensor, scale_mode: str, form: str) -> torch.Tensor:
        with torch.no_grad():
            w = weight.detach().contiguous()
            if form == "dequant" and triton_available_for(w):
                # quantize and dequantize in one pass (4 bytes per element against 6, and no
                # transient MXFP8 copy); the same bits as the two kernels (tests/format)
                L, N, K = w.shape
                return mxfp8_round_trip(w.view(L * N, K), scale_mode).view(L, N, K)
            mx = to_mxfp8(w, scale_mode)
            if form == "fused":
                return mx
            # the op the "dequant" GEMM would run on an MXFP8Tensor weight: the same bits
            return dequantize_mxfp8_op(mx.qdata, mx.scale)
