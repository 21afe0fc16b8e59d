"""Compile mxep's peer kernels for sm_90 on a machine without a GPU, as the launchers launch them
(default: config (a)'s shapes, H=7168, E=256, W=4), and print their global memory access widths
(PTX ``st.global`` / ``ld.global`` variants), their e4m3 conversions and their ordering
operations (atomics, acquire loads, CTA barriers).

No device time needed: the launches go through ``scripts/compile_sm90.py``'s compile-only
driver (Triton's bundled ptxas) with an H200's grid sizes, so the specializations and hints are
the ones a GPU launch gets. Kernel settings come from ``--ep-config`` (EPConfig field overrides,
as benchmarks/bench_dispatch.py takes them). Usage::

    PYTHONPATH=src python scripts/inspect_ptx.py                  # TRITON_INTERPRET must be unset
    PYTHONPATH=src python scripts/inspect_ptx.py --ep-config '{"dispatch": {"block_n": 2048}}'
"""
from __future__ import annotations

import argparse
import dataclasses
import re

PATTERNS = {
    "stores": r"st\.global(?:\.\w+)*",
    "loads": r"ld\.global(?:\.\w+)*",
    "e4m3 cvt": r"cvt\.rn\.satfinite\.e4m3x2\.f32|cvt\.rn\.bf16x2\.e4m3x2|cvt\.\w+\.f16x2\.e4m3x2",
    "ordering": r"(?<![\w.])(?:atom\.[\w.]+|ld\.[\w.]*acquire[\w.]*|bar\.sync)",
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--rows", type=int, default=64, help="rows per rank (the shapes, not the sizes, set the code)")
    p.add_argument("--ep-config", default="{}", help="EPConfig field overrides (JSON)")
    args = p.parse_args()

    import compile_sm90   # exits if TRITON_INTERPRET is set

    compile_sm90.install()
    from triton.runtime.jit import JITFunction

    seen: dict[str, dict[str, set[str]]] = {}
    compiled_run = JITFunction.run

    def run(self, *a, **kw):
        kernel = compiled_run(self, *a, **kw)
        ptx = kernel.asm["ptx"]
        per = seen.setdefault(self.fn.__name__, {k: set() for k in PATTERNS})
        for k, pat in PATTERNS.items():
            per[k].update(re.findall(pat, ptx))
        return kernel

    JITFunction.run = run

    from mxep.testing.overrides import ep_config, parse_ep_config

    base = ep_config(parse_ep_config(args.ep_config), "cuda", args.hidden)
    config = compile_sm90.sm90_config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
    W, E, H, N = args.world, args.experts, args.hidden, args.rows
    compile_sm90.drive_transport([(W, E, H, N, 32)], config, scale_modes=("rceil",))
    print(f"sm_90 PTX at H={H}, E={E}, W={W}; {config}")
    for name in sorted(seen):
        print(f"{name}:")
        for k in PATTERNS:
            print(f"  {k:9s} {' '.join(sorted(seen[name][k])) or '-'}")


if __name__ == "__main__":
    main()
