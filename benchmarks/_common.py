"""Configurations, inputs, traffic accounting, process-group set-up, result files and the
``--ep-config`` parser shared by the benchmark scripts (bench_dispatch.py, bench_nvshmem.py,
run_all.py, report.py) and the scripts that build Buffers (scripts/sweep_config.py,
scripts/profile_stages.py, scripts/host_cost.py, scripts/inspect_ptx.py)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

_SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
if importlib.util.find_spec("mxep") is None:  # `python benchmarks/x.py` without PYTHONPATH=src still finds mxep
    sys.path.insert(0, _SRC)                  # (an mxep on PYTHONPATH wins: A/B runs of two trees)

from mxep.ep.config import EPConfig, KernelTiles, default_config  # noqa: E402
from mxep.testing import make_inputs, make_routing  # noqa: E402

__all__ = [
    "BenchConfig", "CONFIGS", "SMOKE_CONFIGS", "ROUTINGS", "NVLINK_GBPS", "SKEW_FRACTION",
    "Case", "make_case", "TokenCase", "make_token_case", "pair_rows", "pattern_pair_bytes", "traffic", "row_bytes",
    "add_common_args", "parse_list", "init_distributed", "ResultFile", "gbps", "attach_measurement",
    "result_line", "parse_ep_config", "ep_config", "ep_config_dict", "EP_CONFIG_HELP",
]

NVLINK_GBPS = 450.0  # NVLink 4 nominal, one direction per GPU (18 links x 25 GB/s); a constant
SKEW_FRACTION = 0.3  # "skewed": one hot expert (the same on every rank) takes ~30% of each rank's rows
ROUTINGS = ("uniform", "skewed")


@dataclass(frozen=True)
class BenchConfig:
    name: str
    hidden: int
    tokens: int  # tokens per rank before top-k duplication
    topk: int
    experts: int
    label: str

    @property
    def rows(self) -> int:
        """n: rows per rank after top-k duplication (what dispatch moves)."""
        return self.tokens * self.topk


CONFIGS = {
    "a": BenchConfig("a", 7168, 4096, 8, 256, "H=7168, 4096 tok/rank, top-8 of 256 (n=32768)"),
    "b": BenchConfig("b", 5120, 8192, 1, 16, "H=5120, 8192 tok/rank, top-1 of 16 (n=8192)"),
    "c": BenchConfig("c", 7168, 128, 8, 256, "latency: H=7168, 128 tok/rank, top-8 of 256 (n=1024)"),
}
# --cpu-smoke: tiny shapes (Triton interpreter on gloo); same code paths.
SMOKE_CONFIGS = {
    "a": BenchConfig("a", 256, 16, 4, 16, "smoke a"),
    "b": BenchConfig("b", 128, 32, 1, 4, "smoke b"),
    "c": BenchConfig("c", 256, 4, 4, 16, "smoke c"),
}


def row_bytes(fmt: str, hidden: int) -> int:
    """Bytes of one row on the wire: MXFP8 = H data + H/32 scales; bf16 = 2H."""
    return hidden + hidden // 32 if fmt == "mxfp8" else 2 * hidden


def _seed(base: int, cfg: BenchConfig, routing: str) -> int:
    return base * 7919 + (ord(cfg.name) - 96) * 101 + ROUTINGS.index(routing) * 13


def count_matrix(cfg: BenchConfig, routing: str, world: int, seed: int) -> torch.Tensor:
    """``C [W, E]`` int64 (CPU): row s = rank s's rows per global expert. Deterministic, so every
    rank computes the whole matrix locally (no communication)."""
    s0 = _seed(seed, cfg, routing)
    hot = int(torch.randint(cfg.experts, (1,), generator=torch.Generator().manual_seed(s0)))
    rows = []
    for s in range(world):
        g = torch.Generator().manual_seed(s0 * 1000 + s + 1)
        kw = {"fraction": SKEW_FRACTION, "expert": hot} if routing == "skewed" else {}
        rows.append(make_routing(cfg.rows, cfg.experts, routing, g, **kw))
    return torch.stack(rows)


@dataclass
class Case:
    cfg: BenchConfig
    routing: str
    world: int
    rank: int
    C: torch.Tensor  # [W, E] int64 CPU
    counts: torch.Tensor  # [E] int64 on the device (this rank's row of C)
    x: torch.Tensor  # [n, H] bf16 on the device, rows sorted by expert


def make_case(cfg: BenchConfig, routing: str, world: int, rank: int, device: torch.device, seed: int,
              base_rows: int = 4096) -> Case:
    """Routing from ``make_routing``; activations from ``make_inputs`` (a block of ``base_rows``
    random rows per rank, tiled to n rows on the device: realistic values without generating
    hundreds of MB on one CPU thread per rank)."""
    C = count_matrix(cfg, routing, world, seed)
    counts = C[rank].to(device)
    n = cfg.rows
    g = torch.Generator().manual_seed(_seed(seed, cfg, routing) * 31 + rank)
    m = min(n, base_rows)
    base = make_inputs(torch.tensor([m]), cfg.hidden, torch.bfloat16, g, device=device)
    reps = -(-n // m)
    x = base.repeat(reps, 1)[:n].contiguous() if reps > 1 else base
    return Case(cfg, routing, world, rank, C, counts, x)


@dataclass
class TokenCase:
    """One rank's input of the token-level dispatch (``Buffer(top_k=k).dispatch_tokens``)."""
    x: torch.Tensor            # [T, H] bf16, tokens in token order (not expanded)
    topk_idx: torch.Tensor     # [T, k] int32, distinct experts per token
    topk_weights: torch.Tensor  # [T, k] fp32, rows summing to 1
    wire_bytes_avg: float      # dispatch bytes a rank sends off-rank, averaged over ranks


