"""Every Triton kernel compiles for Hopper (sm_90) as the library launches it, with the GPU
tuning and the hardware e4m3 path: catches GPU-compiler failures that the CPU interpreter
cannot see (scripts/compile_sm90.py; Triton's bundled ptxas, no GPU needed). The script starts
in the background when the session does (tests/support/background.py)."""
from support import background

KERNELS = ("_combine_gather_kernel", "_combine_push_kernel", "_copy_out_kernel", "_dispatch_push_kernel",
           "_to_mxfp8_kernel", "_plan_kernel", "_grouped_mm_mxfp8_kernel",
           "_swiglu_quantize_kernel", "_swiglu_backward_kernel", "_dequantize_kernel")


def test_every_kernel_compiles_for_sm90(request):
    proc = background.result(request.node.nodeid, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name in KERNELS:
        assert name in proc.stdout, f"{name} was not compiled:\n{proc.stdout}"
    # The counts exchange of the plan kernel (mxep/ep/transport/symm_mem/sync.py) reaches the
    # machine code as system-scope release exchanges (the flags) and acquire loads (Triton turns
    # the polling atomic_add(ptr, 0) into one), with CTA barriers around them.
    ordering = {line.split(":")[0].split()[-1]: line.split(":")[1].split()
                for line in proc.stdout.splitlines() if line.startswith("ordering ops in ")}
    for name, needed in (("_plan_kernel", ("atom.global.sys.release.exch.b32", "ld.global.sys.acquire.b32")),):
        for op in needed + ("bar.sync",):
            assert op in ordering.get(name, ()), f"{name}: {op} missing from {ordering.get(name)}"
