"""The benchmark configurations and their synthetic inputs, shared by ``benchmarks/`` and
``scripts/``: the shapes (:data:`CONFIGS`, and :data:`SMOKE_CONFIGS` for the CPU plumbing runs),
the per-rank routing of a launch (:func:`count_matrix`, from :func:`mxep.testing.make_routing`)
and one rank's inputs (:func:`make_case` for the row-level dispatch, :func:`make_token_case` for
the token-level one).

Deterministic given ``seed``: every rank computes the whole launch's routing locally (no
communication), and the same seed gives the same case on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxep.testing import make_inputs, make_routing

__all__ = [
    "BenchConfig", "CONFIGS", "SMOKE_CONFIGS", "ROUTINGS", "NVLINK_GBPS", "SKEW_FRACTION", "row_bytes",
    "count_matrix", "Case", "make_case", "TokenCase", "make_token_case",
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
