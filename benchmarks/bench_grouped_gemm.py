#!/usr/bin/env python
"""GPU benchmark of the grouped GEMM on the dispatch layout (``mxep.grouped_mm_mxfp8``, forward).

For every shape (rows received per rank, local experts, K, N), measured in the same run on the
same card, on one dispatch layout (uniform routing, groups padded to 32 rows):
  * mxep: the Triton kernel, MXFP8 tokens dequantized in registers, bf16 tensor cores;
  * unfused: ``dequantize_mxfp8`` into a bf16 tensor, then ``torch._grouped_mm`` (what a
    Hopper user does without the fused kernel);
  * bf16 only: ``torch._grouped_mm`` on an already dequantized bf16 copy (the bf16 GEMM alone,
    a reference point, not a ceiling);
  * agreement: relative error of mxep against the unfused result (the same math up to fp32
    summation order).
TFLOP/s = 2 * rows * N * K / time. Timing: CUDA events around every call, warm-up first,
median over ``--iters`` calls (``bench_quantize.time_calls``).

Usage: ``python benchmarks/bench_grouped_gemm.py [--sweep] [--out benchmarks/results/grouped_gemm.json]``
(``--sweep``: every candidate tile configuration of the kernel, bf16 and MXFP8 weights.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
try:
    import mxep  # noqa: F401
except ImportError:  # run from a checkout without PYTHONPATH=src
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from bench_quantize import time_calls  # noqa: E402

import mxep  # noqa: E402
from mxep.format.mxfp8 import dequantize_mxfp8  # noqa: E402
from mxep.reference.layout import simulate_dispatch_layout  # noqa: E402
from mxep.reference.routing import make_routing  # noqa: E402

# (rows received on this rank, local experts, K, N): config (a) at world 4 (up-projection and
# down-projection of a 2048-wide expert), config (b) at world 4, config (c) at world 4.
DEFAULT_SHAPES = [(32768, 64, 7168, 2048), (32768, 64, 2048, 7168), (8192, 4, 5120, 8192), (1024, 64, 7168, 2048)]


def make_layout(rows: int, L: int, K: int, align: int = 32):
    counts = make_routing(rows, L, "uniform", torch.Generator().manual_seed(0))
    lay = simulate_dispatch_layout([counts], align)[0]
    cap = lay.num_rows
    x = torch.randn(cap, K, device="cuda", dtype=torch.bfloat16)
    x[lay.is_pad.cuda()] = 0
    tokens = mxep.to_mxfp8(x)
    return tokens, lay.group_end_offsets.cuda(), cap


def time_us(fn, iters: int, warmup: int) -> float:
    return statistics.median(time_calls(lambda _: fn(), [None], iters, warmup)) * 1e3


def sweep(args) -> dict:
    """Every ``GPU_TILE_CANDIDATES`` entry on every shape, bf16 and MXFP8 weights, in one run;
    each result checked against the unfused path (relative error) before it is timed."""
    from mxep.kernels.grouped_gemm import GPU_TILE_CANDIDATES, grouped_mm_mxfp8_forward

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for rows, L, K, N in DEFAULT_SHAPES:
        tokens, offs, cap = make_layout(rows, L, K)
        w = (torch.randn(L, N, K, device="cuda") / K ** 0.5).bfloat16()
        wq = mxep.to_mxfp8(w)
        flops = 2.0 * cap * N * K
        for wname, weight, wscale in (("bf16", w, None), ("mx", wq.qdata, wq.scale)):
            wd = (w if wscale is None else dequantize_mxfp8(wq.qdata, wq.scale)).transpose(1, 2)   # [L, K, N]
            ref = torch._grouped_mm(dequantize_mxfp8(tokens.qdata, tokens.scale), wd, offs=offs).float()
            R = int(offs[-1])
            base = time_us(lambda: torch._grouped_mm(dequantize_mxfp8(tokens.qdata, tokens.scale), wd, offs=offs),
                           args.iters, args.warmup)
            line = {"rows": cap, "experts": L, "K": K, "N": N, "weights": wname, "unfused_us": base, "tiles": []}
            for t in GPU_TILE_CANDIDATES:
                def fn(t=t):
                    return grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, weight, offs, tiles=t, weight_scale=wscale)
                try:
                    got = fn().float()
                    err = float((got[:R] - ref[:R]).norm() / ref[:R].norm())
                    us = time_us(fn, args.iters, args.warmup) if err < 1e-2 else None
                    line["tiles"].append({"tiles": list(t), "us": us, "tflops": flops / us / 1e6 if us else None,
                                          "rel_err": err})
                except Exception as exc:  # noqa: BLE001  (record and go on)
                    line["tiles"].append({"tiles": list(t), "error": f"{type(exc).__name__}: {exc}"[:200]})
            out["rows"].append(line)
            best = sorted([x for x in line["tiles"] if x.get("us")], key=lambda x: x["us"])
            print(f"# {cap}x{K} -> {N}, L={L}, {wname} weights: unfused {base:.0f} us", flush=True)
            for x in line["tiles"]:
                tag = f"{x['us']:.0f} us {x['tflops']:.0f} TF err {x['rel_err']:.1e}" if x.get("us") else x.get("error", x)
                print(f"   {x['tiles']}: {tag}", flush=True)
            if best:
                print(f"   best {best[0]['tiles']}: {best[0]['us']:.0f} us ({base / best[0]['us']:.2f}x unfused)", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--sweep", action="store_true", help="time every GPU_TILE_CANDIDATES entry instead")
    args = p.parse_args()
    if args.sweep:
        results = sweep(args)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        return
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for rows, L, K, N in DEFAULT_SHAPES:
        tokens, offs, cap = make_layout(rows, L, K)
        w = (torch.randn(L, N, K, device="cuda") / K ** 0.5).bfloat16()
        wt = w.transpose(1, 2)
        x_bf16 = dequantize_mxfp8(tokens.qdata, tokens.scale)
        flops = 2.0 * cap * N * K
        row = {"rows": cap, "experts": L, "K": K, "N": N}
        fns = {
            "mxep": lambda _: mxep.grouped_mm_mxfp8(tokens, w, offs),
            "unfused": lambda _: torch._grouped_mm(dequantize_mxfp8(tokens.qdata, tokens.scale), wt, offs=offs),
            "bf16_only": lambda _: torch._grouped_mm(x_bf16, wt, offs=offs),
        }
        for name, fn in fns.items():
            try:
                ms = statistics.median(time_calls(fn, [None], args.iters, args.warmup))
                row[name] = {"median_us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12}
            except Exception as exc:  # noqa: BLE001  (record and go on: one failing system must not lose the rest)
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        try:
            a, b = mxep.grouped_mm_mxfp8(tokens, w, offs).float(), fns["unfused"](None).float()
            R = int(offs[-1])
            row["rel_err_vs_unfused"] = float((a[:R] - b[:R]).norm() / b[:R].norm())
        except Exception as exc:  # noqa: BLE001
            row["rel_err_vs_unfused"] = f"{type(exc).__name__}: {exc}"[:300]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
