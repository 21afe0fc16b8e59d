"""Small helpers shared by every package: integer arithmetic for launchers, the one padded-group
formula (host and ``@triton.jit``), and where Triton kernels can run.

``triton.cdiv`` / ``triton.next_power_of_2`` are Triton ``constexpr_function`` objects in Triton
3.6: callable from host code, but each call goes through argument unwrapping (~11 calls per
dispatch). The plain functions here give the same values for the positive sizes the launchers
pass.
"""
from __future__ import annotations

import functools
import operator
import os

import torch
import triton
import triton.language as tl

__all__ = ["cdiv", "next_power_of_2", "padded_group_rows", "padded_group_rows_jit", "runs_interpreted",
           "triton_available_for", "require_triton", "check_size", "has_mx_tensor_cores", "runs_eagerly",
           "call_op", "sm_count"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def padded_group_rows(received, align: int):
    """Rows of one expert's group in the dispatch layout (docs/layout.md): ``received`` rounded
    up to a multiple of ``align``, and ``align`` rows for an expert that receives nothing (every
    group is non-empty, so the MXFP8 weight-gradient blocks of 32 rows never straddle experts).
    Works on python ints and on integer tensors (elementwise)."""
    if isinstance(received, torch.Tensor):
        return torch.clamp((received + align - 1) // align * align, min=align)
    return max((received + align - 1) // align * align, align)


@triton.jit
def padded_group_rows_jit(received, ALIGN: tl.constexpr):
    """:func:`padded_group_rows` inside a kernel (``received``: int32 scalar or tensor)."""
    return tl.maximum((received + ALIGN - 1) // ALIGN * ALIGN, ALIGN)


def triton_available_for(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``x``: CUDA tensors, or CPU tensors when the Triton
    interpreter is on (``TRITON_INTERPRET=1``; it must be set before ``triton`` is imported)."""
    return x.is_cuda or runs_interpreted(x)


def runs_interpreted(x: torch.Tensor) -> bool:
    """Whether Triton kernels on ``x`` run in the CPU interpreter, which runs a grid's programs
    one after another at a fixed cost each (launchers then take fewer, larger programs)."""
    return x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def require_triton(x: torch.Tensor, what: str) -> None:
    """Raise a clear error where ``what`` (a Triton kernel) cannot run on ``x``'s device."""
    if not triton_available_for(x):
        raise RuntimeError(
            f"mxep: {what} runs a Triton kernel, which needs a CUDA tensor; on the CPU, run under Triton's "
            f"interpreter by setting TRITON_INTERPRET=1 in the environment before Python starts (got a "
            f"{x.device.type} tensor)")


_PLAIN = (torch.Tensor, torch.nn.Parameter)
_INFRA_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("PROXY", "FAKE", "FUNCTIONAL"))


def runs_eagerly(*tensors: torch.Tensor) -> bool:
    """Whether a call on ``tensors`` runs eagerly on real tensors: not inside a ``torch.compile`` /
    ``torch.export`` trace, no tracing mode on (make_fx's proxy mode, fake or functional
    tensors: AOTAutograd), no user ``TorchDispatchMode`` (selective activation checkpointing
    must see the op), and every tensor a plain ``torch.Tensor`` (not a subclass such as a
    DTensor). Then mxep calls its registered ops' Python bodies directly: the same function
    without the custom-op layers around it (the autograd redispatch, the dynamo-disable
    wrapper, the output alias check), which cost the host some 20 µs per call (docs/history.md,
    2026-12-07); anywhere else the call stays the registered op, an opaque graph node."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:
        if type(t) not in _PLAIN:
            return False
    get_mode = torch._C._get_dispatch_mode
    for key in _INFRA_MODES:
        if get_mode(key) is not None:
            return False
    # a user TorchDispatchMode (selective activation checkpointing's caching modes) must see the
    # registered op itself: MXEPSelectiveAC saves mxep::dispatch_tokens. Modes that measure the
    # eager path (mxep.testing.host_cost's counter) say so with ``mxep_transparent = True``.
    for i in range(torch._C._len_torch_dispatch_stack()):
        if not getattr(torch._C._get_dispatch_stack_at(i), "mxep_transparent", False):
            return False
    return True


def call_op(op, impl, *args, tensors: tuple = ()):
    """``op(*args)``, a registered custom op whose Python body is ``impl``; or, where the call runs
    eagerly on plain tensors (:func:`runs_eagerly` of ``tensors``, the call's tensor arguments),
    ``impl(*args)`` below autograd, as the op's own kernel runs it (its inner views and
    allocations skip autograd's bookkeeping): the same function, the same results, without the
    custom-op layers. Callers are autograd Functions, which own the gradients."""
    if runs_eagerly(*tensors):
        with torch._C._AutoDispatchBelowADInplaceOrView():
            return impl(*args)
    return op(*args)


def check_size(name: str, value, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``; bools, floats and other types are refused (a clear
    ``TypeError`` / ``ValueError`` naming ``name`` and the value given)."""
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA ``device`` (a host query, cached per device: the
    launchers size their persistent grids with it at every launch)."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_mx_tensor_cores(device: torch.device | str) -> bool:
    """Whether ``device`` is a datacenter Blackwell GPU (sm_100 / sm_103): the one whose
    ``torch._scaled_grouped_mm`` takes MXFP8 with blocked scales, and whose kernels torchao's
    sm_100 path and torchtitan's MXFP8 converter (``has_cuda_capability(10, 0)``) target; sm_12x
    has other MMA instructions and is left out. A host query, cached per device: no sync. The one
    test of it (the Buffer's ``scale_layout="auto"``, ``grouped_mm_mxfp8(impl="auto")``, the
    torchao kernel preference, torchtitan's MXFP8 experts)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _capability(device.index if device.index is not None else torch.cuda.current_device())[0] == 10
