"""The GPU test suite on whatever GPUs are visible (``make test-gpu`` runs this).

Two concurrent pytest processes, so that a cold device machine (every Triton kernel variant
compiled from scratch) spends its compile time on both at once:

  1. ``single-gpu``: the single-GPU tests (``-m "gpu and not multigpu"``) on the last visible GPU,
     in up to 8 processes (pytest-xdist, where installed);
  2. ``multi-gpu``: the multi-GPU tests (``-m multigpu``: 2 and 4 ranks where possible) on every
     visible GPU, started only when two or more are visible (with one GPU, only 1. runs).

"Visible" means ``CUDA_VISIBLE_DEVICES`` where it is set, else every GPU ``nvidia-smi -L`` lists.
Tests assert results, never timings, so sharing a GPU changes nothing but speed. Each process
writes ``OUT/<name>.log``; the summary lines are printed at the end and the exit status is
non-zero if any process failed (or if no GPU is visible).

    python scripts/run_gpu_tests.py [--out gpu-test-logs] [--timeout 570] [-- PYTEST_ARGS...]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

from mxep.testing.launch import visible_gpus

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-test-logs", help="folder for the per-process logs")
    p.add_argument("--timeout", type=float, default=570.0, help="seconds for the whole suite")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments for both processes (after --)")
    args = p.parse_args()
    gpus = visible_gpus()
    if not gpus:
        print("run_gpu_tests: no GPU visible (CUDA_VISIBLE_DEVICES / nvidia-smi -L); the CPU suite is `make test`")
        return 1
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env.pop("TRITON_INTERPRET", None)   # the GPU suite compiles the kernels
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rf", os.path.join(ROOT, "tests")]
    pytest += args.pytest_args
    # The single-GPU tests in several processes on the one GPU where pytest-xdist is installed:
    # a cold run is mostly Triton compiling (CPU-bound). 8 processes on one H200: 165 tests in
    # 206 s, 2026-12-01 (docs/benchmarks.md).
    single = ["-m", "gpu and not multigpu"]
    if importlib.util.find_spec("xdist") is not None and "-n" not in args.pytest_args:
        single += ["-n", str(max(1, min(8, (os.cpu_count() or 2) // 2)))]
    jobs = [("single-gpu", pytest + single, {"CUDA_VISIBLE_DEVICES": gpus[-1]})]
    if len(gpus) >= 2:
        jobs.insert(0, ("multi-gpu", pytest + ["-m", "multigpu"], {"CUDA_VISIBLE_DEVICES": ",".join(gpus)}))
    print(f"GPU tests on {len(gpus)} visible GPU(s) ({','.join(gpus)}): {', '.join(name for name, _, _ in jobs)}",
          flush=True)
    start, procs = time.monotonic(), []
    for name, cmd, extra in jobs:
        log = open(os.path.join(args.out, f"{name}.log"), "w")
        procs.append((name, subprocess.Popen(cmd, env=dict(env, **extra), stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for name, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "killed (time limit)"
        log.close()
        with open(log.name) as f:
            lines = f.read().splitlines()
        summary = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR") or (
            ln.startswith("=") and any(w in ln for w in ("passed", "failed", "skipped", "error", "deselected")))]
        print(f"== {name}: rc {rc}")
        print("\n".join(summary[-15:]) or "\n".join(lines[-5:]))
        if rc != 0:
            failed.append(name)
    print(f"GPU tests: {'FAILED: ' + ', '.join(failed) if failed else 'all passed'} "
          f"({time.monotonic() - start:.0f} s, {len(gpus)} GPUs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
