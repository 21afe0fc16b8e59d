"""Same-machine A/B of EPConfig settings on one benchmark config (METHOD.md: the baseline in the
same run). A setting is a JSON object of EPConfig field overrides on top of
``mxep.default_config`` ('{}' = the defaults; format: ``benchmarks/bench_dispatch.py --help``);
``--grid FIELD=V1,V2,...`` (repeatable) adds every combination of the values given, a tile
field written ``dispatch.warps``. Nothing is read from the environment: each setting becomes
the ``config=`` of its own ``mxep.Buffer``.

Two ways to time them, on all visible GPUs:

* calls (default): one ``torchrun benchmarks/bench_dispatch.py --systems mxep,ceilings
  --patterns dispatch_mxfp8 --ep-config SETTING`` launch per setting. The table gives, per
  setting, the eager dispatch and the zero-copy dispatch (median µs, GB/s per rank, ratio to
  the NCCL all_to_all_single of the same bytes in that launch), that launch's NCCL and Triton
  peer-store ceilings, the combine right after a dispatch and the zero-copy combine, and with
  ``--graph-iters`` the CUDA-graph replays. The raw JSON of every launch stays in ``--out-dir``.
* ``--stages``: one torchrun launch of this script for all settings; per setting a Buffer with
  that config, and every stage of the dispatch and combine launched alone (the plan kernel, the
  push, the copy-out, the barrier, the combine push and copy-out, the pull) beside the full
  calls and a local ``to_mxfp8_rows`` (with the setting's ``hw_cast``), next to NCCL
  all_to_all_single of the same bytes. CUDA events around one call after a barrier and a
  device sync, so the host's launch latency is inside: good for ranking variants of one stage,
  not for publishing (that is ``make bench``). Writes ``stages.json``.

    python scripts/sweep_config.py --out-dir out/sweep '{}' '{"spread_parts": 32}' '{"dispatch": {"programs_per_sm": 16}}'
    python scripts/sweep_config.py --out-dir out/sweep --config c --graph-iters 10 '{}' --grid copy.warps=4,8
    python scripts/sweep_config.py --out-dir out/stages --stages '{}' --grid combine.block_m=1,2,4 --grid combine.warps=4,8
    python scripts/sweep_config.py --out-dir out/smoke --cpu-smoke '{}' '{"spread_parts": 4}'   # plumbing, no GPU
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys

from mxep.testing.cases import NVLINK_GBPS
from mxep.testing.overrides import parse_ep_config

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def grid_settings(grid: list[str]) -> list[dict]:
    """``["dispatch.warps=4,8", "spread_parts=8,16"]`` -> the 4 combinations as override dicts."""
    dims = []
    for item in grid:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid wants FIELD=V1,V2,... (FIELD or TILES.FIELD), got {item!r}")
        dims.append([(key.strip(), json.loads(v)) for v in values.split(",")])
    out = []
    for combo in (itertools.product(*dims) if dims else ()):
        setting: dict = {}
        for key, value in combo:
            field, _, sub = key.partition(".")
            if sub:
                setting.setdefault(field, {})[sub] = value
            else:
                setting[field] = value
        out.append(setting)
    return out


def settings_of(args) -> list[str]:
    """The settings as canonical JSON texts, each checked against EPConfig."""
    texts = [json.dumps(parse_ep_config(s), sort_keys=True) for s in args.settings]
    texts += [json.dumps(parse_ep_config(s), sort_keys=True) for s in grid_settings(args.grid)]
    if not texts:
        raise SystemExit("give at least one setting ('{}' = the defaults) or a --grid")
    return texts


def nproc(args) -> int:
    if args.nproc:
        return args.nproc
    if args.cpu_smoke:
        return 2
    import torch

    return torch.cuda.device_count()


def child_env(args) -> dict:
    env = dict(os.environ, **SAFE_ENV)
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.cpu_smoke:
        env["TRITON_INTERPRET"] = "1"
    return env


# ------------------------------------------------------------------------------------ calls mode
def sweep_calls(args, settings: list[str]) -> None:
    rows = []
    for i, setting in enumerate(settings):
        out = os.path.join(args.out_dir, f"setting{i}.json")
        if os.path.exists(out):
            os.remove(out)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc(args)}",
               os.path.join(ROOT, "benchmarks", "bench_dispatch.py"), "--out", out, "--systems", "mxep,ceilings",
               "--patterns", "dispatch_mxfp8", "--configs", args.config, "--routings", args.routing,
               "--iters", str(args.iters), "--warmup", "3", "--pipelined-iters", str(args.graph_iters),
               "--ep-config", setting] + (["--cpu-smoke"] if args.cpu_smoke else [])
        try:
            rc = subprocess.run(cmd, env=child_env(args), timeout=args.timeout, capture_output=True, text=True)
            note = f"rc {rc.returncode}" + ("" if rc.returncode == 0 else ": " + rc.stderr[-300:])
        except subprocess.TimeoutExpired:
            note = f"killed after {args.timeout:.0f} s"
        recs = json.load(open(out))["records"] if os.path.exists(out) else []
        by = {(r["system"], r["op"]): r for r in recs if not r.get("error")}
        nccl = by.get(("ceil_nccl", "dispatch_mxfp8"))
        row = {"setting": setting, "note": note}
        for op in ("dispatch", "dispatch_zero_copy", "dispatch_graph", "dispatch_zero_copy_graph",
                   "combine_after_dispatch", "combine_zero_copy"):
            r = by.get(("mxep", op))
            if r:
                row[op] = {"us": r["median_us"], "gbps": r["gbps"],
                           "vs_nccl": r["gbps"] / nccl["gbps"] if nccl and r.get("gbps") and op.startswith("dispatch") else None}
        for sysname in ("ceil_nccl", "ceil_triton"):
            r = by.get((sysname, "dispatch_mxfp8"))
            if r:
                row[sysname] = {"us": r["median_us"], "gbps": r["gbps"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n| setting | dispatch µs (GB/s, x NCCL) | zero-copy µs (GB/s, x NCCL, % of {NVLINK_GBPS:.0f}) "
          f"| NCCL same bytes µs | Triton peer stores µs | combine after dispatch µs | zero-copy combine µs "
          f"| graph replay µs (dispatch / zero-copy) |")
    print("|---|---|---|---|---|---|---|---|")

    def fmt(x):
        return f"{x['us']:.1f} ({x['gbps']:.0f}, {x['vs_nccl']:.3f}x)" if x and x.get("vs_nccl") else "-"

    for r in rows:
        d, z = r.get("dispatch"), r.get("dispatch_zero_copy")
        n, t = r.get("ceil_nccl"), r.get("ceil_triton")
        zz = fmt(z)[:-1] + f", {100 * z['gbps'] / NVLINK_GBPS:.0f}%)" if z and z.get("vs_nccl") else "-"
        comb = [f"{r[op]['us']:.1f}" if r.get(op) else "-" for op in ("combine_after_dispatch", "combine_zero_copy")]
        graphs = " / ".join(f"{r[op]['us']:.1f}" for op in ("dispatch_graph", "dispatch_zero_copy_graph") if r.get(op))
        ceils = " | ".join(f"{c['us']:.1f}" if c else "-" for c in (n, t))
        note = "" if r["note"] == "rc 0" else f" {r['note']}"
        print(f"| `{r['setting']}` | {fmt(d)} | {zz} | {ceils} | {comb[0]} | {comb[1]} | {graphs or '-'} |{note}")
    with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)


# ----------------------------------------------------------------------------------- stages mode
def sweep_stages(args, settings: list[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc(args)}",
           os.path.abspath(__file__), "--worker", "--out-dir", args.out_dir, "--config", args.config,
           "--routing", args.routing, "--iters", str(args.iters)] + settings
    rc = subprocess.run(cmd, env=child_env(args), timeout=args.timeout)
    if rc.returncode:
        raise SystemExit(f"stages launch failed: rc {rc.returncode}")


def stages_worker(args, settings: list[str]) -> None:
    """One rank of the ``--stages`` launch (torchrun)."""
    import torch
    import torch.distributed as dist

    import mxep
    from mxep.format.quantize import to_mxfp8_rows
    from mxep.testing.cases import CONFIGS, count_matrix, make_case
    from mxep.testing.overrides import ep_config, ep_config_dict

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    cfg = CONFIGS[args.config]
    H, E, n = cfg.hidden, cfg.experts, cfg.rows
    case = make_case(cfg, args.routing, world, rank, device, seed=0)
    x, counts = case.x, case.counts
    counts_i32 = counts.to(torch.int32)
    C = count_matrix(cfg, args.routing, world, 0)
    L = E // world
    sent_rows = n - int(C.view(world, world, L)[rank, rank].sum())    # rows to other ranks
    recv_other = int(C.view(world, world, L)[:, rank].sum()) - int(C.view(world, world, L)[rank, rank].sum())
    mx_row, bf_row = H + H // 32, 2 * H

    def timed(fn, iters=args.iters, warmup=5):
        # a barrier and a device sync before every call (warm-up too): consecutive calls never
        # overlap across ranks, so stages may be launched out of the protocol's order
        ts = []
        for i in range(warmup + iters):
            dist.barrier()
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            if i >= warmup:
                ts.append(a.elapsed_time(b) * 1e3)
        t = torch.tensor([statistics.median(ts)], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    results = []
    names = None
    for setting in settings:
        config = ep_config(setting, device, H)
        buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=n, config=config)
        eo = torch.randn(buf.capacity, H, device=device).bfloat16()
        with torch.no_grad():
            res = buf.dispatch(x, counts)
            plan, peer = res.handle.state, buf.transport
            mx_out = peer.push_mxfp8(x, plan, "rceil")          # output tensors reused by the stage timings
            cb_out = peer.push_bf16_combine(eo, plan, n)
            zin = buf.combine_input()
            last = {"res": res}   # the latest dispatch: a combine takes its handle
            stages = [
                # (name, fn, bytes for the GB/s column: sent to other ranks, or local read + write)
                ("full dispatch", lambda: buf.dispatch(x, counts), sent_rows * mx_row),
                ("zero-copy dispatch", lambda: buf.dispatch(x, counts, zero_copy=True), sent_rows * mx_row),
                ("full combine (push)", lambda: buf.combine(eo, last["res"].handle), sent_rows * bf_row),
                ("zero-copy combine (pull)", lambda: buf.combine(zin, last["res"].handle), sent_rows * bf_row),
                ("plan kernel (counts exchange + plan)", lambda: peer.exchange_and_plan(counts_i32, n, buf.align), 0),
                ("dispatch push (quantize + peer stores)", lambda: peer.push_mxfp8(x, plan, "rceil"), sent_rows * mx_row),
                ("dispatch copy-out (rows from other ranks)", lambda: peer.copy_out_mxfp8(plan, mx_out),
                 2 * recv_other * mx_row),
                ("symm barrier", lambda: buf.transport._barrier(), 0),
                ("combine push", lambda: peer.push_bf16_combine(eo, plan, n), recv_other * bf_row),
                ("combine copy-out", lambda: peer.copy_out_combine(plan, cb_out), 2 * sent_rows * bf_row),
                ("pull combine kernel", lambda: peer.pull_combine(plan, n), sent_rows * bf_row),
                (f"to_mxfp8_rows local (hw_cast={config.hw_cast})", lambda: to_mxfp8_rows(x, hw_cast=config.hw_cast),
                 n * H * (2 + 1 + 1 / 32)),
            ]
            zin.copy_(eo)
            row = {"setting": setting, "config": ep_config_dict(config), "symm_bytes": buf.symm_bytes, "stages": {}}
            for name, fn, nbytes in stages:
                last["res"] = buf.dispatch(x, counts)   # untimed: the stages before dispatched again
                us = timed(fn)
                row["stages"][name] = {"us": us, "gbps": nbytes / us / 1e3 if nbytes else None}
            try:
                buf.check("the stage timings")
                row["status"] = "ok"
            except RuntimeError as exc:   # stage launches out of order may leave the status word set
                row["status"] = str(exc)
        names = [s[0] for s in stages]
        results.append(row)
        del buf, res, mx_out, cb_out, zin, eo
        torch.cuda.empty_cache()
    # NCCL all_to_all_single moving the dispatch's bytes to other ranks (equal splits)
    nccl = None
    if world > 1:
        total = max(sent_rows * mx_row // (world - 1), 1) * world
        send = torch.empty(total, dtype=torch.uint8, device=device)
        recv = torch.empty_like(send)
        us = timed(lambda: dist.all_to_all_single(recv, send))
        nccl = {"us": us, "gbps": total * (world - 1) / world / us / 1e3}
    if rank == 0:
        print(f"# {torch.cuda.get_device_name()} x{world}, config ({cfg.name}) {args.routing}: H={H}, n={n}, E={E}; "
              "µs per call (GB/s per rank)"
              + (f"; NCCL all_to_all_single of the dispatch's bytes: {nccl['us']:.1f} µs ({nccl['gbps']:.0f})"
                 if nccl else ""))
        print("| stage | " + " | ".join(f"`{r['setting']}`" for r in results) + " |")
        print("|---|" + "---|" * len(results))
        for name in names:
            cells = []
            for r in results:
                st = r["stages"][name]
                cells.append(f"{st['us']:.1f}" + (f" ({st['gbps']:.0f})" if st["gbps"] else ""))
            print(f"| {name} | " + " | ".join(cells) + " |")
        print("| status word | " + " | ".join(r["status"] for r in results) + " |")
        with open(os.path.join(args.out_dir, "stages.json"), "w") as f:
            json.dump({"world": world, "config": cfg.name, "routing": args.routing, "nccl_same_bytes": nccl,
                       "results": results}, f, indent=1)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("settings", nargs="*", help="EPConfig override JSON objects ('{}' = the defaults)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="add every combination of these values (FIELD or TILES.FIELD, e.g. dispatch.warps=4,8)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--stages", action="store_true", help="time each stage alone, all settings in one launch")
    p.add_argument("--config", default="a", help="benchmark config a, b or c")
    p.add_argument("--routing", default="uniform", choices=("uniform", "skewed"))
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--graph-iters", type=int, default=0,
                   help="calls mode: back-to-back CUDA-graph replays per sample (0: none; the latency config needs them)")
    p.add_argument("--timeout", type=float, default=150.0, help="seconds per launch")
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: the visible GPUs; 2 with --cpu-smoke)")
    p.add_argument("--cpu-smoke", action="store_true", help="calls mode on CPU: gloo, TRITON_INTERPRET=1, tiny shapes")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    if args.worker:
        stages_worker(args, args.settings)
        return
    settings = settings_of(args)
    if args.stages:
        if args.cpu_smoke:
            raise SystemExit("--stages needs CUDA GPUs (symmetric memory); --cpu-smoke is for the calls mode")
        sweep_stages(args, settings)
    else:
        sweep_calls(args, settings)


if __name__ == "__main__":
    main()
