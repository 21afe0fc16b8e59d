"""Compile mxep's peer kernels for sm_90 on a machine without a GPU, as the launchers launch them
at config (a)'s shapes (H=7168, E=256, W=4), and print their global memory access widths (PTX
``st.global`` / ``ld.global`` variants) and ordering operations (atomics, acquire loads).

No device time needed: the launches go through ``scripts/compile_sm90.py``'s compile-only
driver (Triton's bundled ptxas), so the specializations and hints are the ones a GPU launch
gets. Usage::

    PYTHONPATH=src python scripts/inspect_ptx.py                  # TRITON_INTERPRET must be unset
    MXEP_TUNING='{"dispatch_block_k": 2048}' PYTHONPATH=src python scripts/inspect_ptx.py
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_sm90  # noqa: E402  (exits if TRITON_INTERPRET is set)

import torch  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

PATTERNS = {
    "stores": r"st\.global(?:\.\w+)*",
    "loads": r"ld\.global(?:\.\w+)*",
    "ordering": r"(?<![\w.])(?:atom\.[\w.]+|ld\.[\w.]*acquire[\w.]*|bar\.sync)",
}


def main() -> None:
    compile_sm90.install()
    seen: dict[str, dict[str, set[str]]] = {}
    compiled_run = JITFunction.run

    def run(self, *args, **kwargs):
        kernel = compiled_run(self, *args, **kwargs)
        ptx = kernel.asm["ptx"]
        per = seen.setdefault(self.fn.__name__, {k: set() for k in PATTERNS})
        for k, pat in PATTERNS.items():
            per[k].update(re.findall(pat, ptx))
        return kernel

    JITFunction.run = run

    import mxep.kernels.dispatch as kd
    import mxep.kernels.quantize as kq
    from mxep.comm.simulated import SimulatedWorld
    from mxep.kernels.rows import TUNING
    from mxep.reference.routing import make_inputs, make_routing

    kq.use_hw_cast = kd.use_hw_cast = lambda x: True   # the GPU's e4m3 conversion path
    W, E, H, N = 4, 256, 7168, 64
    g = torch.Generator().manual_seed(0)
    counts = [make_routing(N, E, "uniform", g) for _ in range(W)]
    xs = [make_inputs(c, H, generator=g) for c in counts]
    for sync in ("barrier", "flags"):
        TUNING["sync"] = sync
        sim = SimulatedWorld(W, E, H, N)
        res = sim.dispatch(xs, counts)
    handles = [r.handle for r in res]
    outs = [torch.zeros(sim.capacity, H, dtype=torch.bfloat16) for _ in range(W)]
    sim.combine(outs, handles, mode="push")
    sim.combine(sim.combine_inputs(), handles, mode="pull")
    print(f"sm_90 PTX at H={H}, E={E}, W={W}; tuning {dict(TUNING)}")
    for name in sorted(seen):
        print(f"{name}:")
        for k in PATTERNS:
            print(f"  {k:9s} {' '.join(sorted(seen[name][k]))}")


if __name__ == "__main__":
    main()
