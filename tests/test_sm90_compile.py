"""Every Triton kernel compiles for Hopper (sm_90) as the library launches it, with the GPU
tuning and the hardware e4m3 path: catches GPU-compiler failures that the CPU interpreter
cannot see (scripts/compile_sm90.py; Triton's bundled ptxas, no GPU needed). The script starts
in the background when the session does (tests/support/background.py). The kernels it must
compile are found here, not listed: every ``@triton.jit`` function named ``*_kernel`` in any
mxep module (a new kernel that the script does not reach fails this test)."""
import importlib
import pkgutil

from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from support import background

import mxep


def launched_kernels() -> dict[str, str]:
    """kernel name -> its module, for every ``@triton.jit`` function named ``*_kernel`` in every
    mxep module (each imported here; the ``@triton.jit`` helpers the kernels call have other
    names). Under ``TRITON_INTERPRET=1`` ``@triton.jit`` makes an ``InterpretedFunction``."""
    modules = [mxep] + [importlib.import_module(m.name) for m in pkgutil.walk_packages(mxep.__path__, "mxep.")]
    return {v.fn.__name__: v.fn.__module__ for mod in modules for v in vars(mod).values()
            if isinstance(v, (JITFunction, InterpretedFunction)) and v.fn.__name__.endswith("_kernel")}


def test_every_kernel_compiles_for_sm90(request):
    proc = background.result(request.node.nodeid, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    kernels = launched_kernels()
    assert len(kernels) >= 18, sorted(kernels)   # the 18 of 2026-12 (none lost by the discovery)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("compiled for sm_90: ")), None)
    assert line is not None, proc.stdout[-3000:]
    compiled = set(line.split("kernels: ", 1)[1].split(", "))
    missing = {name: mod for name, mod in kernels.items() if name not in compiled}
    assert not missing, f"not compiled for sm_90 (reach their launchers in scripts/compile_sm90.py drive()): {missing}"
    # The counts exchange of the plan kernel (mxep/ep/transport/symm_mem/sync.py) reaches the
    # machine code as system-scope release exchanges (the flags) and acquire loads (Triton turns
    # the polling atomic_add(ptr, 0) into one), with CTA barriers around them.
    ordering = {line.split(":")[0].split()[-1]: line.split(":")[1].split()
                for line in proc.stdout.splitlines() if line.startswith("ordering ops in ")}
    for name, needed in (("_plan_kernel", ("atom.global.sys.release.exch.b32", "ld.global.sys.acquire.b32")),):
        for op in needed + ("bar.sync",):
            assert op in ordering.get(name, ()), f"{name}: {op} missing from {ordering.get(name)}"
