"""`python -m mxep.demo` (`make demo`): the EP dispatch layout on every rank, in ten seconds.

One process per visible CUDA GPU (NCCL), else 4 CPU processes (gloo, Triton interpreter).
Routing is skewed, one expert receives nothing anywhere and the last rank sends nothing.
Each rank runs the unfused MXFP8 pipeline (mxep.ep.naive_pipeline) and mxep's fused
dispatch (mxep.Buffer) on the same rows; rank 0 prints, per rank, both layouts side by side
(rows received per local expert, padded group sizes, pad rows, group_end_offsets), then per path
a check line (bytes and layout equal, round trip) and a timing line.
"""
from __future__ import annotations

import os
import socket
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

if not torch.cuda.is_available():
    # Must precede any triton import (here and in spawned children, which re-import this module).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ALIGN = 32
LOCAL_EXPERTS = 4
EMPTY_EXPERT = 1  # global expert that nobody routes to (local expert 1 of rank 0)


@dataclass
class LayoutSummary:
    """Host-side summary of one dispatch on one rank (what the table prints)."""

    tokens_per_expert: list[int]
    group_end_offsets: list[int]
    seconds: float = float("nan")  # dispatch time (median over runs)
    checks: dict[str, bool] = field(default_factory=dict)  # name -> passed
    result: Any = None  # the raw dispatch output (tokens, offsets, ...) for byte comparisons

    @property
    def padded(self) -> list[int]:
        ends = self.group_end_offsets
        return [e - (ends[i - 1] if i else 0) for i, e in enumerate(ends)]

    @classmethod
    def from_tensors(cls, group_end_offsets: torch.Tensor, tokens_per_expert: torch.Tensor, **kw) -> "LayoutSummary":
        return cls(tokens_per_expert.tolist(), group_end_offsets.tolist(), **kw)


def _rank_inputs(rank: int, world: int, rows: int, hidden: int, device):
    """Deterministic per-rank routing and rows (any rank can rebuild any other rank's counts)."""
    from mxep.ep.routing import make_inputs, make_routing

    g = torch.Generator().manual_seed(1234 + rank)
    num_experts = LOCAL_EXPERTS * world
    if world > 1 and rank == world - 1:
        counts = make_routing(0, num_experts, "none", g)  # this rank sends nothing
    else:
        hot = min(LOCAL_EXPERTS, num_experts - 1)  # first expert of rank 1: a hot receiver
        counts = make_routing(rows + 37 * rank, num_experts, "skewed", g, fraction=0.4, expert=hot,
                              zero_experts=[EMPTY_EXPERT])
    x = make_inputs(counts, hidden, torch.bfloat16, g)
    return x.to(device), counts.to(device)


def _timed(fn, device, iters: int):
    fn()  # warm-up (Triton compile / interpreter setup)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def run_reference(rank: int, world: int, x: torch.Tensor, counts: torch.Tensor, align: int, device,
                  all_counts: list[torch.Tensor], iters: int = 1) -> LayoutSummary:
    """Unfused MXFP8 dispatch + combine on this rank.

    Returns the summary with its checks; ``.result`` is the UnfusedDispatchResult (tokens
    MXFP8Tensor [R, H], group_end_offsets, tokens_per_expert) for comparing a fused layout's bytes.
    """
    from mxep.format import dequantize_mxfp8, to_mxfp8
    from mxep.ep.naive_pipeline import unfused_combine, unfused_dispatch_mxfp8
    from mxep.ep.naive import simulate_dispatch_layout

    res, seconds = _timed(lambda: unfused_dispatch_mxfp8(x, counts, align=align), device, iters)
    back = unfused_combine(res.tokens.dequantize(), res.handle)
    q = to_mxfp8(x)
    round_trip = torch.equal(back, dequantize_mxfp8(q.qdata, q.scale, torch.bfloat16))
    oracle = simulate_dispatch_layout(all_counts, align)[rank]
    layout_ok = (res.group_end_offsets.tolist() == oracle.group_end_offsets.tolist()
                 and res.tokens_per_expert.tolist() == oracle.tokens_per_expert.tolist())
    return LayoutSummary.from_tensors(res.group_end_offsets, res.tokens_per_expert, seconds=seconds,
                                      checks={"round trip": round_trip, "layout == oracle": layout_ok}, result=res)