def _topk_ids(cfg: BenchConfig, routing: str, seed: int, rank: int) -> torch.Tensor:
    s0 = _seed(seed, cfg, routing)
    g = torch.Generator().manual_seed(s0 * 1000 + rank + 7)
    idx = torch.rand(cfg.tokens, cfg.experts, generator=g).argsort(1)[:, :cfg.topk]   # uniform, distinct
    if routing == "skewed":   # the hot expert (the same on every rank) in ~SKEW_FRACTION of the tokens
        hot = int(torch.randint(cfg.experts, (1,), generator=torch.Generator().manual_seed(s0)))
        pick = torch.rand(cfg.tokens, generator=g) < SKEW_FRACTION * cfg.topk
        has = (idx == hot).any(1)
        idx[pick & ~has, 0] = hot
    return idx.to(torch.int32)


def make_token_case(cfg: BenchConfig, routing: str, world: int, rank: int, device: torch.device,
                    seed: int) -> TokenCase:
    """Top-k routing of ``cfg.tokens`` tokens over ``cfg.experts`` (uniform, or ``skewed``: one hot
    expert in about ``SKEW_FRACTION * k`` of the tokens), deterministic per rank, and the bytes
    the token-level dispatch puts on the wire: every off-rank (token, rank) pair once, MXFP8 data
    + scales + its k slot rows and weights (8 bytes each)."""
    from mxep.ep.routing import route_tokens
    sent = 0
    for r in range(world):
        own = route_tokens(_topk_ids(cfg, routing, seed, r), cfg.experts, world).tokens_per_rank.clone()
        own[r] = 0
        sent += int(own.sum())
    g = torch.Generator().manual_seed(_seed(seed, cfg, routing) * 37 + rank)
    x = make_inputs(torch.tensor([cfg.tokens]), cfg.hidden, torch.bfloat16, g, device=device)
    w = torch.rand(cfg.tokens, cfg.topk, generator=g) + 0.05
    return TokenCase(x, _topk_ids(cfg, routing, seed, rank).to(device), (w / w.sum(1, keepdim=True)).to(device),
                     sent / world * (row_bytes("mxfp8", cfg.hidden) + 8 * cfg.topk))


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


# --------------------------------------------------------------------------------- EPConfig overrides
EP_CONFIG_HELP = (
    "EPConfig field overrides as a JSON object, applied to mxep.default_config(device, hidden): "
    "scalars by name ({\"spread_parts\": 32, \"hw_cast\": false}); a KernelTiles field "
    "(dispatch, combine, copy, pull) as an object of the tile fields to change "
    "({\"dispatch\": {\"warps\": 4, \"programs_per_sm\": 16}}) or a full "
    "[block_m, block_n, warps, programs_per_sm] list. '{}' (default): the defaults.")
_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(KernelTiles))


def parse_ep_config(text: str | dict | None) -> dict:
    """Validate an ``--ep-config`` JSON object (see ``EP_CONFIG_HELP``) and return it as a dict.
    Checked against :class:`mxep.EPConfig` at once (unknown fields, wrong types, tiles that are
    not powers of two), so a launcher fails before it starts any worker."""
    if text is None or text == "":
        return {}
    overrides = json.loads(text) if isinstance(text, str) else dict(text)
    if not isinstance(overrides, dict):
        raise SystemExit(f"--ep-config must be a JSON object, got {text!r}")
    try:
        _apply(EPConfig(), overrides)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--ep-config {text!r}: {exc}") from None
    return overrides


def _apply(base: EPConfig, overrides: dict) -> EPConfig:
    names = {f.name: f for f in dataclasses.fields(EPConfig)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown EPConfig field {key!r} (fields: {', '.join(names)})")
        current = getattr(base, key)
        if isinstance(current, KernelTiles):
            if isinstance(value, (list, tuple)):
                value = KernelTiles(*value)
            elif isinstance(value, dict):
                bad = [k for k in value if k not in _TILE_FIELDS]
                if bad:
                    raise ValueError(f"unknown KernelTiles field(s) {bad} in {key!r} (fields: {', '.join(_TILE_FIELDS)})")
                value = dataclasses.replace(current, **value)
            else:
                raise TypeError(f"EPConfig.{key} takes an object of KernelTiles fields or a 4-element list, "
                                f"got {value!r}")
        changes[key] = value
    return dataclasses.replace(base, **changes)


def ep_config(overrides: dict | str | None, device: torch.device | str | None = None,
              hidden: int | None = None) -> EPConfig:
    """The :class:`mxep.EPConfig` of ``overrides`` (a dict from :func:`parse_ep_config`, or its
    JSON text) on top of ``mxep.default_config(device, hidden)``."""
    if not isinstance(overrides, dict):
        overrides = parse_ep_config(overrides)
    return _apply(default_config(device, hidden), overrides)


def ep_config_dict(cfg: EPConfig) -> dict:
    """``cfg`` as plain JSON data (the tiles as objects), for result headers."""
    return asdict(cfg)


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
    from _timing import environment

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
