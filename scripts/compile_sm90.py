"""Compile every Triton kernel of mxep for Hopper (sm_90), exactly as the library launches it,
on a machine without a GPU.

Triton's bundled ptxas compiles for sm_90 anywhere; what a CPU run cannot do is reach the
launchers with a CUDA device. This script installs a stand-in Triton driver that reports an
sm_90 target, turns every launch into a compile-only ``warmup``, and then drives the real code
paths (simulated world dispatch / combine in both modes / bf16 dispatch, the standalone
quantize kernel) over several shapes with the GPU tuning and the hardware e4m3 conversion.
A kernel that the interpreter runs but the GPU compiler rejects (e.g. a layout-pass failure)
fails here, in CI, instead of on the device machine.

    python scripts/compile_sm90.py          # prints the kernels compiled; exit 1 on a failure

Must run in its own process without ``TRITON_INTERPRET`` (tests/test_sm90_compile.py does).
"""
from __future__ import annotations

import os
import re
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("compile_sm90.py needs TRITON_INTERPRET unset (it compiles real GPU code)")

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SM90 = GPUTarget("cuda", 90, 32)


class _CompileOnlyDriver(CudaDriver):
    """Answers what ``JITFunction.run`` asks before compiling; never touches CUDA."""

    def __init__(self):  # no CUDA initialisation
        self.utils = None

    def get_current_target(self):
        return SM90

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    @staticmethod
    def is_active():
        return True


# kernel name -> the atomics, fences and barriers in its PTX (every compiled variant): shows
# that the "flags" sync's release / acquire operations reach the machine code.
ORDERING: dict[str, set[str]] = {}


def install() -> list[str]:
    """Route every Triton launch to a compile for sm_90; returns the list of compiled names."""
    compiled: list[str] = []
    scanned: set[int] = set()
    triton_driver.set_active(_CompileOnlyDriver())
    original = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append(self.fn.__name__)
        if id(kernel) in scanned:   # launches of an already compiled variant: no PTX scan (host-cost runs)
            return kernel
        scanned.add(id(kernel))
        for op in set(re.findall(r"(?<![\w.])(?:(?:atom|red)\.[\w.]+|ld\.[\w.]*acquire[\w.]*|fence\.[\w.]+|bar\.sync)", kernel.asm["ptx"])):
            ORDERING.setdefault(self.fn.__name__, set()).add(op)
        return kernel

    JITFunction.run = compile_only
    return compiled


def drive() -> None:
    """Reach every launcher with GPU settings (outputs are garbage: nothing runs)."""
    import mxep.kernels.dispatch as kd
    import mxep.kernels.quantize as kq
    from mxep.comm.simulated import SimulatedWorld
    from mxep.kernels.quantize import mxfp8_quantize
    from mxep.kernels.rows import SYNC_MODES, TUNING
    from mxep.reference.routing import make_inputs, make_routing

    kq.use_hw_cast = kd.use_hw_cast = lambda x: True   # the GPU's e4m3 conversion path
    g = torch.Generator().manual_seed(0)
    # (world, experts, hidden, rows per rank, align): configs (a)/(c), (b), and awkward sizes
    for W, E, H, N, align in [(2, 256, 7168, 40, 32), (4, 16, 5120, 24, 128), (3, 9, 96, 13, 32),
                              (4, 256, 2048, 16, 32)]:
        counts = [make_routing(N, E, "uniform", g) for _ in range(W)]
        xs = [make_inputs(c, H, generator=g) for c in counts]
        for mode in ("rceil", "floor"):
            sim = SimulatedWorld(W, E, H, N, align, mode)
            res = sim.dispatch(xs, counts)
        # every sync mode: put_counts + plan; the plan kernel's two halves, the signalling pushes
        # and copy-outs, the one-program wait kernel of the zero-copy dispatch
        saved = TUNING["sync"]
        try:
            for sync in SYNC_MODES:
                TUNING["sync"] = sync
                fsim = SimulatedWorld(W, E, H, N, align)
                fres = fsim.dispatch(xs, counts)
                fsim.combine([torch.zeros(fsim.capacity, H, dtype=torch.bfloat16) for _ in range(W)],
                             [r.handle for r in fres], mode="push")
                fsim.dispatch(xs, counts, zero_copy=True)
        finally:
            TUNING["sync"] = saved
        handles = [r.handle for r in res]
        outs = [torch.zeros(sim.capacity, H, dtype=torch.bfloat16) for _ in range(W)]
        sim.combine(outs, handles, mode="push")
        sim.combine(outs, handles, mode="pull")
        sim.combine(sim.combine_inputs(), handles, mode="pull")
        sim.dispatch_bf16([torch.zeros(N, H, dtype=torch.bfloat16) for _ in range(W)], handles)
    # the grouped GEMM on a dispatch layout, with the GPU tiles and bf16 tensor-core dots
    from mxep.format.mxfp8 import to_mxfp8
    from mxep.kernels import grouped_gemm as gg

    toks = res[0].tokens
    w = torch.zeros(E // W, 96, H, dtype=torch.bfloat16)
    wq = to_mxfp8(w)   # MXFP8 weights (compile-only: the bytes are garbage, the shapes right)
    for tiles in gg.GPU_TILE_CANDIDATES:   # every configuration the sweep may make the default
        gg.grouped_mm_mxfp8_forward(toks.qdata, toks.scale, w, res[0].group_end_offsets, tiles=tiles,
                                    bf16_dot=True, pipeline=True)
        gg.grouped_mm_mxfp8_forward(toks.qdata, toks.scale, wq.qdata, res[0].group_end_offsets, tiles=tiles,
                                    bf16_dot=True, pipeline=True, weight_scale=wq.scale)
    from mxep.kernels.dequantize import dequantize_mxfp8_rows

    dequantize_mxfp8_rows(toks.qdata, toks.scale, res[0].group_end_offsets[-1:], decode="cvt")
    # SwiGLU + quantize and its backward, with the GPU tile and the hardware e4m3 path
    from mxep.kernels import swiglu as ks

    ks.INTERPRETER_TILE = ks.GPU_TILE
    hmid = torch.zeros(res[0].tokens.shape[0], 2 * 2048, dtype=torch.bfloat16)
    ks.swiglu_quantize_forward(hmid, res[0].group_end_offsets, "rceil", hw_cast=True)
    ks.swiglu_backward(hmid, torch.zeros(hmid.shape[0], 2048, dtype=torch.bfloat16), res[0].group_end_offsets)
    for shape in [(64, 7168), (33, 96), (16, 5120)]:   # with the GPU tiles, not the interpreter's
        for mode in ("rceil", "floor"):
            mxfp8_quantize(torch.randn(*shape).bfloat16(), mode, block_m=min(kq.GPU_BLOCK_M, 64),
                           block_k=min(kq.GPU_BLOCK_K, 1 << (shape[1] - 1).bit_length()))


def main() -> int:
    compiled = install()
    drive()
    names = sorted(set(compiled))
    print(f"compiled for sm_90: {len(compiled)} launches, kernels: {', '.join(names)}")
    for name in sorted(ORDERING):
        print(f"ordering ops in {name}: {' '.join(sorted(ORDERING[name]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
