"""Quick tuning run for the fused dispatch kernels (torchrun, all visible GPUs).

SECTIONS=push,combine (env) picks the block-shape sweeps; the pull combine and full calls always run.
H, TOKENS, TOPK, EXPERTS (env) pick the shape; config (b) is H=5120 TOKENS=8192 TOPK=1 EXPERTS=16.
Times buf.dispatch / buf.combine on config (a) by default (H=7168, 4096 tokens x top-8 of 256 experts)
for several kernel block shapes, next to NCCL all_to_all_single of the same bytes. The full,
published comparison is benchmarks/ (make bench); this is the knob-turning companion.
"""
import os
import statistics

import torch
import torch.distributed as dist

import mxep
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
    H, tokens = int(os.environ.get("H", 7168)), int(os.environ.get("TOKENS", 4096))
    topk, E = int(os.environ.get("TOPK", 8)), int(os.environ.get("EXPERTS", 256))
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
    import mxep.kernels.quantize as kq
    peer = buf.transport.peer
    plan = res.handle.plan
    defaults = dict(TUNING)
    mx_out = peer.push_mxfp8(x, plan, "rceil")       # output tensors reused by the stage timings
    cb_out = peer.push_bf16_combine(expert_out, plan, n)
    with torch.no_grad():
        rows.append(("plan (put counts + barrier + plan kernel)", timed(lambda: buf.plan(counts, n)), 0))
        rows.append(("copy-out of received rows", timed(lambda: peer.copy_out_mxfp8(plan, mx_out)), 0))
        rows.append(("symm barrier", timed(lambda: buf.transport._barrier()), 0))
        sections = os.environ.get("SECTIONS", "push,combine").split(",")
        # Push: tile x warps x programs per SM.
        for per_sm, warps in ([(16, 8), (16, 4), (32, 4), (24, 4)] if "push" in sections else []):
            TUNING.update(programs_per_sm=per_sm, dispatch_warps=warps)
            for bm, bk in [(1, 2048), (2, 4096), (1, 8192), (2, 8192)]:
                TUNING.update(dispatch_block_m=bm, dispatch_block_k=bk)
                t = timed(lambda: peer.push_mxfp8(x, plan, "rceil"))
                rows.append((f"push_mxfp8 sm*{per_sm} w{warps} bm={bm} bk={bk}", t, mx_bytes / t / 1e3))
            TUNING.clear(); TUNING.update(defaults)
        # Combine push (owner-row walk) and copy-out.
        for per_sm, warps in ([(16, 8), (8, 8), (16, 4), (32, 4)] if "combine" in sections else []):
            TUNING.update(programs_per_sm=per_sm, combine_warps=warps, copy_warps=warps)
            for bm, bn in [(4, 1024), (2, 2048), (1, 8192), (8, 512), (2, 1024)]:
                TUNING.update(combine_block_m=bm, combine_block_n=bn)
                t = timed(lambda: peer.push_bf16_combine(expert_out, plan, n))
                rows.append((f"combine push sm*{per_sm} w{warps} bm={bm} bn={bn}", t, sent_rows * 2 * H / t / 1e3))
            for bm, bn in [(8, 1024), (4, 2048), (2, 8192)]:
                TUNING.update(copy_block_m=bm, copy_block_n=bn)
                t = timed(lambda: peer.copy_out_mxfp8(plan, mx_out))
                rows.append((f"copy-out sm*{per_sm} w{warps} bm={bm} bn={bn}", t, 2 * n * H * 1.03 / t / 1e3))
            TUNING.clear(); TUNING.update(defaults)
        t = timed(lambda: peer.copy_out_combine(plan, cb_out))
        rows.append(("combine copy-out (rows from other owners)", t, 2 * n * H * 2 / t / 1e3))
        # Pull combine: the source-side kernel alone, then the full combine in each mode.
        for per_sm, warps in [(16, 8), (16, 4), (32, 4), (8, 8)]:
            TUNING.update(programs_per_sm=per_sm, pull_warps=warps)
            for bm, bn in [(1, 8192), (2, 4096), (4, 1024)]:
                TUNING.update(pull_block_m=bm, pull_block_n=bn)
                t = timed(lambda: peer.pull_combine(plan, n))
                rows.append((f"pull kernel sm*{per_sm} w{warps} bm={bm} bn={bn}", t, sent_rows * 2 * H / t / 1e3))
            TUNING.clear(); TUNING.update(defaults)
        t = timed(lambda: peer.stage_combine_input(expert_out, plan))
        rows.append(("pull: staging copy into own region", t, 2 * n * H * 2 / t / 1e3))
        for mode in ("push", "pull"):
            TUNING["combine_mode"] = mode
            t = timed(lambda: buf.combine(expert_out, res.handle))
            rows.append((f"full combine mode={mode}", t, sent_rows * 2 * H / t / 1e3))
        TUNING.clear(); TUNING.update(defaults)
        zin = buf.combine_input()
        zin.copy_(expert_out)
        t = timed(lambda: buf.combine(zin, res.handle))
        rows.append(("full combine zero-copy input", t, sent_rows * 2 * H / t / 1e3))
        TUNING.clear(); TUNING.update(defaults)
        for hw in (True, False):
            kq.HW_CAST_ON_GPU = hw
            t = timed(lambda: peer.push_mxfp8(x, plan, "rceil"))
            rows.append((f"push_mxfp8 defaults hw_cast={hw}", t, mx_bytes / t / 1e3))
            t = timed(lambda: mxep.to_mxfp8(x))
            rows.append((f"to_mxfp8 local hw_cast={hw} (GB/s=rd+wr)", t, n * H * (2 + 1 + 1 / 32) / t / 1e3))
        kq.HW_CAST_ON_GPU = True
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
