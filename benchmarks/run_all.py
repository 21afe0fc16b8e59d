"""Run the whole benchmark suite on the visible GPUs (`make bench`), then merge and report.

    python benchmarks/run_all.py                       # all configs, every visible GPU (+ world 2 if >= 4)
    python benchmarks/run_all.py --quick --out-dir $OUT/bench
    python benchmarks/run_all.py --cpu-smoke           # CPU plumbing check: gloo, TRITON_INTERPRET=1

For each world size it launches (one process group per launch)::

    python -m torch.distributed.run --standalone --nproc_per_node=W benchmarks/bench_dispatch.py ...
    python -m torch.distributed.run --standalone --nproc_per_node=W benchmarks/bench_nvshmem.py ...

with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (never NVLink
multicast), then merges the per-launch JSON files into ``<out-dir>/results.json`` and writes
``results.md`` and ``results.png``. A launch that fails or runs past its time share is recorded
(return code, last lines of its stderr) and the suite goes on.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time

import report  # no torch import: the report can be rebuilt anywhere

from mxep.testing.cases import CONFIGS, NVLINK_GBPS
from mxep.testing.launch import visible_gpus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DISPATCH_SYSTEMS = ("mxep", "mxep_tokens", "unfused_mxfp8", "nccl_bf16", "ceilings")
ALL_SYSTEMS = DISPATCH_SYSTEMS + ("nvshmem",)


def _pump(stream, sink, echo: bool, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sink.write(line)
        sink.flush()
        if echo:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    stream.close()


def launch(name: str, script: str, world: int, script_args: list[str], env: dict, timeout: float,
           log_dir: str) -> dict:
    """One torchrun launch; stdout echoed (rank 0 progress), stderr kept in a log file."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           os.path.join(HERE, script)] + script_args
    out_log = os.path.join(log_dir, f"{name}.out.log")
    err_log = os.path.join(log_dir, f"{name}.err.log")
    print(f"\n>>> [{name}] {' '.join(cmd)}  (time limit {timeout:.0f} s)", flush=True)
    t0 = time.time()
    note = None
    with open(out_log, "w") as fo, open(err_log, "w") as fe:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        threads = [threading.Thread(target=_pump, args=(proc.stdout, fo, True, ""), daemon=True),
                   threading.Thread(target=_pump, args=(proc.stderr, fe, False, ""), daemon=True)]
        for t in threads:
            t.start()
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            note = f"killed after {timeout:.0f} s (time limit)"
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)  # the launch's own process group (torchrun and its ranks)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=15)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
        for t in threads:
            t.join(timeout=10)
    secs = time.time() - t0
    tail = None
    if rc != 0:
        with open(err_log) as f:
            lines = [ln.rstrip() for ln in f if ln.strip() and not ln.startswith("*")]
        tail = lines[-25:]
        print(f"<<< [{name}] rc={rc} {note or ''}; last stderr lines:\n    " + "\n    ".join(tail[-8:]), flush=True)
    else:
        print(f"<<< [{name}] done in {secs:.0f} s", flush=True)
    return {"name": name, "script": script, "world": world, "cmd": cmd, "rc": rc, "seconds": secs, "note": note,
            "stderr_tail": tail, "stdout_log": out_log, "stderr_log": err_log}


