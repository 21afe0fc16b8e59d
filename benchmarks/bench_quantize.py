#!/usr/bin/env python
"""GPU benchmark of the standalone MXFP8 quantize kernel (bf16 [M, K] -> e4m3 + e8m0 scales).

For every shape it reports, measured in the same run on the same card:
  * the Triton kernel (``mxep.format.quantize.to_mxfp8_rows``): median time and effective
    bandwidth = (bytes read: input) + (bytes written: fp8 data + e8m0 scales) / time;
  * the device-to-device copy ceiling: ``dst.copy_(src)`` of a buffer of the input's size,
    bandwidth = 2 * bytes / time (read + write), and the kernel's fraction of it;
  * the pure-torch reference (``mxep.format.naive.to_mxfp8_reference``) for comparison;
  * whether kernel and reference agree bit for bit on that input.

Timing: CUDA events around every call, warm-up first; three rounds of ``--iters`` (>= 50) calls
of the kernel, each followed by a round of the copy; the per-call min / median / max over all
rounds and the kernel / copy fraction of each round. Inputs rotate among several buffers whose
total size is >= 4x the L2 cache, so no call reads data left in L2 by the previous one.

``--sweep``: the tile candidates of the quantize and dequantize kernels and the one-pass round
trip, against the copy of the same run (two interleaved rounds), each checked bit for bit; the
numbers behind the kernels' default tiles (mxep/format/quantize.py, dequantize.py).

Usage: ``python benchmarks/bench_quantize.py [--sweep] [--out benchmarks/results/quantize.json]``
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import triton

from mxep.format import quantize as qk
from mxep.format.naive import to_mxfp8_reference
from mxep.format.quantize import to_mxfp8_rows

DEFAULT_SHAPES = [(32768, 7168), (32768, 5120), (16384, 7168), (8192, 7168), (8192, 2048), (1024, 7168)]


def parse_shape(s: str) -> tuple[int, int]:
    m, k = s.lower().split("x")
    return int(m), int(k)


def time_calls(fn, bufs, iters: int, warmup: int) -> list[float]:
    """Per-call times in ms, CUDA events around each call, inputs rotating through ``bufs``."""
    for i in range(warmup):
        fn(bufs[i % len(bufs)])
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        b = bufs[i % len(bufs)]
        starts[i].record()
        fn(b)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def n_buffers(nbytes: int, l2_bytes: int, cap_bytes: int) -> int:
    """Enough buffers to cover 4x L2 (at least 2), without exceeding ``cap_bytes`` in total."""
    n = max(2, math.ceil(4 * l2_bytes / nbytes))
    return max(2, min(n, cap_bytes // nbytes, 64))


def bench_shape(m: int, k: int, dtype: torch.dtype, mode: str, iters: int, warmup: int,
                l2_bytes: int, ref_iters: int, dev: str = "cuda") -> dict:
    elem = torch.tensor([], dtype=dtype).element_size()
    in_bytes = m * k * elem
    out_bytes = m * k + m * (k // 32)  # e4m3 data + e8m0 scales
    nb = n_buffers(in_bytes, l2_bytes, cap_bytes=4 << 30)
    g = torch.Generator(device=dev).manual_seed(0)
    bufs = []
    for _ in range(nb):
        x = torch.randn(m, k // 32, 32, device=dev, dtype=torch.float32, generator=g)
        # a few decades of dynamic range across blocks, like activations
        x *= torch.exp2(torch.randint(-8, 8, (m, k // 32, 1), device=dev, generator=g).float())
        bufs.append(x.reshape(m, k).to(dtype))
        del x

    # correctness on the first buffer (kernel vs reference, bit for bit)
    q, s = to_mxfp8_rows(bufs[0], mode)
    qr, sr = to_mxfp8_reference(bufs[0], mode)
    bitexact = bool(torch.equal(q.view(torch.uint8), qr.view(torch.uint8))
                    and torch.equal(s.view(torch.uint8), sr.view(torch.uint8)))
    del q, s, qr, sr

    # three rounds, kernel and copy interleaved: per-call min / median / max over all of them
    dst = torch.empty_like(bufs[0])
    k_times, c_times, round_fracs = [], [], []
    for _ in range(3):
        kt = time_calls(lambda x: to_mxfp8_rows(x, mode), bufs, iters, warmup)
        ct = time_calls(lambda x: dst.copy_(x), bufs, iters, warmup)
        k_times += kt
        c_times += ct
        round_fracs.append(((in_bytes + out_bytes) / statistics.median(kt)) / (2 * in_bytes / statistics.median(ct)))
    del dst
    t_kernel, t_copy = statistics.median(k_times), statistics.median(c_times)

    t_ref = None
    try:
        t_ref = statistics.median(time_calls(lambda x: to_mxfp8_reference(x, mode), bufs, ref_iters, 3))
    except torch.OutOfMemoryError:
        pass
    del bufs
    torch.cuda.empty_cache()

    gbs = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    kernel_gbs = gbs(in_bytes + out_bytes, t_kernel)
    copy_gbs = gbs(2 * in_bytes, t_copy)
    return {
        "M": m, "K": k, "dtype": str(dtype).replace("torch.", ""), "scale_mode": mode,
        "bytes_read": in_bytes, "bytes_written": out_bytes, "n_input_buffers": nb,
        "kernel_ms": t_kernel, "kernel_min_ms": min(k_times), "kernel_max_ms": max(k_times),
        "kernel_GBps": kernel_gbs, "fraction_of_copy_per_round": round_fracs,
        "copy_ms": t_copy, "copy_GBps": copy_gbs, "fraction_of_copy": kernel_gbs / copy_gbs,
        "reference_ms": t_ref,
        "reference_GBps": gbs(in_bytes + out_bytes, t_ref) if t_ref else None,
        "speedup_vs_reference": (t_ref / t_kernel) if t_ref else None,
        "bitexact_vs_reference": bitexact,
    }


def _stats(ts: list[float]) -> dict:
    return {"min_ms": min(ts), "median_ms": statistics.median(ts), "max_ms": max(ts)}


def sweep(shapes, iters: int, warmup: int, l2_bytes: int, rounds: int = 2) -> list[dict]:
    """Every candidate tile / grid order of the quantize and dequantize kernels against the copy
    ceiling, ``rounds`` times interleaved (the copy first in each round), per-call min / median
    / max; bit-exactness of every candidate against the default's output."""
    from mxep.format.dequantize import dequantize_mxfp8_rows
    # the candidates of the 2026-12-01 sweep (quantize.py / dequantize.py quote its numbers)
    q_cands = [(8, 512, 4), (16, 512, 4), (32, 512, 8), (4, 1024, 4), (8, 1024, 8), (16, 1024, 8),
               (32, 256, 4), (64, 256, 8), (16, 256, 4), (8, 256, 2), (2, 2048, 4), (1, 1024, 1)]
    d_cands = [(8, 1024, 4), (16, 1024, 8), (8, 512, 4), (16, 512, 4), (32, 512, 8), (4, 2048, 8),
               (32, 256, 4), (64, 256, 8), (16, 256, 2), (64, 128, 4)]
    out = []
    for (m, k) in shapes:
        in_bytes = m * k * 2
        nb = n_buffers(in_bytes, l2_bytes, cap_bytes=4 << 30)
        g = torch.Generator(device="cuda").manual_seed(1)
        bufs = [(torch.randn(m, k, device="cuda", generator=g) *
                 torch.exp2(torch.randint(-8, 8, (m, k // 32), device="cuda", generator=g).float()
                            ).repeat_interleave(32, 1)).to(torch.bfloat16) for _ in range(nb)]
        q_ref, s_ref = to_mxfp8_reference(bufs[0], "rceil")
        qs = [to_mxfp8_rows(b, "rceil") for b in bufs]
        d_ref = dequantize_mxfp8_rows(qs[0][0], qs[0][1])
        dst = torch.empty_like(bufs[0])
        q_bytes = in_bytes + m * k + m * (k // 32)
        d_bytes = m * k + m * (k // 32) + in_bytes
        for rnd in range(rounds):
            tc = time_calls(lambda x: dst.copy_(x), bufs, iters, warmup)
            copy_gbs = 2 * in_bytes / (statistics.median(tc) * 1e-3) / 1e9
            out.append(dict(kernel="copy", M=m, K=k, round=rnd, GBps=copy_gbs, **_stats(tc)))
            for bm, bk, w in q_cands:
                f = lambda x, bm=bm, bk=bk, w=w: to_mxfp8_rows(x, "rceil", block_m=bm, block_k=bk, num_warps=w)
                qq, ss = f(bufs[0])
                ok = bool(torch.equal(qq.view(torch.uint8), q_ref.view(torch.uint8)) and
                          torch.equal(ss.view(torch.uint8), s_ref.view(torch.uint8)))
                ts = time_calls(f, bufs, iters, warmup)
                gbs = q_bytes / (statistics.median(ts) * 1e-3) / 1e9
                out.append(dict(kernel="quantize", M=m, K=k, round=rnd, tile=[bm, bk, w],
                                bitexact=ok, GBps=gbs, fraction_of_copy=gbs / copy_gbs, **_stats(ts)))
            for bm, bk, w in d_cands:
                f = lambda qs_, bm=bm, bk=bk, w=w: dequantize_mxfp8_rows(qs_[0], qs_[1], tile=(bm, bk, w))
                ok = bool(torch.equal(f(qs[0]).view(torch.int16), d_ref.view(torch.int16)))
                ts = time_calls(f, qs, iters, warmup)
                gbs = d_bytes / (statistics.median(ts) * 1e-3) / 1e9
                out.append(dict(kernel="dequantize", M=m, K=k, round=rnd, tile=[bm, bk, w],
                                bitexact=ok, GBps=gbs, fraction_of_copy=gbs / copy_gbs, **_stats(ts)))
            from mxep.format.quantize import mxfp8_round_trip
            ok = bool(torch.equal(mxfp8_round_trip(bufs[0]).view(torch.int16), d_ref.view(torch.int16)))
            ts = time_calls(lambda x: mxfp8_round_trip(x, "rceil"), bufs, iters, warmup)
            gbs = 2 * in_bytes / (statistics.median(ts) * 1e-3) / 1e9
            out.append(dict(kernel="round_trip", M=m, K=k, round=rnd,
                            tile=[qk.GPU_BLOCK_M, qk.GPU_BLOCK_K, qk.GPU_NUM_WARPS],
                            bitexact=ok, GBps=gbs, fraction_of_copy=gbs / copy_gbs, **_stats(ts)))
        del bufs, qs, dst
        torch.cuda.empty_cache()
    for r in out:
        tag = "" if r["kernel"] == "copy" else f" tile {r['tile']} " \
              f"frac {r['fraction_of_copy']:.3f} exact {int(r['bitexact'])}"
        print(f"{r['kernel']:10s} {r['M']}x{r['K']} r{r['round']} {r['GBps']:.0f} GB/s min/med/max "
              f"{r['min_ms'] * 1e3:.1f}/{r['median_ms'] * 1e3:.1f}/{r['max_ms'] * 1e3:.1f} us{tag}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "quantize.json"))
    p.add_argument("--shapes", nargs="*", type=parse_shape, default=DEFAULT_SHAPES, help="MxK, e.g. 32768x7168")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--modes", nargs="*", default=["rceil", "floor"], choices=["rceil", "floor"])
    p.add_argument("--iters", type=int, default=100, help="timed calls per measurement (>= 50)")
    p.add_argument("--ref-iters", type=int, default=50, help="timed calls of the torch reference (>= 50)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--sweep", action="store_true",
                   help="time every candidate tile / grid order of quantize and dequantize (rceil, bf16)")
    args = p.parse_args(argv)
    if args.iters < 50 or args.ref_iters < 50:
        p.error("--iters and --ref-iters must be >= 50")
    if not torch.cuda.is_available():
        print("bench_quantize: needs a CUDA GPU", file=sys.stderr)
        return 1
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("bench_quantize: unset TRITON_INTERPRET to benchmark the compiled kernel", file=sys.stderr)
        return 1

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    props = torch.cuda.get_device_properties(0)
    card = torch.cuda.get_device_name(0)
    l2 = getattr(props, "L2_cache_size", 50 << 20) or (50 << 20)
    print(f"# MXFP8 quantize benchmark on {card} (L2 {l2 >> 20} MiB), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"# kernel tiles: BLOCK_M={qk.GPU_BLOCK_M} BLOCK_K={qk.GPU_BLOCK_K} num_warps={qk.GPU_NUM_WARPS}; "
          f"median of {args.iters} calls (reference: {args.ref_iters}), inputs rotated past L2\n")

    if args.sweep:
        res = sweep(args.shapes if args.shapes != DEFAULT_SHAPES else [(32768, 7168), (16384, 7168)],
                    args.iters, args.warmup, l2)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"benchmark": "format_kernels_sweep", "card": card, "torch": torch.__version__,
                       "triton": triton.__version__, "results": res}, f, indent=2)
        return 0 if all(r.get("bitexact", True) for r in res) else 2

    results = []
    t0 = time.time()
    for (m, k) in args.shapes:
        for mode in args.modes:
            results.append(bench_shape(m, k, dtype, mode, args.iters, args.warmup, l2, args.ref_iters))

    hdr = ("| M x K | dtype | mode | kernel ms (min / median / max) | kernel GB/s | copy GB/s | kernel / copy (3 rounds) | "
           "torch ref ms | speedup vs ref | bit-exact |")
    print(hdr)
    print("|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|")
    for r in results:
        ref_ms = f"{r['reference_ms']:.3f}" if r["reference_ms"] else "OOM"
        spd = f"{r['speedup_vs_reference']:.1f}x" if r["speedup_vs_reference"] else "-"
        rounds = "/".join(f"{f:.2f}" for f in r["fraction_of_copy_per_round"])
        print(f"| {r['M']} x {r['K']} | {r['dtype']} | {r['scale_mode']} | {r['kernel_min_ms']:.4f} / "
              f"{r['kernel_ms']:.4f} / {r['kernel_max_ms']:.4f} | "
              f"{r['kernel_GBps']:.0f} | {r['copy_GBps']:.0f} | {r['fraction_of_copy']:.2f} ({rounds}) | "
              f"{ref_ms} | {spd} | {'yes' if r['bitexact_vs_reference'] else 'NO'} |")
    print(f"\n(GB/s = 1e9 bytes/s; kernel bytes = bf16 read + fp8 + scales written; copy bytes = read + write; "
          f"total wall {time.time() - t0:.0f} s)")

    out = {
        "benchmark": "to_mxfp8_rows", "card": card, "l2_bytes": l2,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "tiles": {"BLOCK_M": qk.GPU_BLOCK_M, "BLOCK_K": qk.GPU_BLOCK_K, "num_warps": qk.GPU_NUM_WARPS},
        "grid": "1-D, column tiles fastest",
        "iters": args.iters, "ref_iters": args.ref_iters, "warmup": args.warmup,
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(r["bitexact_vs_reference"] for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
