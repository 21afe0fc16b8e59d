"""Quick tuning run for the fused dispatch kernels (torchrun, all visible GPUs).

Times buf.dispatch / buf.combine on config (a) (H=7168, 4096 tokens x top-8 of 256 experts)
for several kernel block shapes, next to NCCL all_to_all_single of the same bytes. The full,
published comparison is benchmarks/ (make bench); this is the knob-turning companion.
"""
import os
import statistics

import torch
import torch.distributed as dist

import mxep
import mxep.kernels.dispatch as kd
import mxep.kernels.rows as kr
from mxep.reference.routing import make_inputs, make_routing


def timed(fn, iters=20, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3)
    t = torch.tensor([statistics.median(ts)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main():
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank % torch.cuda.device_count())
    H, tokens, topk, E = int(os.environ.get("H", 7168)), int(os.environ.get("TOKENS", 4096)), 8, 256
    n = tokens * topk
    g = torch.Generator().manual_seed(rank)
    counts = make_routing(n, E, "uniform", g)
    x = make_inputs(counts, H, generator=g).cuda()
    counts = counts.cuda()
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=n)
    res = buf.dispatch(x, counts)
    L = E // world
    sent_rows = n - int(counts.view(world, L)[rank].sum())
    mx_bytes = sent_rows * (H + H // 32)
    expert_out = torch.randn(buf.capacity, H, device="cuda").bfloat16()
    torch.cuda.synchronize()

    rows = []
    from mxep.kernels.rows import TUNING
    import mxep.comm.peer_memory as pm
    peer = buf.transport.peer
    h = res.handle
    routes = h.routes()
    lay = h.layout
    with torch.no_grad():
        rows.append(("plan (counts exchange + layout)", timed(lambda: buf.plan(counts, n)), 0))
        rows.append(("copy-out of received rows", timed(lambda: peer.copy_out_mxfp8(h.end)), 0))
        rows.append(("symm barrier", timed(lambda: buf.transport._barrier()), 0))
    orig_mx, orig_rows = kd.push_rows_mxfp8, kr.push_rows
    for per_sm, warps in [(4, 4), (8, 4), (16, 4), (32, 4), (8, 8), (16, 8)]:
        TUNING.update(programs_per_sm=per_sm, num_warps=warps)
        for bm, bk in [(4, 512), (8, 256), (2, 1024)]:
            pm.push_rows_mxfp8 = lambda *a, bm=bm, bk=bk, **k: orig_mx(*a, block_m=bm, block_k=bk, **k)
            with torch.no_grad():
                t = timed(lambda: peer.push_mxfp8(x, lay.dest_rank[rank], lay.dest_row[rank], "rceil"))
            rows.append((f"push_mxfp8 only sm*{per_sm} w{warps} bm={bm} bk={bk}", t, mx_bytes / t / 1e3))
        for bm, bn in [(8, 512), (4, 1024)]:
            pm.push_rows = lambda *a, bm=bm, bn=bn, **k: orig_rows(*a, block_m=bm, block_n=bn, **k)
            t = timed(lambda: peer.push_bf16_combine(expert_out, routes.src_rank, routes.src_row, h.end))
            rows.append((f"push_bf16 only sm*{per_sm} w{warps} bm={bm} bn={bn}", t, sent_rows * 2 * H / t / 1e3))
    pm.push_rows_mxfp8, pm.push_rows = orig_mx, orig_rows
    import mxep.kernels.quantize as kq
    for hw in (True, False):
        kq.HW_CAST_ON_GPU = hw
        TUNING.update(programs_per_sm=8, num_warps=4)
        with torch.no_grad():
            t = timed(lambda: peer.push_mxfp8(x, lay.dest_rank[rank], lay.dest_row[rank], "rceil"))
            rows.append((f"push_mxfp8 only sm*8 w4 hw_cast={hw}", t, mx_bytes / t / 1e3))
            t = timed(lambda: mxep.to_mxfp8(x))
            rows.append((f"to_mxfp8 local hw_cast={hw} (GB/s=rd+wr)", t, n * H * (2 + 1 + 1 / 32) / t / 1e3))
    kq.HW_CAST_ON_GPU = True
    TUNING.update(programs_per_sm=int(os.environ.get("PER_SM", 4)), num_warps=int(os.environ.get("WARPS", 4)))
    with torch.no_grad():
        t = timed(lambda: buf.dispatch(x, counts))
        rows.append(("full dispatch (defaults)", t, mx_bytes / t / 1e3))
        t = timed(lambda: buf.combine(expert_out, res.handle))
        rows.append(("full combine (defaults)", t, sent_rows * 2 * H / t / 1e3))
    send = torch.empty(n * (H + H // 32) // world * world, dtype=torch.uint8, device="cuda")
    recv = torch.empty_like(send)
    t = timed(lambda: dist.all_to_all_single(recv, send))
    rows.append(("nccl a2a same total bytes (uniform)", t, send.numel() * (world - 1) / world / t / 1e3))
    with torch.no_grad():
        t = timed(lambda: mxep.to_mxfp8(x))
    rows.append(("to_mxfp8 local (GB/s = read+write)", t, n * H * 3.03 / t / 1e3))
    if rank == 0:
        print(f"# {torch.cuda.get_device_name()} x{world}, H={H}, n={n}, E={E}, symm bytes/rank {buf.symm_bytes/2**30:.2f} GiB")
        for name, t, gbs in rows:
            print(f"{name:45s} {t:9.1f} us  {gbs:7.1f} GB/s per rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
