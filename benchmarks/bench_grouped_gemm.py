#!/usr/bin/env python
"""GPU benchmark of the grouped GEMM on the dispatch layout (``mxep.grouped_mm_mxfp8``, forward).

For every shape (rows received per rank, local experts, K, N), measured in the same run on the
same card, on one dispatch layout (uniform routing, groups padded to 32 rows; the last row of
the table again with a worst-case-sized layout, 4x the rows, garbage past the end):
  * mxep: the public op's default (``impl="dequant"``: the one-pass Triton dequantize kernel,
    stopping at the last group end, then ``torch._grouped_mm``); the dequantize kernel alone;
  * mxep fused: ``impl="fused"``, the Triton grouped GEMM that dequantizes in registers;
  * the same three with MXFP8 weights (``mx_weights_*``);
  * unfused: ``dequantize_mxfp8`` into a bf16 tensor, then ``torch._grouped_mm`` (what a
    Hopper user does without the fused kernel);
  * bf16 only: ``torch._grouped_mm`` on an already dequantized bf16 copy (the bf16 GEMM alone,
    a reference point, not a ceiling);
  * ``mxep_over_bf16_only_rounds``: mxep's time over bf16 only's, three rounds, each timed
    back to back;
  * agreement: relative error of mxep against the unfused result (the same math up to fp32
    summation order).
TFLOP/s = 2 * rows * N * K / time (rows: the layout's, not the capacity). Timing: CUDA events around every call, warm-up first,
median over ``--iters`` calls (``bench_quantize.time_calls``).

Usage: ``python benchmarks/bench_grouped_gemm.py [--sweep] [--out benchmarks/results/grouped_gemm.json]``
(``--sweep``: every candidate tile configuration of the kernel, bf16 and MXFP8 weights.)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from bench_quantize import time_calls

import mxep
from mxep.ep.naive import simulate_dispatch_layout
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.naive import dequantize_mxfp8_reference
from mxep.testing import make_routing, rel_err

# (rows received on this rank, local experts, K, N): the MoE layer's DSv3-like world-1 shape
# (4096 tokens x top-8 over 32 experts: 32896 padded rows, the up-projection), config (a) at
# world 4 (up-projection and down-projection of a 2048-wide expert), config (b) at world 4,
# config (c) at world 4.
DEFAULT_SHAPES = [(32768, 32, 7168, 2048), (32768, 64, 7168, 2048), (32768, 64, 2048, 7168), (8192, 4, 5120, 8192),
                  (1024, 64, 7168, 2048)]


def make_layout(rows: int, L: int, K: int, slack: int = 0, align: int = 32):
    """A uniform-routing layout of ``rows`` rows, plus ``slack`` rows of garbage bytes past its
    end (a Buffer's layout is sized for the worst case; nothing may read those rows)."""
    counts = make_routing(rows, L, "uniform", torch.Generator().manual_seed(0))
    lay = simulate_dispatch_layout([counts], align)[0]
    x = torch.randn(lay.num_rows, K, device="cuda", dtype=torch.bfloat16)
    x[lay.is_pad.cuda()] = 0
    t = mxep.to_mxfp8(x)
    if slack:
        q = torch.cat([t.qdata.view(torch.uint8), torch.randint(0, 256, (slack, K), dtype=torch.uint8, device="cuda")])
        s = torch.cat([t.scale.view(torch.uint8), torch.randint(0, 256, (slack, K // 32), dtype=torch.uint8, device="cuda")])
        t = MXFP8Tensor(q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu), torch.bfloat16)
    return t, lay.group_end_offsets.cuda(), t.shape[0]


def time_us(fn, iters: int, warmup: int) -> float:
    return statistics.median(time_calls(lambda _: fn(), [None], iters, warmup)) * 1e3


def sweep(args) -> dict:
    """Every ``GPU_TILE_CANDIDATES`` entry on every shape, bf16 and MXFP8 weights, in one run;
    each result checked against the unfused path (relative error) before it is timed."""
    from mxep.gemm.grouped_gemm import GPU_TILE_CANDIDATES, grouped_mm_mxfp8_forward

    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    for rows, L, K, N in DEFAULT_SHAPES:
        tokens, offs, cap = make_layout(rows, L, K)
        w = (torch.randn(L, N, K, device="cuda") / K ** 0.5).bfloat16()
        wq = mxep.to_mxfp8(w)
        flops = 2.0 * cap * N * K
        for wname, weight, wscale in (("bf16", w, None), ("mx", wq.qdata, wq.scale)):
            wd = (w if wscale is None else dequantize_mxfp8_reference(wq.qdata, wq.scale)).transpose(1, 2)   # [L, K, N]
            ref = torch._grouped_mm(dequantize_mxfp8_reference(tokens.qdata, tokens.scale), wd, offs=offs).float()
            R = int(offs[-1])
            base = time_us(lambda: torch._grouped_mm(dequantize_mxfp8_reference(tokens.qdata, tokens.scale), wd, offs=offs),
                           args.iters, args.warmup)
            line = {"rows": cap, "experts": L, "K": K, "N": N, "weights": wname, "unfused_us": base, "tiles": []}
            for t in GPU_TILE_CANDIDATES:
                def fn(t=t):
                    return grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, weight, offs, tiles=t, weight_scale=wscale)
                try:
                    got = fn().float()
                    err = rel_err(got[:R], ref[:R])
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
    from mxep.format.dequantize import dequantize_mxfp8_rows
    from mxep.gemm.grouped_gemm import GPU_TILES

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "fused_tiles": list(GPU_TILES),
               "rows": []}
    for (rows, L, K, N), slack in [(s, 0) for s in DEFAULT_SHAPES] + [(DEFAULT_SHAPES[0], 3 * DEFAULT_SHAPES[0][0])]:
        tokens, offs, cap = make_layout(rows, L, K, slack)
        R = int(offs[-1])
        w = (torch.randn(L, N, K, device="cuda") / K ** 0.5).bfloat16()
        wq = mxep.to_mxfp8(w)
        wt = w.transpose(1, 2)
        # the unfused flow knows its row count (it synced on the counts): it dequantizes R rows
        qR, sR = tokens.qdata[:R], tokens.scale[:R]
        x_bf16 = dequantize_mxfp8_reference(qR, sR)
        flops = 2.0 * R * N * K
        row = {"rows": R, "capacity": cap, "experts": L, "K": K, "N": N}
        fns = {
            "mxep": lambda: mxep.grouped_mm_mxfp8(tokens, w, offs),   # impl="auto": "dequant" here
            "mxep_fused": lambda: mxep.grouped_mm_mxfp8(tokens, w, offs, impl="fused"),
            "dequantize_kernel": lambda: dequantize_mxfp8_rows(tokens.qdata, tokens.scale, offs[-1:]),
            "unfused": lambda: torch._grouped_mm(dequantize_mxfp8_reference(qR, sR), wt, offs=offs),
            "bf16_only": lambda: torch._grouped_mm(x_bf16, wt, offs=offs),
            "mx_weights_mxep": lambda: mxep.grouped_mm_mxfp8(tokens, wq, offs),
            "mx_weights_fused": lambda: mxep.grouped_mm_mxfp8(tokens, wq, offs, impl="fused"),
            "mx_weights_unfused": lambda: torch._grouped_mm(dequantize_mxfp8_reference(qR, sR),
                                                            dequantize_mxfp8_reference(wq.qdata, wq.scale).transpose(1, 2), offs=offs),
        }
        for name, fn in fns.items():
            try:
                us = time_us(fn, args.iters, args.warmup)
                row[name] = {"median_us": us, "tflops": flops / us / 1e6}
            except Exception as exc:  # noqa: BLE001  (record and go on: one failing system must not lose the rest)
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        # the op against the bf16 GEMM alone, three interleaved rounds (the ratio the issue tracks)
        row["mxep_over_bf16_only_rounds"] = [time_us(fns["mxep"], args.iters, args.warmup) /
                                             time_us(fns["bf16_only"], args.iters, args.warmup) for _ in range(3)]
        for name, ref in (("mxep", "unfused"), ("mxep_fused", "unfused"), ("mx_weights_mxep", "mx_weights_unfused"),
                          ("mx_weights_fused", "mx_weights_unfused")):
            try:
                a, b = fns[name]()[:R].float(), fns[ref]()[:R].float()
                row[f"rel_err_{name}"] = rel_err(a, b)
            except Exception as exc:  # noqa: BLE001
                row[f"rel_err_{name}"] = f"{type(exc).__name__}: {exc}"[:300]
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
