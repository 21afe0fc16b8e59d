"""The host's share of a call: how many torch ops it dispatches and how many Triton kernels it
launches, and where in mxep each comes from (tests, ``scripts/host_cost.py``, docs/history.md).

A GPU step whose kernels are short waits for the host to issue them: every torch op costs the
host a few microseconds (more through autograd), every Triton launch some ten (argument
binding, the specialization key), whatever the tensors' sizes. Counting them is exact on any
machine, unlike timing, so the tests bound the counts of one :class:`mxep.MoE` forward +
backward (tests/moe/test_host_work.py) and ``scripts/host_cost.py --moe`` prints them beside the
host time.

* :func:`count_host_work`: a context manager that counts every op dispatched to torch (a
  ``TorchDispatchMode``: ATen ops and registered custom ops, and the ops inside a custom op's
  Python body) and every Triton launch (compiled or interpreted), each attributed to the
  innermost mxep function on the stack (``"autograd engine"`` for the ops autograd runs itself:
  its formulas, gradient accumulation). Ops that Triton's CPU interpreter runs inside a launch
  (its argument copies) are not counted: on a GPU they do not exist.
* :func:`moe_step` / :func:`count_moe_step`: one forward + backward of a layer, and its counts.
* :func:`use_local_symm_mem`: the GPU's world-1 transport (symmetric memory, no peer) on a
  CPU world of one, so that the counts on the CPU are the GPU path's.

Not on any hot path (it patches Triton's launchers while it counts).

Example (one process, gloo, ``TRITON_INTERPRET=1``)::

    >>> import torch.distributed as dist
    >>> from mxep.testing.launch import free_port
    >>> dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    >>> moe = mxep.MoE(hidden=64, ffn_hidden=32, num_experts=8, top_k=2, max_tokens_per_rank=16)
    >>> use_local_symm_mem(moe.buffer)
    >>> x, dy = torch.randn(16, 64).bfloat16(), torch.randn(16, 64).bfloat16()
    >>> work = count_moe_step(moe, x, dy)
    >>> work.num_ops > 0 and work.num_launches > 0
    True
    >>> work.table().splitlines()[0].endswith("Triton launches")   # then one line per call site
    True
    >>> dist.destroy_process_group()
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostWork", "count_host_work", "moe_step", "count_moe_step", "use_local_symm_mem"]

_MXEP_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../src/mxep
_TESTING_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass
class HostWork:
    """What one counted region did on the host.

    Attributes:
        ops: op name (``"aten.empty.memory_format"``, ``"mxep.swiglu_quantize.default"``) -> count.
        launches: Triton kernel name -> count.
        sites: ``(kind, name, where)`` -> count; ``kind`` ``"op"`` or ``"launch"``, ``where``
            the innermost mxep function (``"ep/buffer.py:dispatch_tokens"``) or
            ``"autograd engine"`` / ``"caller"``.
    """

    ops: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    launches: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    sites: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def num_launches(self) -> int:
        return sum(self.launches.values())

    def by_site(self) -> dict[str, tuple[int, int]]:
        """``where`` -> (ops, launches) there."""
        out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
        for (kind, _, where), n in self.sites.items():
            out[where][0 if kind == "op" else 1] += n
        return {k: (v[0], v[1]) for k, v in out.items()}

    def table(self, detail: bool = False) -> str:
        """A text table: per site, its ops and launches (``detail``: every op and kernel)."""
        lines = [f"{self.num_ops} torch ops, {self.num_launches} Triton launches"]
        if detail:
            for (kind, name, where), n in sorted(self.sites.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
                lines.append(f"  {n:4d} {kind:6s} {name:45s} {where}")
            return "\n".join(lines)
        for where, (ops, launches) in sorted(self.by_site().items(), key=lambda kv: -(kv[1][0] + 10 * kv[1][1])):
            lines.append(f"  {ops:4d} ops {launches:3d} launches  {where}")
        return "\n".join(lines)


def _where(depth: int = 2) -> str:
    """The innermost frame of mxep's own code (not this module's) on the stack, as
    ``"package/module.py:function"``; ``"caller"`` when none."""
    f = sys._getframe(depth)
    seen_torch = False
    while f is not None:
        fn = f.f_code.co_filename
        if fn.startswith(_MXEP_DIR) and not fn.startswith(_TESTING_DIR):
            return f"{os.path.relpath(fn, _MXEP_DIR)}:{f.f_code.co_name}"
        if "/torch/autograd/" in fn:
            seen_torch = True
        f = f.f_back
    return "autograd engine" if seen_torch else "caller"


class _Counter(TorchDispatchMode):
    # counts the eager path as it runs without a mode: mxep keeps calling its ops' bodies
    # directly under it (mxep._utils.runs_eagerly)
    mxep_transparent = True

    def __init__(self, work: HostWork, inside: list[int]):
        super().__init__()
        self.work, self.inside = work, inside

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.inside[0]:   # the interpreter's own ops inside a launch: not the host path's
            return func(*args, **kwargs)
        name = str(func)
        self.work.ops[name] += 1
        self.work.sites[("op", name, _where())] += 1
        from torch._library.custom_ops import OPDEFS
        opdef = OPDEFS.get(func.name().split(".")[0]) if func.namespace not in ("aten", "prim") else None
        if opdef is not None:
            # a registered custom op: run its Python body with this mode on, so that the ops and
            # launches inside count too (the mode is off while this method runs)
            with self:
                return opdef._init_fn(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_work():
    """Count the torch ops and Triton launches of the ``with`` block (this thread, and autograd's
    backward, which runs CPU work on the calling thread; on CUDA the engine's device thread
    inherits the mode). Yields a :class:`HostWork`, filled when the block exits. Not reentrant."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    work = HostWork()
    inside = [0]
    patched = []

    def wrap(cls):
        original = cls.run

        def run(self, *args, grid, warmup, **kwargs):
            if not warmup and not inside[0]:
                name = self.fn.__name__
                work.launches[name] += 1
                work.sites[("launch", name, _where())] += 1
            inside[0] += 1
            try:
                return original(self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                inside[0] -= 1

        run.__wrapped_by_host_cost__ = True
        if getattr(original, "__wrapped_by_host_cost__", False):
            raise RuntimeError("count_host_work is not reentrant")
        cls.run = run
        patched.append((cls, original))

    try:
        wrap(JITFunction)
        wrap(InterpretedFunction)
        with _Counter(work, inside):
            yield work
    finally:
        for cls, original in patched:
            cls.run = original


def moe_step(moe, x: torch.Tensor, dy: torch.Tensor, rebuild_cache: bool = False) -> torch.Tensor:
    """One training step's layer work: gradients set to None (``rebuild_cache``: the MX weight
    cache dropped first, as after an optimizer step), ``y = moe(x)`` (``x`` bf16 ``[n, H]``, a
    leaf that requires grad), ``y.backward(dy)`` (``dy`` bf16 ``[n, H]``). Returns ``y``."""
    for p in moe.parameters():
        p.grad = None
    x.grad = None
    if rebuild_cache:
        moe.clear_mx_weight_cache()
    y = moe(x)
    y.backward(dy)
    return y


def count_moe_step(moe, x: torch.Tensor, dy: torch.Tensor, rebuild_cache: bool = False,
                   warmup: int = 1) -> HostWork:
    """:class:`HostWork` of one :func:`moe_step` after ``warmup`` uncounted ones (compiles,
    first-call caches). ``x`` / ``dy`` bf16 ``[n, H]`` (``x`` is cloned into a leaf)."""
    x = x.detach().clone().requires_grad_(True)
    for _ in range(warmup):
        moe_step(moe, x, dy, rebuild_cache)
    with count_host_work() as work:
        moe_step(moe, x, dy, rebuild_cache)
    return work


def use_local_symm_mem(buffer) -> None:
    """Give a world-1 :class:`mxep.Buffer` the symmetric-memory transport over one plain
    allocation (``SymmMemTransport.over_local_memory``: barriers are no-ops): the transport a
    one-GPU world gets (NCCL), on the CPU. Raises unless the Buffer's group has one rank."""
    from mxep.ep.transport.symm_mem import SymmMemTransport

    if buffer.world_size != 1:
        raise ValueError(f"use_local_symm_mem needs a world of one, this Buffer has {buffer.world_size} ranks")
    buffer.transport = SymmMemTransport.over_local_memory(buffer.regions, buffer.config, device=buffer.device,
                                                          group=buffer.group)
