"""Host-side cost of one dispatch/combine call (1 GPU, a 1-rank NCCL group, symmetric memory).

The fused path never waits on the GPU, so the host only has to issue launches; if issuing costs
more than the GPU work (small batches), the host becomes the limit. This prints the host time
per call of each stage and a cProfile of the full call.
"""
import cProfile
import os
import pstats
import time

import torch
import torch.distributed as dist

import mxep


def host_us(fn, iters=200):
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t) / iters * 1e6
    torch.cuda.synchronize()
    return dt


def main():
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29555")
    dist.init_process_group("nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    E, H, n = 8, 7168, 1024
    counts = torch.full((E,), n // E, device="cuda")
    x = torch.randn(n, H, device="cuda").bfloat16()
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=n)
    res = buf.dispatch(x, counts)
    out = torch.randn(buf.capacity, H, device="cuda").bfloat16()
    peer = buf.transport.peer
    plan = res.handle.plan
    mx_out = peer.push_mxfp8(x, plan, "rceil")
    with torch.no_grad():
        rows = [
            ("full dispatch", lambda: buf.dispatch(x, counts)),
            ("full combine", lambda: buf.combine(out, res.handle)),
            ("plan (put_counts + barrier + plan kernel)", lambda: buf.plan(counts, n)),
            ("put_counts launch", lambda: peer.put_counts(counts.int())),
            ("plan kernel launch", lambda: peer.plan(32)),
            ("symm barrier", lambda: buf.transport._barrier()),
            ("push_mxfp8 launch", lambda: peer.push_mxfp8(x, plan, "rceil")),
            ("copy_out_mxfp8 (1 launch)", lambda: peer.copy_out_mxfp8(plan, mx_out)),
            ("combine push launch", lambda: peer.push_bf16_combine(out, plan, n)),
            ("MXFP8Tensor construction", lambda: mxep.MXFP8Tensor(res.tokens.qdata, res.tokens.scale)),
            ("torch.empty_like", lambda: torch.empty_like(x)),
        ]
        for name, fn in rows:
            print(f"{name:45s} {host_us(fn):8.1f} us host/call")
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            buf.dispatch(x, counts)
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(22)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
