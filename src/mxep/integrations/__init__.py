"""Integrations of mxep into training frameworks. Each lives in its own module and imports its
framework only when that module is imported (``import mxep`` never needs them):

* :mod:`mxep.integrations.torchtitan`: ``MXEPTokenDispatcher``, a torchtitan (0.3.0) EP token
  dispatcher on mxep's fused MXFP8 token-level dispatch / combine, selected by the override
  ``mxep.integrations.torchtitan.mxep_dispatcher`` or ``use_mxep_dispatcher(model)``; with
  ``mxfp8_experts=True`` (after torchtitan's ``MXFP8GroupedExpertsConverter``) its MXFP8 experts
  take mxep's tokens pre-quantized (torchao, imported only then).
* :mod:`mxep.integrations.torchao`: MXFP8Tensor <-> torchao ``MXTensor`` without copies, and
  torchao's MXFP8 grouped GEMM on the dispatched tokens (``grouped_mm_mxfp8(impl="torchao")``);
  importing the module does not import torchao, its functions do (the ``torchao`` extra).

The names below resolve lazily: ``from mxep.integrations import use_mxep_dispatcher`` imports
torchtitan at that moment (and says how to install it if it is missing).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "MXEPTokenDispatcher": "torchtitan",
    "MXEPDispatchMetadata": "torchtitan",
    "mxep_dispatcher": "torchtitan",
    "mxep_mxfp8_experts_cls": "torchtitan",
    "use_mxep_dispatcher": "torchtitan",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
