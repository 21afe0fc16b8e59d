"""The GPU test suite in five concurrent pytest processes, so a cold device machine (every
Triton kernel variant compiled from scratch) finishes within one 10-minute call: 412 s on a
cold 4 x H200 machine (2026-11-27, commit 1abf67d, 141 tests) instead of more than 10 minutes
one after another.

  1. single-GPU tests (``-m gpu``): the quantize / dequantize kernels' on the next-to-last
     visible GPU, the others on the last;
  2. multi-GPU tests of the default sync (``-m multigpu -k "not flags"``) on all GPUs;
  3. multi-GPU tests of the "flags" sync, started 20 s later;
  4. multi-GPU tests of the "counts_flags" sync, started 40 s later.

Tests assert results, never timings, so sharing the GPUs changes nothing but speed. Each
process writes ``OUT/<name>.log``; the summary lines are printed at the end and the exit status
is non-zero if any process failed. ``make test-gpu`` runs this.

    python scripts/run_gpu_tests.py [--out gpu-test-logs] [--timeout 570]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu-test-logs")
    p.add_argument("--timeout", type=float, default=570.0, help="seconds for the whole suite")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    env["PYTHONPATH"] = os.path.join(ROOT, "src") + os.pathsep + env.get("PYTHONPATH", "")
    n = gpu_count()
    pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rf", os.path.join(ROOT, "tests")]
    quant = [os.path.join(ROOT, "tests", f) for f in ("test_mxfp8.py", "test_dequantize.py")]
    on = lambda i: {"CUDA_VISIBLE_DEVICES": str(max(n - i, 0))} if n else {}  # noqa: E731
    jobs = [("single-gpu-quantize", pytest[:-1] + quant + ["-m", "gpu"], on(2), 0),
            ("single-gpu", pytest + ["-m", "gpu"] + [f"--ignore={q}" for q in quant], on(1), 0),
            ("multi-gpu", pytest + ["-m", "multigpu", "-k", "not flags"], {}, 0),
            ("multi-gpu-flags", pytest + ["-m", "multigpu", "-k", "flags and not counts_flags"], {}, 20),
            ("multi-gpu-counts-flags", pytest + ["-m", "multigpu", "-k", "counts_flags"], {}, 40)]
    start, procs = time.monotonic(), []
    for name, cmd, extra, delay in jobs:
        time.sleep(delay)
        log = open(os.path.join(args.out, f"{name}.log"), "w")
        procs.append((name, subprocess.Popen(cmd, env=dict(env, **extra), stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for name, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1.0, args.timeout - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "killed (time limit)"
        log.close()
        lines = open(log.name).read().splitlines()
        summary = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR") or (
            ln.startswith("=") and any(w in ln for w in ("passed", "failed", "skipped", "error", "deselected")))]
        print(f"== {name}: rc {rc}")
        print("\n".join(summary[-15:]) or "\n".join(lines[-5:]))
        if rc != 0:
            failed.append(name)
    print(f"GPU tests: {'FAILED: ' + ', '.join(failed) if failed else 'all passed'} ({time.monotonic() - start:.0f} s, {n} GPUs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
