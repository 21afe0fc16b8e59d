#!/usr/bin/env python
"""GPU benchmark of the token-level dispatch's routing (``mxep.ep.routing.route_tokens``: the two
Triton launches) over its chunk size, against the torch fallback, bit for bit.

For each shape (tokens, top-k, experts, ranks) and each chunk size (``ROUTE_PAIRS``, pairs per
program), the median of ``--iters`` calls, each timed with CUDA events behind a device sleep (the
call queued before the GPU reaches it: launch time hidden), and whether every output equals the
torch path's. The numbers behind ``ROUTE_PAIRS`` in mxep/ep/routing.py.

    python benchmarks/bench_route.py [--iters 30] [--out route.json]
"""
from __future__ import annotations

import argparse
import json

import torch

import mxep.ep.routing as tokens
from mxep.testing.timing import time_queued_us

SHAPES = [(512, 8, 256, 4), (4096, 8, 32, 1), (128, 8, 256, 4)]   # (a)-like at W 4, the layer at W 1, (c)
CHUNKS = (128, 256, 512, 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_route: needs a CUDA GPU")
    dev = torch.device("cuda")
    kept, rows = tokens.ROUTE_PAIRS, []
    try:
        for t, k, E, W in SHAPES:
            g = torch.Generator().manual_seed(t + E)
            idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]).to(dev)
            ref = tokens._route_torch(idx, E, W)
            torch_us = time_queued_us(lambda: tokens._route_torch(idx, E, W), dev, a.iters, 3,
                                      host_inclusive=False)["device_us"]
            for bp in CHUNKS:
                tokens.ROUTE_PAIRS = bp
                got = tokens.route_tokens(idx, E, W)
                exact = all(torch.equal(x, y) for x, y in zip(got, ref))
                us = time_queued_us(lambda: tokens.route_tokens(idx, E, W), dev, a.iters, 3,
                                    host_inclusive=False)["device_us"]
                rows.append(dict(tokens=t, top_k=k, experts=E, world=W, pairs_per_program=bp, us=us,
                                 torch_us=torch_us, bit_exact=exact))
                print(f"t {t:5d} k {k} E {E:3d} W {W}: {bp:5d} pairs/program {us:7.1f} us "
                      f"(torch ops {torch_us:7.1f} us) bit-exact {exact}", flush=True)
    finally:
        tokens.ROUTE_PAIRS = kept
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
