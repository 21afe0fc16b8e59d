"""Per-kernel device time of one fused dispatch and one combine (torchrun, all visible GPUs).

    torchrun --nproc_per_node=4 scripts/profile_stages.py [--config a,c] [--iters 10] [--zero-copy]
        [--ep-config '{"dispatch": {"warps": 4}}']

For each config, every rank runs ``iters`` dispatch + combine calls under ``torch.profiler``
(CUDA activity only) and rank 0 prints, per kernel, the number of launches per call and the mean
device time: which stage the time goes to (dispatch: the plan kernel, which exchanges the counts
and plans in one launch, the push, the barrier, the copy-out; combine: push, barrier, copy-out,
or barrier + pull for the zero-copy input). The sum of kernel times is not the call's time
(barrier kernels and the plan's counts wait take as long as the slowest peer, and launch gaps
are not kernels); the call's time is in the benchmarks (docs/benchmarks.md). ``--ep-config``:
EPConfig field overrides for the Buffers (as benchmarks/bench_dispatch.py takes them).
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import mxep
from mxep.testing import make_inputs, make_routing
from mxep.testing.cases import CONFIGS
from mxep.testing.overrides import ep_config, parse_ep_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="a,c", help="comma list of benchmark configs a, b, c")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--zero-copy", action="store_true", help="also one zero-copy (pull) combine per call")
    ap.add_argument("--ep-config", default="{}", help="EPConfig field overrides (JSON)")
    args = ap.parse_args()
    overrides = parse_ep_config(args.ep_config)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    for name in args.config.split(","):
        cfg = CONFIGS[name]
        H, E, n = cfg.hidden, cfg.experts, cfg.rows
        g = torch.Generator().manual_seed(rank)
        counts = make_routing(n, E, "uniform", g)
        x = make_inputs(counts, H, generator=g).cuda()
        counts = counts.cuda()
        buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=n,
                          config=ep_config(overrides, torch.device("cuda"), H))
        expert_out = torch.randn(buf.capacity, H, device="cuda").bfloat16()
        with torch.no_grad():
            for _ in range(3):
                res = buf.dispatch(x, counts)
                buf.combine(expert_out, res.handle)
            torch.cuda.synchronize()
            dist.barrier()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(args.iters):
                    res = buf.dispatch(x, counts)
                    buf.combine(expert_out, res.handle)
                    if args.zero_copy:   # the expert outputs already in the Buffer's region
                        buf.combine(buf.combine_input(), res.handle)
                torch.cuda.synchronize()
        rows = []
        for ev in prof.key_averages():
            dev_us = getattr(ev, "device_time_total", None)
            if dev_us is None:
                dev_us = ev.cuda_time_total
            if dev_us <= 0:
                continue
            rows.append((ev.key[:70], ev.count / args.iters, dev_us / max(ev.count, 1), dev_us / args.iters))
        rows.sort(key=lambda r: -r[3])
        table = [rows]
        gathered = [None] * world
        dist.all_gather_object(gathered, table)
        if rank == 0:
            print(f"\n## config ({name}): H={H}, n={n}, E={E}, world {world}, "
                  f"{torch.cuda.get_device_name()}; dispatch + combine, {args.iters} calls; {buf.config}")
            print(f"{'kernel':70s} {'per call':>8s} {'mean us':>9s} {'us/call':>9s}   (rank 0; us/call on ranks 1..)")
            others = [dict((k, t) for k, _, _, t in tbl[0]) for tbl in gathered[1:]]
            for k, c, mean, per_call in rows:
                rest = " ".join(f"{o.get(k, 0.0):8.1f}" for o in others)
                print(f"{k:70s} {c:8.1f} {mean:9.1f} {per_call:9.1f}   {rest}")
        del buf
        torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
