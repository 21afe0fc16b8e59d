"""Same-run A/B of the dispatch and combine kernels of two source trees on the simulated world
(every rank's buffers on one GPU), so that a change of structure can be shown no slower on the
one GPU the device machine lends. Every case is timed twice (``mxep.testing.timing``
``time_queued_us``, this tree's for both trees): ``device``, the call queued behind a device sleep (its kernels' time, which
is what a change of kernels changes), and ``host_inclusive``, issued as the GPU runs (dominated
by the host's launches of the W ranks' phases one after another).

Each tree is timed in its own subprocess (one mxep per interpreter), the trees alternate for
``--rounds`` rounds, and the table gives each case's median over rounds of the per-round median
(CUDA events around one world-wide dispatch or combine, after warm-up). The world's ranks run
one after another on the one GPU, so a time is the sum of every rank's kernels: compare trees,
not against NVLink numbers.

    python scripts/ab_simulated.py --trees old=/path/to/old/src new=src [--rounds 3]

Cases: W = 2, 4, 8; config (a) scaled (H 7168, 256 experts, top-8 rows of 1024 tokens per rank,
uniform routing) and config (c) (H 7168, 128 tokens x top-8 per rank).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

# The timing is this tree's for every tree (the same clock on both sides; a tree from before
# mxep.testing.timing has none): loaded by its path, since each child's PYTHONPATH brings the
# mxep under test. The file imports torch and the standard library only.
TIMING = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "mxep", "testing", "timing.py")
CASES = [(w, cfg) for cfg in ("a", "c") for w in (2, 4, 8)]
OPS = ("dispatch", "combine", "combine_zero_copy")
SHAPES = {"a": dict(hidden=7168, experts=256, rows=1024 * 8), "c": dict(hidden=7168, experts=256, rows=128 * 8)}


def _child(reps: int, host_inclusive: bool, cases: list, ops: list) -> None:
    import inspect

    import torch

    spec = importlib.util.spec_from_file_location("_ab_timing", TIMING)
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    time_queued_us = timing.time_queued_us

    try:
        from mxep.ep.transport.symm_mem.simulated import SimulatedWorld  # the new tree
    except ImportError:
        from mxep.comm.simulated import SimulatedWorld  # trees before the restructure
    # Trees before the restructure chose the zero-copy pull with ``mode="pull"`` (their default,
    # the push, would time the staged copy instead); the new tree takes the pull whenever the
    # inputs are the combine inputs.
    pull = {"mode": "pull"} if "mode" in inspect.signature(SimulatedWorld.combine).parameters else {}
    results = {}
    t_start = time.perf_counter()
    for w, cfg in cases:
        sh = SHAPES[cfg]
        g = torch.Generator().manual_seed(1234 + w)
        world = SimulatedWorld(w, sh["experts"], sh["hidden"], sh["rows"], device="cuda")
        counts = [torch.bincount(torch.randint(0, sh["experts"], (sh["rows"],), generator=g),
                                 minlength=sh["experts"]).cuda() for _ in range(w)]
        xs = [torch.randn(sh["rows"], sh["hidden"], generator=g).to("cuda", torch.bfloat16) for _ in range(w)]
        eo = [torch.randn(world.capacity, sh["hidden"], generator=g).to("cuda", torch.bfloat16) for _ in range(w)]
        dev = torch.device("cuda")
        q = dict(reps=reps, host_inclusive=host_inclusive)
        t = {}
        if "dispatch" in ops:
            t["dispatch"] = time_queued_us(lambda: world.dispatch(xs, counts), dev, **q)
        if "combine" in ops:
            handles = [o.handle for o in world.dispatch(xs, counts)]
            t["combine"] = time_queued_us(lambda: world.combine(eo, handles), dev, **q)
        handles = [o.handle for o in world.dispatch(xs, counts)]
        ins = world.combine_inputs()
        if "combine_zero_copy" in ops:
            t["combine_zero_copy"] = time_queued_us(lambda: world.combine(ins, handles, **pull), dev, **q)
        results[f"W{w}-{cfg}"] = {f"{op} {kind[:-3]}": us for op, v in t.items() for kind, us in v.items()}
        del world, xs, eo, handles, ins
        torch.cuda.empty_cache()
        print(f"TIMING W{w}-{cfg} done at {time.perf_counter() - t_start:.1f} s", flush=True)
    print("RESULT " + json.dumps(results))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", required=True, help="name=path-to-src pairs")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--child", action="store_true")
    p.add_argument("--cases", default=None, help="comma list of cases, e.g. W4-a,W8-c (default: all six)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of ops (default: {','.join(OPS)})")
    p.add_argument("--host-inclusive", action=argparse.BooleanOptionalAction, default=True,
                   help="also time each call issued as the GPU runs (off: the device-queued time only)")
    a = p.parse_args()
    cases = [c for c in CASES if a.cases is None or f"W{c[0]}-{c[1]}" in a.cases.split(",")]
    if not cases:
        p.error(f"--cases: none of {a.cases!r} is one of " + ",".join(f"W{w}-{c}" for w, c in CASES))
    ops = a.ops.split(",")
    if not ops or any(o not in OPS for o in ops):
        p.error(f"--ops: {a.ops!r} is not a comma list of " + ",".join(OPS))
    if a.child:
        _child(a.reps, a.host_inclusive, cases, ops)
        return
    trees = [t.split("=", 1) for t in a.trees]
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for r in range(a.rounds):
        for name, path in trees:
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--trees", "x", "--child",
                                  "--reps", str(a.reps)] + ([] if a.host_inclusive else ["--no-host-inclusive"])
                                 + ([] if a.cases is None else ["--cases", a.cases]) + ["--ops", a.ops],
                                 env=env, capture_output=True, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(out.stdout[-3000:], out.stderr[-3000:])
                raise SystemExit(f"tree {name} failed")
            runs[name].append(json.loads(line[0][7:]))
            print(f"round {r + 1} tree {name}: " + "; ".join(ln[7:] for ln in out.stdout.splitlines()
                                                              if ln.startswith("TIMING ")), flush=True)
        print(f"after round {r + 1} of {a.rounds}:", flush=True)
        _table(runs, [n for n, _ in trees])


def _table(runs: dict, names: list[str]) -> None:
    """Each case's median over the rounds so far of the per-round medians, and the ratios."""
    print("| case | op | " + " | ".join(f"{n} (us)" for n in names) + " | " + " / ".join(names[1:]) + f" vs {names[0]} |")
    print("|---|---|" + "---|" * len(names) + "---|")
    for case in runs[names[0]][0]:
        for op in runs[names[0]][0][case]:
            med = [statistics.median(run[case][op] for run in runs[n]) for n in names]
            print(f"| {case} | {op} | " + " | ".join(f"{m:.1f}" for m in med) + " | "
                  + " / ".join(f"{m / med[0]:.3f}" for m in med[1:]) + " |")


if __name__ == "__main__":
    main()
