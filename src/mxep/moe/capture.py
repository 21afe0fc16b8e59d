"""One training step of an :class:`mxep.MoE` captured once in a CUDA graph and replayed with new
inputs: the host issues one graph launch instead of the layer's some hundred ops and launches.

The layer never waits on the GPU from the host and every shape it uses is fixed by its Buffer
and the token count, so its forward and backward can be captured as they are: the routing,
the dispatch's plan (device-side counts and flags), the expert GEMMs and the combine are
device work whose results depend only on the values in the captured tensors. Replays copy
new tokens and output gradients into the captured inputs; new routing comes with them (it is
computed from the tokens and the router's weights in the graph).

Usage (``moe`` an :class:`mxep.MoE` on a GPU, ``x`` / ``dy`` bf16 ``[4096, H]``)::

    step = CapturedStep(moe, num_tokens=4096)   # warm-up and capture (collective on every rank)
    for x, dy in batches:
        y, x_grad = step(x, dy)                  # copy in, replay; moe.w13.grad etc. hold this step's
        optimizer.step()                         # in place: the next replay quantizes the new weights

Two ways to get there; :class:`CapturedStep` is the explicit one, ``torch.compile(moe,
mode="reduce-overhead")`` (inductor's CUDA graphs over the compiled graph, in which the
Buffer's calls are registered ops) the other; tests/moe/test_capture_gpu.py checks both against
the eager layer over several replays with new inputs and routing.

Semantics of :class:`CapturedStep`:

* Every call is one forward + backward with ``y = moe(x)``, ``y.backward(dy)``; the returned
  ``y`` and ``x_grad`` and the parameters' ``.grad`` are the graph's own tensors, overwritten by
  the next call (the gradients are this step's, not accumulated: sum them yourself for
  gradient accumulation). A parameter whose ``.grad`` was set to None or replaced since
  (``optimizer.zero_grad()``) gets the captured tensor back at the next call.
* The MX weights are quantized inside the graph at every replay, so in-place weight updates
  between calls (an optimizer step) are seen. A parameter replaced by a new tensor
  (``p.data = t``, ``module.to(...)``) is not: the call raises and asks for a new capture.
* Collective like the layer: every rank of the EP group builds its CapturedStep (warm-up and
  capture dispatch) and calls it the same number of times. A replay is a dispatch on the
  layer's Buffer (handles of earlier dispatches are stale after it).
* Build it before any eager step of the layer, or after dropping every reference to the
  outputs of eager steps that ran on the default stream (``del y``): their autograd graph keeps
  the parameters' gradient accumulators bound to the default stream, and the capture cannot
  wait on that stream (pytorch/pytorch#164302; the error then says so).
* ``mode="eager"`` runs the same step eagerly on the same static tensors at every call, with
  the same semantics: the CPU (no CUDA graphs there) and debugging.

No host sync in a call: the copies, the replay and the bookkeeping are host-side enqueues.
"""
from __future__ import annotations

import torch

from mxep._utils import check_size

__all__ = ["CapturedStep", "CAPTURE_MODES"]

CAPTURE_MODES = ("graph", "eager")


