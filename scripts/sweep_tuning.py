"""Same-machine A/B of dispatch tuning knobs (``MXEP_TUNING``) on one config, with the NCCL and
Triton peer-store ceilings of each launch beside them (METHOD.md: the baseline in the same run).

    python scripts/sweep_tuning.py --out-dir out/sweep '{}' '{"spread_parts": 32}' '{"programs_per_sm": 8}'

Each setting is one ``torchrun benchmarks/bench_dispatch.py --systems mxep,ceilings`` launch on
all visible GPUs (config and routing from the flags); the table gives, per setting, the eager
dispatch and the zero-copy dispatch (median µs, GB/s per rank) and their ratio to the NCCL
all_to_all_single of the same bytes in that launch. The raw JSON of every launch stays in
``--out-dir``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NVLINK_GBPS = 450.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="+", help="MXEP_TUNING JSON objects ('{}' = the defaults)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--config", default="a")
    p.add_argument("--routing", default="uniform")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--graph-iters", type=int, default=0,
                   help="back-to-back CUDA-graph replays per sample of the graph ops (0: none; the latency config needs them)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per launch")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: the visible GPUs)")
    p.add_argument("--cpu-smoke", action="store_true", help="plumbing check on CPU (TRITON_INTERPRET=1)")
    args = p.parse_args()
    import torch

    ngpu = args.nproc or torch.cuda.device_count()
    os.makedirs(args.out_dir, exist_ok=True)
    rows = []
    for i, setting in enumerate(args.settings):
        json.loads(setting)   # fail here, not in the workers
        out = os.path.join(args.out_dir, f"setting{i}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ngpu}",
               os.path.join(ROOT, "benchmarks", "bench_dispatch.py"), "--out", out, "--systems", "mxep,ceilings",
               "--patterns", "dispatch_mxfp8", "--configs", args.config, "--routings", args.routing,
               "--iters", str(args.iters), "--warmup", "3", "--pipelined-iters", str(args.graph_iters)] + (["--cpu-smoke"] if args.cpu_smoke else [])
        env = dict(os.environ, MXEP_TUNING=setting)
        try:
            rc = subprocess.run(cmd, env=env, timeout=args.timeout, capture_output=True, text=True)
            note = f"rc {rc.returncode}" + ("" if rc.returncode == 0 else ": " + rc.stderr[-300:])
        except subprocess.TimeoutExpired:
            note = f"killed after {args.timeout:.0f} s"
        recs = json.load(open(out))["records"] if os.path.exists(out) else []
        by = {(r["system"], r["op"]): r for r in recs if not r.get("error")}
        nccl = by.get(("ceil_nccl", "dispatch_mxfp8"))
        row = {"setting": setting, "note": note}
        for op in ("dispatch", "dispatch_zero_copy", "dispatch_graph", "dispatch_zero_copy_graph"):
            r = by.get(("mxep", op))
            if r:
                row[op] = {"us": r["median_us"], "gbps": r["gbps"],
                           "vs_nccl": r["gbps"] / nccl["gbps"] if nccl else None}
        for sysname in ("ceil_nccl", "ceil_triton"):
            r = by.get((sysname, "dispatch_mxfp8"))
            if r:
                row[sysname] = {"us": r["median_us"], "gbps": r["gbps"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| setting | dispatch µs (GB/s, x NCCL) | zero-copy µs (GB/s, x NCCL, % of {NVLINK_GBPS:.0f}) "
          f"| NCCL same bytes µs | Triton peer stores µs | graph replay µs (dispatch / zero-copy) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        d, z = r.get("dispatch"), r.get("dispatch_zero_copy")
        n, t = r.get("ceil_nccl"), r.get("ceil_triton")
        fmt = lambda x: f"{x['us']:.1f} ({x['gbps']:.0f}, {x['vs_nccl']:.3f}x)" if x and x.get("vs_nccl") else "-"  # noqa: E731
        zz = fmt(z)[:-1] + f", {100 * z['gbps'] / NVLINK_GBPS:.0f}%)" if z and z.get("vs_nccl") else "-"
        graphs = " / ".join(f"{r[op]['us']:.1f}" for op in ("dispatch_graph", "dispatch_zero_copy_graph") if r.get(op))
        print(f"| `{r['setting']}` | {fmt(d)} | {zz} | {n['us']:.1f} | {t['us']:.1f} | {graphs or '-'} |" if n and t else
              f"| `{r['setting']}` | {fmt(d)} | {zz} | - | - | {graphs or '-'} | {r['note']}")
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
