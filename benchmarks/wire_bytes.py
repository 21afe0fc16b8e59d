"""Bytes on the wire per rank of the row-level and the token-level dispatch and combine,
computed from the routing (no GPU): configs (a), (b), (c) of mxep.testing.cases at W = 2, 4,
8, uniform top-k routing (every token picks k distinct experts uniformly at random), seed 0.

* row-level dispatch: every (token, expert) pair whose expert lives on another rank crosses
  once: ``H + H/32`` bytes (MXFP8 data + e8m0 scales); its combine sends ``2H`` bytes back
  (bf16) per such pair.
* token-level dispatch: every (token, rank) pair with at least one of the token's experts on
  another rank crosses once: ``H + H/32`` bytes plus its slot table (k int32 rows + k fp32
  weights); its combine sends one bf16 partial (``2H``) back per such pair. The backward passes
  move the same rows in bf16 in the other direction.

    python benchmarks/wire_bytes.py [--out docs/wire-bytes.md]
"""
from __future__ import annotations

import argparse

import torch

from mxep.testing.cases import CONFIGS


def wire(cfg, W: int, seed: int = 0) -> dict:
    T, k, E, H = cfg.tokens, cfg.topk, cfg.experts, cfg.hidden
    L = E // W
    g = torch.Generator().manual_seed(seed)
    rows = pairs = 0
    for r in range(W):
        idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]          # k distinct experts per token
        owner = idx // L
        rows += int((owner != r).sum())
        hit = torch.zeros(T, W, dtype=torch.bool)
        hit.scatter_(1, owner, True)
        hit[:, r] = False
        pairs += int(hit.sum())
    rows, pairs = rows / W, pairs / W
    return dict(config=cfg.name, world=W, offrank_pairs_per_token=rows / T, offrank_ranks_per_token=pairs / T,
                row_dispatch=rows * (H + H // 32), token_dispatch=pairs * (H + H // 32 + 8 * k),
                row_combine=rows * 2 * H, token_combine=pairs * 2 * H)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    lines = ["| config | W | off-rank copies per token, rows / tokens | dispatch MB per rank, rows / tokens | "
             "combine MB per rank, rows / tokens | saved |",
             "|---|---|---|---|---|---|"]
    for name in ("a", "b", "c"):
        for W in (2, 4, 8):
            cfg = CONFIGS[name]
            if cfg.experts % W:
                continue
            w = wire(cfg, W)
            lines.append(f"| ({name}) | {W} | {w['offrank_pairs_per_token']:.2f} / {w['offrank_ranks_per_token']:.2f} | "
                         f"{w['row_dispatch'] / 1e6:.1f} / {w['token_dispatch'] / 1e6:.1f} | "
                         f"{w['row_combine'] / 1e6:.1f} / {w['token_combine'] / 1e6:.1f} | "
                         f"{1 - w['token_dispatch'] / max(w['row_dispatch'], 1):.0%} / "
                         f"{1 - w['token_combine'] / max(w['row_combine'], 1):.0%} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