class CapturedStep:
    """One forward + backward of ``moe`` on ``num_tokens`` tokens, captured in a CUDA graph.

    Args:
        moe: an :class:`mxep.MoE` (token- or row-level dispatch) whose parameters are on a CUDA
            device (``mode="graph"``), not in ``debug`` mode (its checks sync with the host).
        num_tokens: ``n``, the tokens of every call (``1 <= n <= moe.max_tokens_per_rank``; a
            graph has fixed shapes: pad a shorter batch, or capture one step per size).
        warmup: eager steps before the capture, on a side stream (compiles the kernels, fills
            the allocator; ``torch.cuda.graphs`` needs at least one). Default 2.
        mode: ``"graph"`` (default) or ``"eager"`` (no capture: the step runs eagerly at every
            call on the same static tensors; any device).
        pool: a CUDA graph memory pool to share (``torch.cuda.graph_pool_handle()``), e.g.
            between the steps of several layers; None: a private one.

    Attributes:
        x, dy: the static inputs, bf16 ``[n, H]`` (``x`` requires grad).
        y, x_grad: the static outputs, bf16 ``[n, H]`` (valid after a call, until the next).
        graph: the ``torch.cuda.CUDAGraph`` (None for ``mode="eager"``).
    """

    def __init__(self, moe, num_tokens: int, warmup: int = 2, mode: str = "graph", pool=None):
        from mxep.moe.layer import MoE

        if not isinstance(moe, MoE):
            raise TypeError(f"CapturedStep captures an mxep.MoE, got {type(moe).__name__}")
        if mode not in CAPTURE_MODES:
            raise ValueError(f"mode must be one of {CAPTURE_MODES}, got {mode!r}")
        num_tokens = check_size("num_tokens", num_tokens, 1)
        if num_tokens > moe.max_tokens_per_rank:
            raise ValueError(f"num_tokens={num_tokens} exceeds the layer's max_tokens_per_rank={moe.max_tokens_per_rank}")
        warmup = check_size("warmup", warmup, 1 if mode == "graph" else 0)
        device = moe.w13.device
        if mode == "graph":
            if moe.buffer.debug:
                raise ValueError("CapturedStep: the layer's Buffer is in debug mode, whose checks read device values on "
                                 "the host (a sync, which a CUDA graph cannot capture); build it without debug")
            if device.type != "cuda":
                raise RuntimeError(f"CapturedStep(mode='graph') needs the layer on a CUDA device (CUDA graphs); it is on "
                                   f"{device}. mode='eager' runs the same step without a graph")
        self.moe, self.num_tokens, self.mode = moe, num_tokens, mode
        H = moe.hidden
        self.x = torch.zeros(num_tokens, H, dtype=torch.bfloat16, device=device, requires_grad=True)
        self.dy = torch.zeros(num_tokens, H, dtype=torch.bfloat16, device=device)
        self.graph = None
        self._params = [p for p in moe.parameters() if p.requires_grad]
        self._ptrs = [p.data_ptr() for p in self._params]
        if mode == "eager":
            self.y = self.x_grad = None
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._step()
        torch.cuda.current_stream(device).wait_stream(side)
        # Gradients allocated inside the capture (the graph's own tensors, overwritten by every
        # replay); the MX weights quantized inside it (a replay sees in-place weight updates).
        # The cache entry built during the capture holds no values yet (a capture runs
        # nothing): dropped right after, so that an eager call rebuilds its own.
        for p in self._params:
            p.grad = None
        self.x.grad = None
        moe.clear_mx_weight_cache()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                y = moe(self.x)
                y.backward(self.dy)
        except RuntimeError as e:   # torch.AcceleratorError is one
            if "legacy stream" not in str(e) and "capture" not in str(e):
                raise
            raise RuntimeError(
                "CapturedStep: the CUDA-graph capture of the layer's step failed. The usual cause: an "
                "eager step of this layer ran on the default stream and its autograd graph is still "
                "referenced (e.g. its output y): the parameters' gradient accumulators stay bound to the "
                "default stream, which a capture cannot wait on (pytorch/pytorch#164302). Drop those "
                "references (del y) before building the CapturedStep, or build it before any eager "
                "step. The failed capture leaves this process's CUDA state unusable (restart it). "
                f"CUDA said: {e}") from e
        finally:
            moe.clear_mx_weight_cache()
        self.y = y.detach()
        self.x_grad = self.x.grad
        self._grads = [p.grad for p in self._params]

    def _step(self) -> torch.Tensor:
        for p in self._params:
            p.grad = None
        self.x.grad = None
        y = self.moe(self.x)
        y.backward(self.dy)
        return y

    def _check(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or tuple(t.shape) != tuple(self.x.shape):
            raise ValueError(f"{name} must be a bf16 [{self.num_tokens}, {self.moe.hidden}] tensor (the captured "
                             f"shape), got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.device != self.x.device:
            raise ValueError(f"{name} is on {t.device}, the captured step on {self.x.device}")

    def __call__(self, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One step: ``x`` / ``dy`` bf16 ``[n, H]`` copied into the static inputs, the graph
        replayed. Returns ``(y, x_grad)`` bf16 ``[n, H]`` (the static outputs, valid until the
        next call); the parameters' ``.grad`` hold this step's gradients."""
        self._check("x", x)
        self._check("dy", dy)
        for p, ptr in zip(self._params, self._ptrs):
            if p.data_ptr() != ptr:
                raise RuntimeError("CapturedStep: a parameter of the layer is a new tensor since the capture (p.data = "
                                   "..., .to(...), load into a new Parameter); the graph reads the old memory: "
                                   "capture again")
        with torch.no_grad():
            self.x.copy_(x)
            self.dy.copy_(dy)
        if self.graph is None:
            self.y = self._step().detach()
            self.x_grad = self.x.grad
            return self.y, self.x_grad
        self.graph.replay()
        self.moe.buffer._new_generation()   # a replay dispatches: earlier handles are stale
        for p, g in zip(self._params, self._grads):
            if p.grad is not g:   # (zero_grad(set_to_none=True) since the last call)
                p.grad = g
        return self.y, self.x_grad