def nvshmem_heap_bytes(configs: list[str], world: int) -> int:
    from bench_nvshmem import symm_bytes_needed

    need = sum(symm_bytes_needed(CONFIGS[c], world) for c in configs)
    gib = 2**30
    return (need + gib - 1) // gib * gib + gib


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--configs", default="a,b,c", help="comma list of a,b,c")
    p.add_argument("--routings", default="uniform,skewed")
    p.add_argument("--systems", default=",".join(ALL_SYSTEMS), help=f"comma list of {','.join(ALL_SYSTEMS)}")
    p.add_argument("--patterns", default="dispatch_mxfp8,dispatch_bf16,combine_bf16", help="ceiling traffic patterns")
    p.add_argument("--worlds", default=None, help="comma list of world sizes (default: all visible GPUs, plus 2 if >= 4)")
    p.add_argument("--iters", type=int, default=None, help="timed samples per measurement (default 50; --quick 20)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 5; --quick 3)")
    p.add_argument("--pipelined-iters", type=int, default=None, help="back-to-back calls per pipelined sample "
                   "(default 20; --quick 10; 0 = off)")
    p.add_argument("--quick", action="store_true", help="fewer samples: the whole suite in about 3 minutes on 4 GPUs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds for all launches together; launches that would start later are skipped")
    p.add_argument("--launch-timeout", type=float, default=300.0, help="seconds per bench_dispatch launch at most")
    p.add_argument("--nvshmem-timeout", type=float, default=150.0, help="seconds per bench_nvshmem launch at most")
    p.add_argument("--cpu-smoke", action="store_true", help="2 gloo ranks on CPU, tiny shapes, TRITON_INTERPRET=1")
    p.add_argument("--ep-config", default="{}", help="EPConfig field overrides (JSON) for mxep's Buffers, "
                   "passed to bench_dispatch.py (see its --help); '{}': the defaults")
    args = p.parse_args()
    json.loads(args.ep_config)   # a typo fails here, not in every launch (bench_dispatch.py checks the fields)

    iters = args.iters if args.iters is not None else (20 if args.quick else 50)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    piters = args.pipelined_iters if args.pipelined_iters is not None else (10 if args.quick else 20)
    systems = [s for s in args.systems.split(",") if s]
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown systems {unknown}")
    configs = [c for c in args.configs.split(",") if c]
    gpus = [] if args.cpu_smoke else visible_gpus()
    if not args.cpu_smoke and not gpus:
        raise SystemExit("run_all.py needs a CUDA GPU and sees none (CUDA_VISIBLE_DEVICES / nvidia-smi -L); "
                         "--cpu-smoke runs the CPU plumbing check")

    out_dir = os.path.abspath(args.out_dir)
    raw_dir, log_dir = os.path.join(out_dir, "raw"), os.path.join(out_dir, "logs")
    os.makedirs(raw_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)

    if args.worlds:
        worlds = [int(w) for w in args.worlds.split(",")]
    elif args.cpu_smoke:
        worlds = [2]
    else:
        worlds = [len(gpus)] + ([2] if len(gpus) >= 4 else [])
    print(f"visible GPUs: {gpus or 'none'}; worlds: {worlds}; configs {configs}; systems {systems}; "
          f"iters {iters} (+{warmup} warm-up), pipelined {piters}", flush=True)

    common = ["--configs", args.configs, "--routings", args.routings, "--iters", str(iters), "--warmup", str(warmup),
              "--pipelined-iters", str(piters), "--seed", str(args.seed)]
    if args.cpu_smoke:
        common.append("--cpu-smoke")
    # Every bench_dispatch launch first, the NVSHMEM launches (most likely to fail or hang) last.
    plan = []
    ok_worlds = []
    for w in worlds:
        if not args.cpu_smoke and (w < 2 or w > len(gpus)):
            plan.append(("skip", w, f"world {w} needs 2..{len(gpus)} visible GPUs"))
        else:
            ok_worlds.append(w)
    dsys = [s for s in systems if s in DISPATCH_SYSTEMS]
    if dsys:
        plan += [("bench_dispatch.py", w, ["--systems", ",".join(dsys), "--patterns", args.patterns,
                                           "--ep-config", args.ep_config]) for w in ok_worlds]
    if "nvshmem" in systems:
        plan += [("bench_nvshmem.py", w, ["--pg-timeout", str(min(args.nvshmem_timeout, 300.0))]) for w in ok_worlds]

    t_start = time.time()
    launches, raw_files = [], []
    for script, w, extra in plan:
        if script == "skip":
            launches.append({"name": f"world{w}", "world": w, "rc": None, "note": extra})
            continue
        name = f"{script.split('.')[0].replace('bench_', '')}_w{w}"
        left = args.time_budget - (time.time() - t_start)
        if left < 30:
            launches.append({"name": name, "world": w, "rc": None, "note": "skipped: time budget spent"})
            print(f"--- [{name}] skipped: time budget spent", flush=True)
            continue
        env = dict(os.environ)
        env.update(SAFE_ENV)
        env["PYTHONPATH"] = os.path.join(ROOT, "src") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if args.cpu_smoke:
            env["TRITON_INTERPRET"] = "1"
        elif w < len(gpus):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[:w])
        if script == "bench_nvshmem.py" and not args.cpu_smoke and "NVSHMEM_SYMMETRIC_SIZE" not in os.environ:
            try:
                env["NVSHMEM_SYMMETRIC_SIZE"] = str(nvshmem_heap_bytes(configs, w))
            except Exception as exc:  # noqa: BLE001
                print(f"(could not size the NVSHMEM heap: {exc})")
        out = os.path.join(raw_dir, f"{name}.json")
        if os.path.exists(out):
            os.remove(out)
        limit = args.nvshmem_timeout if script == "bench_nvshmem.py" else args.launch_timeout
        info = launch(name, script, w, common + extra + ["--out", out], env, min(limit, left - 10), log_dir)
        info["json"] = out
        launches.append(info)
        raw_files.append((info, out))

    # ---- merge
    merged = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu_smoke": args.cpu_smoke,
              "args": {"iters": iters, "warmup": warmup, "pipelined_iters": piters, "configs": configs,
                       "routings": args.routings, "systems": systems, "worlds": worlds, "seed": args.seed,
                       "ep_config_overrides": json.loads(args.ep_config)},
              "env": None, "configs": {}, "timing": None, "nvlink_gbps": NVLINK_GBPS, "records": [], "launches": launches,
              "total_seconds": time.time() - t_start}
    for info, path in raw_files:
        if not os.path.exists(path):
            info["note"] = (info.get("note") or "") + " no JSON written"
            continue
        with open(path) as f:
            data = json.load(f)
        if not data.get("finished"):
            info["note"] = (info.get("note") or "") + " JSON incomplete (launch ended early)"
        if data.get("error"):
            info["note"] = (info.get("note") or "") + f" {data['error']}"
        merged["env"] = merged["env"] or data.get("env")
        merged["configs"].update(data.get("configs") or {})
        merged["timing"] = merged["timing"] or data.get("timing")
        merged["ep_config"] = merged.get("ep_config") or data.get("ep_config")
        merged["nvlink_gbps"] = data.get("nvlink_gbps", merged["nvlink_gbps"])
        if data.get("nvshmem"):
            merged.setdefault("nvshmem", {})[f"w{info['world']}"] = data["nvshmem"]
        for r in data.get("records", []):
            r["launch"] = info["name"]
            merged["records"].append(r)
    res_json = os.path.join(out_dir, "results.json")
    with open(res_json, "w") as f:
        json.dump(merged, f, indent=1, default=str)
    paths = report.write_report(merged, out_dir)
    print(f"\nwrote {res_json}, {paths['markdown']}, plot: {paths['plot']}  "
          f"(total {time.time() - t_start:.0f} s)\n", flush=True)
    # the summary table last: the end of the output is what a remote run shows
    with open(paths["markdown"]) as f:
        text = f.read()
    start = text.find("## Summary")
    end = text.find("## All measurements")
    if start >= 0:
        print(text[start:end if end > start else None])
    errs = {}
    for r in merged["records"]:
        if r.get("error"):
            errs.setdefault((r.get("system"), r["error"][:300]), []).append(
                f"w{r.get('world')}/{r.get('config')}/{r.get('routing')}/{r.get('op')}")
    if errs:
        print(f"{sum(len(v) for v in errs.values())} measurements failed (full strings in results.md / results.json):")
        for (system, e), where in errs.items():
            print(f"  {system} x{len(where)} (e.g. {where[0]}): {e}")
    failed = [la for la in launches if la.get("rc") not in (0, None)]
    for la in failed:
        print(f"launch {la['name']} failed: rc={la['rc']} {la.get('note') or ''}")
    return 1 if failed or not merged["records"] else 0


if __name__ == "__main__":
    sys.exit(main())
