"""Host cost of issuing one dispatch / combine, measured on a CPU machine (no GPU).

What it measures: mxep's Python work plus Triton's launch path (argument binding, cache-key
lookup), i.e. everything the host does per call except the CUDA driver's launch itself and the
symmetric-memory barriers. How: the compile-only Triton driver of ``scripts/compile_sm90.py``
(every launch compiles once for sm_90, then returns without running) and a symmetric-memory
transport whose "peers" are one plain CPU allocation (barriers are no-ops). The outputs are
garbage; the host path is the real one. On a GPU machine use ``scripts/profile_host.py``.

    python scripts/host_cost_cpu.py     # TRITON_INTERPRET must be unset
"""
from __future__ import annotations

import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_sm90  # noqa: E402  (exits if TRITON_INTERPRET is set)

compile_sm90.install()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mxep  # noqa: E402
import mxep.kernels.dispatch as kd  # noqa: E402
import mxep.kernels.quantize as kq  # noqa: E402
from mxep.comm.transport import SymmMemTransport  # noqa: E402
from mxep.kernels.rows import SYNC_MODES, TUNING  # noqa: E402


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    kq.use_hw_cast = kd.use_hw_cast = lambda x: True   # the GPU's code path
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29591", rank=0, world_size=1)
    E, H, N = 256, 7168, 1024   # config (c)'s shapes
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N)
    buf.transport = SymmMemTransport.over_local_memory(buf.regions, group=buf.group)   # symm-mem phases, CPU memory
    counts = torch.full((E,), N // E)
    x = torch.randn(N, H).bfloat16().requires_grad_(True)
    print(f"dispatch (autograd)  {per_call_us(lambda: buf.dispatch(x, counts)):7.1f} us host per call")
    with torch.no_grad():
        print(f"dispatch (no_grad)   {per_call_us(lambda: buf.dispatch(x, counts)):7.1f} us")
        saved = TUNING["sync"]
        for sync in (m for m in SYNC_MODES if m != saved):
            TUNING["sync"] = sync
            print(f"dispatch (no_grad, sync={sync}) {per_call_us(lambda: buf.dispatch(x, counts)):7.1f} us "
                  f"(barriers here cost no host time, so this shows only the launches saved)")
        TUNING["sync"] = saved
        res = buf.dispatch(x, counts)
        eo = torch.zeros(buf.capacity, H).bfloat16()
        print(f"combine (no_grad)    {per_call_us(lambda: buf.combine(eo, res.handle)):7.1f} us")
    if "--profile" in sys.argv:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            buf.dispatch(x, counts)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