def run_fused(rank: int, world: int, x: torch.Tensor, counts: torch.Tensor, align: int, device,
              reference: Any, max_rows: int, iters: int = 1) -> LayoutSummary:
    """mxep's fused dispatch (``mxep.Buffer``) + combine on this rank, checked byte for byte
    against the unfused pipeline's output ``reference``."""
    import mxep

    buf = mxep.Buffer(None, num_experts=len(counts), hidden=x.shape[1], max_tokens_per_rank=max_rows,
                      align=align)
    with torch.no_grad():
        res, seconds = _timed(lambda: buf.dispatch(x, counts), device, iters)
        back = buf.combine(res.tokens.dequantize(), res.handle)
    R = reference.tokens.qdata.shape[0]
    same_bytes = (torch.equal(res.tokens.qdata[:R].view(torch.uint8), reference.tokens.qdata.view(torch.uint8))
                  and torch.equal(res.tokens.scale[:R].view(torch.uint8), reference.tokens.scale.view(torch.uint8)))
    same_layout = (torch.equal(res.group_end_offsets, reference.group_end_offsets)
                   and torch.equal(res.tokens_per_expert, reference.tokens_per_expert))
    round_trip = torch.equal(back, mxep.to_mxfp8(x).dequantize())
    return LayoutSummary.from_tensors(
        res.group_end_offsets, res.tokens_per_expert, seconds=seconds,
        checks={"bytes == unfused": same_bytes, "layout == unfused": same_layout, "round trip": round_trip},
        result=(res, buf.transport_name))


def format_layouts(rank: int, world: int, layouts: dict[str, LayoutSummary]) -> str:
    """One rank's block: a table per named layout, side by side, then check and timing lines."""
    local = len(next(iter(layouts.values())).tokens_per_expert)
    cols = ("recv", "padded", "pad", "end")
    width = 7 * len(cols) + 2
    lines = [f"rank {rank}/{world}: local experts {rank * local}..{rank * local + local - 1} (global ids)"]
    lines.append(f"  {'expert':>11} " + "".join(f"| {name:<{width - 2}}" for name in layouts))
    lines.append(f"  {'local(glob)':>11} " + "".join("| " + "".join(f"{c:>7}" for c in cols) + " " for _ in layouts))
    for e in range(local):
        cells = []
        for s in layouts.values():
            recv, pad_sz = s.tokens_per_expert[e], s.padded[e]
            cells.append("| " + "".join(f"{v:>7}" for v in (recv, pad_sz, pad_sz - recv, s.group_end_offsets[e])) + " ")
        lines.append(f"  {f'{e}({rank * local + e})':>11} " + "".join(cells))
    for name, s in layouts.items():
        checks = ", ".join(f"{k} {'OK' if v else 'FAIL'}" for k, v in s.checks.items())
        total = s.group_end_offsets[-1] if s.group_end_offsets else 0
        lines.append(f"  {name:<8} rows {sum(s.tokens_per_expert)} -> {total} padded | {checks} | "
                     f"dispatch {s.seconds * 1e3:.2f} ms")
    return "\n".join(line.rstrip() for line in lines)


def _rank_main(rank: int, world: int, backend: str, port: int, rows: int, hidden: int, iters: int) -> None:
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, counts = _rank_inputs(rank, world, rows, hidden, device)
        all_counts = [_rank_inputs(r, world, rows, 32, "cpu")[1] for r in range(world)]  # for the oracle
        layouts = {"unfused": run_reference(rank, world, x, counts, ALIGN, device, all_counts, iters)}
        layouts["fused"] = run_fused(rank, world, x, counts, ALIGN, device, layouts["unfused"].result,
                                      max_rows=rows + 37 * world, iters=iters)  # same on every rank
        blocks = [None] * world if rank == 0 else None
        dist.gather_object(format_layouts(rank, world, layouts), blocks, dst=0)
        oks = [None] * world if rank == 0 else None
        dist.gather_object(all(all(s.checks.values()) for s in layouts.values()), oks, dst=0)
        if rank == 0:
            sent = [int(c.sum()) for c in all_counts]
            print(f"mxep demo: {world} ranks ({backend}, {device.type}, fused transport "
                  f"{layouts['fused'].result[1]}), {LOCAL_EXPERTS * world} experts "
                  f"({LOCAL_EXPERTS} per rank), hidden {hidden}, align {ALIGN}, MXFP8 rceil")
            print(f"rows sent per rank: {sent}  (skewed routing; global expert {EMPTY_EXPERT} gets nothing"
                  + (f"; rank {world - 1} sends nothing)" if world > 1 else ")"))
            print("recv = rows received, padded = group size (multiple of align, >= align), "
                  "pad = zero rows, end = group_end_offsets\n")
            print("\n\n".join(blocks))
            if device.type == "cpu":
                print("\n(timings on CPU run the Triton interpreter and gloo: not performance numbers)")
            print(f"\nall checks: {'OK' if all(oks) else 'FAIL'}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        # Never NVLink multicast on the shared machines (set before any child starts).
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
        world, backend, rows, hidden, iters = torch.cuda.device_count(), "nccl", 8192, 4096, 10
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        world, backend, rows, hidden, iters = 4, "gloo", 200, 256, 1
    mp.spawn(_rank_main, args=(world, backend, _free_port(), rows, hidden, iters), nprocs=world)


if __name__ == "__main__":
    main()
