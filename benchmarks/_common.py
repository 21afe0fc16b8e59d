"""Traffic accounting, process-group set-up, result files and the command-line arguments shared
by the benchmark scripts (bench_dispatch.py, bench_nvshmem.py). The configurations and their
inputs are :mod:`mxep.testing.cases`, the ``--ep-config`` parser :mod:`mxep.testing.overrides`
and the timing :mod:`mxep.testing.timing` (the scripts under ``scripts/`` use them too)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
from dataclasses import asdict

import torch
import torch.distributed as dist

from mxep.testing.cases import NVLINK_GBPS, BenchConfig, row_bytes
from mxep.testing.timing import environment

__all__ = [
    "pair_rows", "pattern_pair_bytes", "traffic", "add_common_args", "parse_list", "init_distributed",
    "ResultFile", "result_header", "gbps", "attach_measurement", "result_line",
]


def pair_rows(C: torch.Tensor, world: int) -> torch.Tensor:
    """``[W, W]`` int64: rows source s sends to rank d in dispatch (diagonal = rows staying home)."""
    return C.view(world, world, -1).sum(2)


def pattern_pair_bytes(C: torch.Tensor, world: int, hidden: int, pattern: str) -> list[list[int]]:
    """Bytes rank s sends to rank d (off-diagonal only) for a traffic pattern:
    ``dispatch_mxfp8`` / ``dispatch_bf16`` (rows to their expert's rank) or ``combine_bf16``
    (the same rows back, bf16)."""
    P = pair_rows(C, world)
    if pattern == "dispatch_mxfp8":
        B = P * row_bytes("mxfp8", hidden)
    elif pattern == "dispatch_bf16":
        B = P * row_bytes("bf16", hidden)
    elif pattern == "combine_bf16":
        B = P.t() * row_bytes("bf16", hidden)
    else:
        raise ValueError(pattern)
    B = B.clone()
    B.fill_diagonal_(0)
    return B.tolist()


def traffic(C: torch.Tensor, world: int, hidden: int, pattern: str) -> dict:
    """Per-rank bytes sent to / received from other ranks for a pattern (see pattern_pair_bytes)."""
    B = pattern_pair_bytes(C, world, hidden, pattern)
    sent = [sum(B[s]) for s in range(world)]
    recv = [sum(B[s][d] for s in range(world)) for d in range(world)]
    return {
        "pattern": pattern,
        "bytes_sent_per_rank": sent,
        "bytes_recv_per_rank": recv,
        "bytes_sent_avg": sum(sent) / world,
        "bytes_sent_max": max(sent),
        "bytes_recv_max": max(recv),
    }



# --------------------------------------------------------------------------------- CLI / set-up
def parse_list(text: str, allowed) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad:
        raise SystemExit(f"unknown item(s) {bad}; choose from {list(allowed)}")
    return items


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="JSON file to write (rank 0)")
    p.add_argument("--configs", default="a,b,c", help="comma list of a,b,c")
    p.add_argument("--routings", default="uniform,skewed", help="comma list of uniform,skewed")
    p.add_argument("--iters", type=int, default=50, help="timed samples per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--pipelined-iters", type=int, default=20, help="back-to-back calls per pipelined sample (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pg-timeout", type=float, default=300.0, help="process-group timeout, seconds")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="gloo + CPU tensors + tiny shapes (run with TRITON_INTERPRET=1): plumbing check only")


def init_distributed(cpu: bool, timeout_s: float) -> tuple[int, int, torch.device]:
    """Initialize the (single) process group of this launch from torchrun's environment."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    timeout = datetime.timedelta(seconds=timeout_s)
    if cpu:
        dist.init_process_group("gloo", timeout=timeout)
        return rank, world, torch.device("cpu")
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    torch.empty(1, device=device)  # create the context on the right device first
    dist.init_process_group("nccl", device_id=device, timeout=timeout)
    return rank, world, device


class ResultFile:
    """Rank 0 rewrites the JSON after every record, so a later crash keeps what was measured."""

    def __init__(self, path: str, rank: int, header: dict):
        self.path, self.rank = path, rank
        self.data = dict(header, records=[], finished=False)

    def add(self, record: dict) -> None:
        self.data["records"].append(record)
        self.flush()

    def flush(self, finished: bool = False) -> None:
        if self.rank != 0:
            return
        self.data["finished"] = finished
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def config_dict(cfg: BenchConfig) -> dict:
    return dict(asdict(cfg), rows=cfg.rows)


def result_header(script: str, rank: int, world: int, cpu: bool, args, configs, **extra) -> dict:
    """The header every benchmark script writes at the top of its JSON (environment on rank 0)."""
    return {
        "script": script,
        "world": world,
        "cpu_smoke": cpu,
        "env": environment() if rank == 0 else None,
        "args": vars(args),
        "configs": {c.name: config_dict(c) for c in configs},
        "nvlink_gbps": NVLINK_GBPS,
        **extra,
    }


def gbps(nbytes: float, us: float | None) -> float | None:
    return None if not us else nbytes / us / 1e3  # bytes / microsecond / 1e3 = GB/s (1e9 bytes)


def attach_measurement(rec: dict, meas: dict | None) -> dict:
    """Fold a timing result (``time_aligned``, optionally with ``"pipelined"``) into a record:
    the raw numbers plus GB/s per rank from ``rec["bytes_sent_avg"]``."""
    if meas is not None:
        rec.update(meas)
        rec["gbps"] = gbps(rec["bytes_sent_avg"], meas["median_us"])
        pl = meas.get("pipelined") or {}
        if pl.get("median_us"):
            rec["pipelined_us"] = pl["median_us"]
            rec["pipelined_gbps"] = gbps(rec["bytes_sent_avg"], pl["median_us"])
    return rec


def result_line(rec: dict, meas: dict | None, err: str | None) -> str:
    """``  <median> us  <GB/s> GB/s/rank`` or ``ERROR <err>`` for the progress log."""
    return (f"{meas['median_us']:10.1f} us  {rec['gbps']:8.2f} GB/s/rank" if meas is not None
            else f"ERROR {err}")
