"""The scaling model of docs/scaling.md: bytes per rank of one MoE dispatch and combine on NVLink
and on the network, and the times they imply, for a DeepSeek-V3-like layer at EP 8-64 on 8-GPU
nodes. Pure arithmetic (no torch, no GPU) and deterministic: the routing expectations of the
model are exact formulas; the one Monte-Carlo (DeepEP's test gate, to read DeepEP's published
bandwidths as times) draws from Python's ``random.Random`` with a fixed seed.

    python scripts/scaling_model.py --markdown     # the tables
    python scripts/scaling_model.py                # all of docs/scaling.md, to stdout
    python scripts/scaling_model.py --write-doc    # rewrite docs/scaling.md

docs/scaling.md is this script's output; tests/ep/test_scaling_model.py fails when they differ.
The assumptions are listed in :func:`render_doc` (and so in the doc).
"""
from __future__ import annotations

import argparse
import functools
import os
import random
from dataclasses import dataclass
from math import comb

# The layer (DeepSeek-V3: 256 routed experts, top-8, hidden 7168, expert FFN 2048; a token's
# experts on at most 4 nodes), 4096 tokens per rank, 8 GPUs per node.
E, K, H, F, T = 256, 8, 7168, 2048, 4096
G = 8
NODE_LIMIT = 4
EP_SIZES = (8, 16, 32, 64)

# Link speeds, bytes/s per GPU and direction.
NVLINK_BPS = 450e9          # NVLink 4, H100 / H200 SXM (900 GB/s both directions)
NET_BPS = 50e9              # one 400 Gb/s NIC per GPU
H800_NVLINK_BPS = 160e9     # DeepEP's "~160 GB/s" on the H800 it measured on
BF16_FLOPS = 989e12         # H100 SXM dense bf16 peak, for the scale of the expert GEMMs

# Rows, bytes.
MX_ROW = H + H // 32        # MXFP8: e4m3 data + one e8m0 scale per 32
TOKEN_ROW = MX_ROW + 8 * K  # + mxep's slot table: K int32 layout rows + K fp32 gate weights
BF16_ROW = 2 * H

TRANSPORTS = ("flat", "hierarchical", "collective", "bf16")
LABEL = {"flat": "(i) flat token (mxep nvshmem)", "hierarchical": "(ii) hierarchical token",
         "collective": "(iii) mxep collective", "bf16": "(iv) bf16 all-to-all"}

# DeepEP V1's published normal (high-throughput) kernel figures, docs/legacy.md of
# github.com/deepseek-ai/DeepEP (the README before V2): H800 (~160 GB/s NVLink), one CX7
# InfiniBand 400 Gb/s NIC per GPU (~50 GB/s), 4096 tokens, H 7168, top-4 groups, top-8 experts,
# FP8 dispatch, BF16 combine. Internode bottleneck bandwidth (RDMA), GB/s: EP -> (dispatch, combine).
DEEPEP_URL = "https://github.com/deepseek-ai/DeepEP/blob/dd758caf451848bd150e1046af3d0a73e5fff38d/docs/legacy.md"
DEEPEP_TEST_URL = ("https://github.com/deepseek-ai/DeepEP/blob/dd758caf451848bd150e1046af3d0a73e5fff38d/"
                   "tests/legacy/test_internode.py")
DEEPEP_GBPS = {16: (43, 43), 32: (58, 57), 64: (51, 50)}
# DeepEP V2's README (same commit): SM90, CX7, 8K tokens, its own gate and byte count; quoted only.
DEEPEP_V2_GBPS = {"8x2": (90, 81), "8x4": (61, 61)}
# Its test's byte count: one row per (token, node hit), the source's own node included;
# H (1 + 4/128) bytes (e4m3 + one fp32 scale per 128) in the dispatch, 2 H in the combine.
DEEPEP_FP8_ROW = H * (1 + 4 / 128)
MC_TOKENS = 4096


# ---------------------------------------------------------------------------- routing

@dataclass(frozen=True)
class Routing:
    """Per-token expectations at EP ``W``: ``ranks`` and ``nodes`` distinct ones hit. The
    source's view follows by symmetry (every rank is a source alike): a hit rank is the source
    itself with probability ``1 / W``, another rank of its node ``(G - 1) / W``, on another node
    ``(W - G) / W``; a hit node is the source's with probability ``1 / N``."""
    W: int
    ranks: float
    nodes: float

    @property
    def num_nodes(self) -> int:
        return self.W // G

    @property
    def self_rank(self) -> float:
        return self.ranks / self.W

    @property
    def same_node_ranks(self) -> float:
        return self.ranks * (G - 1) / self.W

    @property
    def remote_ranks(self) -> float:
        return self.ranks * (self.W - G) / self.W

    @property
    def own_node(self) -> float:
        return self.nodes / self.num_nodes

    @property
    def remote_nodes(self) -> float:
        return self.nodes * (self.num_nodes - 1) / self.num_nodes

    # (token, expert) pairs: every expert is picked with probability K / E, whatever the node limit
    @property
    def pairs_same_node(self) -> float:
        return K * (G - 1) / self.W

    @property
    def pairs_remote(self) -> float:
        return K * (self.W - G) / self.W


def routing(W: int) -> Routing:
    """Uniform routing limited to ``m = min(4, N)`` nodes, exact: the token draws ``m`` of the
    ``N`` nodes uniformly, then ``K`` distinct experts uniformly among the ``P = m G L`` on
    them. A given node is drawn with probability ``m / N``; a set of ``x`` experts on the drawn
    nodes is hit with probability ``1 - C(P - x, K) / C(P, K)`` (``x = L`` for a rank, ``G L``
    for a node)."""
    N, L = W // G, E // W
    m = min(NODE_LIMIT, N)
    P = m * G * L

    def hit(x: int) -> float:
        return 1 - comb(P - x, K) / comb(P, K)

    return Routing(W, ranks=m * G * hit(L), nodes=m * hit(G * L))


@functools.lru_cache(maxsize=None)
def deepep_routing(W: int, tokens: int = MC_TOKENS, seed: int = 0) -> Routing:
    """Seeded Monte-Carlo of the gate of DeepEP's internode test: i.i.d. scores (only their order
    matters: uniform ones here), one group per node scored by its maximum, the top
    ``min(N, 4)`` groups kept, the top ``K`` experts among them. Mean distinct ranks and nodes
    per token."""
    rng = random.Random(seed * 1000 + W)
    N, L = W // G, E // W
    per_node = E // N
    ranks = nodes = 0
    for _ in range(tokens):
        s = [rng.random() for _ in range(E)]
        groups = sorted(range(N), key=lambda n: -max(s[n * per_node:(n + 1) * per_node]))[:min(NODE_LIMIT, N)]
        pool = [e for n in groups for e in range(n * per_node, (n + 1) * per_node)]
        top = sorted(pool, key=lambda e: -s[e])[:K]
        ranks += len({e // L for e in top})
        nodes += len({e // per_node for e in top})
    return Routing(W, ranks=ranks / tokens, nodes=nodes / tokens)


# ---------------------------------------------------------------------------- bytes and times

@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends in one forward dispatch and one combine (by symmetry, also what it
    receives), on NVLink and on the network."""
    dispatch_nvl: float
    dispatch_net: float
    combine_nvl: float
    combine_net: float


def traffic(r: Routing, transport: str, token_row: float = TOKEN_ROW) -> Traffic:
    W = r.W
    if transport == "flat":
        # one copy per (token, destination rank), from the source straight to the rank
        nvl, net = r.same_node_ranks, r.remote_ranks
    elif transport == "hierarchical":
        # one network copy per (token, other node), to the GPU of the source's local index there,
        # which forwards it over NVLink to the other ranks hit on its node (G - 1 of every G
        # remote destination ranks); the combine the same way back: the forwarder reduces its
        # node's partials and sends one bf16 row per (token, node) over the network
        nvl, net = r.same_node_ranks + r.remote_ranks * (G - 1) / G, r.remote_nodes
    elif transport == "collective":
        # fixed-size messages: T * K MXFP8 rows reserved for every peer, whatever the routing
        # (collective/transport.py: the source expands to T * K rows, max_tokens_per_rank * top_k
        # per peer); the combine sends the same slots back in bf16
        nvl, net = (G - 1) * T * K, (W - G) * T * K
        return Traffic(nvl * MX_ROW, net * MX_ROW, nvl * BF16_ROW, net * BF16_ROW)
    elif transport == "bf16":
        # one bf16 row per (token, expert) pair off the rank, both ways
        nvl, net = r.pairs_same_node * BF16_ROW, r.pairs_remote * BF16_ROW
        return Traffic(T * nvl, T * net, T * nvl, T * net)
    else:
        raise ValueError(transport)
    return Traffic(T * nvl * token_row, T * net * token_row, T * nvl * BF16_ROW, T * net * BF16_ROW)


def seconds(nvl: float, net: float, nvlink_bps: float = NVLINK_BPS) -> tuple[float, float]:
    """(overlapped, summed): the phase time if NVLink and network transfers run at the same time,
    and if one after the other."""
    a, b = nvl / nvlink_bps, net / NET_BPS
    return max(a, b), a + b


def times(t: Traffic, nvlink_bps: float = NVLINK_BPS) -> tuple[tuple[float, float], tuple[float, float]]:
    """((dispatch overlapped, summed), (combine overlapped, summed)), seconds."""
    return seconds(t.dispatch_nvl, t.dispatch_net, nvlink_bps), seconds(t.combine_nvl, t.combine_net, nvlink_bps)


def deepep_published_times(W: int) -> tuple[float, float]:
    """(dispatch s, combine s) of the layer in DeepEP's test at its published bandwidths: its
    own byte count (rows per (token, node), own node included) over its own GB/s."""
    rows = T * deepep_routing(W).nodes
    d, c = DEEPEP_GBPS[W]
    return rows * DEEPEP_FP8_ROW / (d * 1e9), rows * BF16_ROW / (c * 1e9)


def deepep_model_times(W: int) -> tuple[float, float]:
    """Model (ii) on DeepEP's setup: its gate, its row bytes, the H800's NVLink; overlapped."""
    (d, _), (c, _) = times(traffic(deepep_routing(W), "hierarchical", DEEPEP_FP8_ROW), H800_NVLINK_BPS)
    return d, c


def gemm_seconds() -> float:
    """The forward expert GEMMs of one rank (T K rows through w13 and w2) at the bf16 peak."""
    return 2 * T * K * H * 3 * F / BF16_FLOPS


# ---------------------------------------------------------------------------- tables

def _mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def _us(x: float) -> str:
    return f"{x * 1e6:,.0f}"


def routing_table() -> str:
    lines = ["| EP | nodes | experts per rank | distinct ranks hit per token: itself / same node / other nodes "
             "| distinct nodes hit: own / other | off-rank (token, expert) pairs: same node / other nodes |",
             "|---|---|---|---|---|---|"]
    for W in EP_SIZES:
        r = routing(W)
        lines.append(f"| {W} | {r.num_nodes} | {E // W} | {r.self_rank:.2f} / {r.same_node_ranks:.2f} / "
                     f"{r.remote_ranks:.2f} | {r.own_node:.2f} / {r.remote_nodes:.2f} | "
                     f"{r.pairs_same_node:.2f} / {r.pairs_remote:.2f} |")
    return "\n".join(lines)


def main_table() -> str:
    lines = ["| EP | transport | dispatch MB: NVLink / network | dispatch µs: overlapped / summed "
             "| combine MB: NVLink / network | combine µs: overlapped / summed | dispatch + combine µs (overlapped) |",
             "|---|---|---|---|---|---|---|"]
    for W in EP_SIZES:
        for name in TRANSPORTS:
            t = traffic(routing(W), name)
            d, c = times(t)
            lines.append(f"| {W} | {LABEL[name]} | {_mb(t.dispatch_nvl)} / {_mb(t.dispatch_net)} | "
                         f"{_us(d[0])} / {_us(d[1])} | {_mb(t.combine_nvl)} / {_mb(t.combine_net)} | "
                         f"{_us(c[0])} / {_us(c[1])} | {_us(d[0] + c[0])} |")
    return "\n".join(lines)


def deepep_table() -> str:
    lines = ["| EP | DeepEP published, GB/s (RDMA): dispatch / combine | its gate: ranks / nodes hit per token "
             "| its µs: dispatch / combine | model (ii) on its setup, µs | its share of the model bound |",
             "|---|---|---|---|---|---|"]
    for W in sorted(DEEPEP_GBPS):
        r = deepep_routing(W)
        pd, pc = deepep_published_times(W)
        md, mc = deepep_model_times(W)
        lines.append(f"| {W} | {DEEPEP_GBPS[W][0]} / {DEEPEP_GBPS[W][1]} | {r.ranks:.2f} / {r.nodes:.2f} | "
                     f"{_us(pd)} / {_us(pc)} | {_us(md)} / {_us(mc)} | {md / pd:.0%} / {mc / pc:.0%} |")
    return "\n".join(lines)


def markdown() -> str:
    return "\n\n".join([routing_table(), main_table(), deepep_table()]) + "\n"


# ---------------------------------------------------------------------------- the doc

def _total_us_s(W: int, name: str) -> float:
    """Dispatch + combine, overlapped, seconds."""
    d, c = times(traffic(routing(W), name))
    return d[0] + c[0]


def _total_us(W: int, name: str) -> str:
    return _us(_total_us_s(W, name))


def render_doc() -> str:
    tables = (routing_table(), main_table(), deepep_table())
    flat = {W: routing(W).remote_ranks for W in EP_SIZES}
    hier = {W: routing(W).remote_nodes for W in EP_SIZES}
    ratio = {W: flat[W] / hier[W] for W in EP_SIZES[1:]}
    slower = [_total_us_s(W, "flat") / _total_us_s(W, "hierarchical") for W in EP_SIZES[1:]]
    share = [m / p for W in DEEPEP_GBPS for m, p in zip(deepep_model_times(W), deepep_published_times(W))]
    v2 = DEEPEP_V2_GBPS
    over = [str(W) for W in EP_SIZES if _total_us_s(W, "hierarchical") > gemm_seconds()]
    coll64 = traffic(routing(64), "collective")
    flat64 = traffic(routing(64), "flat")
    v = dict(
        E=E, K=K, H=H, T=T, G=G, F=F, MX_ROW=MX_ROW, TOKEN_ROW=TOKEN_ROW, BF16_ROW=BF16_ROW,
        slot=8 * K, scales=H // 32, nvlink=f"{NVLINK_BPS / 1e9:.0f}", net=f"{NET_BPS / 1e9:.0f}",
        h800=f"{H800_NVLINK_BPS / 1e9:.0f}", mc=MC_TOKENS, deepep_url=DEEPEP_URL, deepep_test_url=DEEPEP_TEST_URL,
        routing_table=tables[0], main_table=tables[1], deepep_table=tables[2],
        r16=f"{ratio[16]:.1f}", r32=f"{ratio[32]:.1f}", r64=f"{ratio[64]:.1f}",
        over=(", ".join(over[:-1]) + " and " + over[-1]) if len(over) > 1 else (over or ["none"])[0],
        tmin=f"{min(slower):.1f}", tmax=f"{max(slower):.1f}",
        smin=f"{min(share):.0%}", smax=f"{max(share):.0%}",
        v2_82=f"{v2['8x2'][0]} / {v2['8x2'][1]}", v2_84=f"{v2['8x4'][0]} / {v2['8x4'][1]}",
        f16=f"{flat[16]:.2f}", f32=f"{flat[32]:.2f}", f64=f"{flat[64]:.2f}",
        h16=f"{hier[16]:.2f}", h32=f"{hier[32]:.2f}", h64=f"{hier[64]:.2f}",
        fl16=_total_us(16, "flat"), fl32=_total_us(32, "flat"), fl64=_total_us(64, "flat"),
        hi16=_total_us(16, "hierarchical"), hi32=_total_us(32, "hierarchical"),
        hi64=_total_us(64, "hierarchical"), fl8=_total_us(8, "flat"),
        bf16_16=_total_us(16, "bf16"), bf16_64=_total_us(64, "bf16"),
        co16=_total_us(16, "collective"), co64=_total_us(64, "collective"),
        coll64_gb=f"{(coll64.dispatch_nvl + coll64.dispatch_net) / 1e9:.1f}",
        flat64_mb=f"{(flat64.dispatch_nvl + flat64.dispatch_net) / 1e6:.0f}",
        gemm_tf=f"{2 * T * K * H * 3 * F / 1e12:.2f}", gemm_us=_us(gemm_seconds()),
        bf16_peak=f"{BF16_FLOPS / 1e12:.0f}",
        dg64=f"{deepep_routing(64).nodes:.2f}", um64=f"{routing(64).nodes:.2f}",
    )
    return _DOC.format(**v)


_DOC = """\
# Past one node: a bytes-and-links model, EP 8 to 64

What each transport moves per rank for one DeepSeek-V3-like MoE layer at EP 8, 16, 32 and 64 on
8-GPU nodes, and the times that implies at the published link speeds, beside DeepEP's published
internode figures. Nothing here was measured: it is arithmetic. `python scripts/scaling_model.py`
prints this file, every number in it included (`--markdown`: the tables alone; `--write-doc`:
rewrites it); `tests/ep/test_scaling_model.py` fails when the two disagree.

## Assumptions

* **Layer**: E = {E} routed experts, top-k = {K}, H = {H}, T = {T} tokens per rank, G = {G} GPUs per
  node, EP W (N = W/G nodes, L = E/W experts per rank, in contiguous blocks). Forward only; the
  backward moves bf16 rows the other way, each of its two phases a combine's bytes (one 2H row per
  (token, rank)), so a training step moves about one dispatch and three combines.
* **Routing**: uniform, limited to 4 nodes per token as DeepSeek-V3 does: the token draws
  m = min(4, N) of the N nodes uniformly, then k distinct experts uniformly among the P = m·G·L
  experts on them. Expectations are exact formulas, no sampling: a node is drawn with
  probability m/N and a set of x of the drawn experts is hit with probability
  1 − C(P−x, k)/C(P, k), so E[ranks hit] = m·G·(1 − C(P−L, k)/C(P, k)) and
  E[nodes hit] = m·(1 − C(P−G·L, k)/C(P, k)). Every rank is a source alike, so a hit rank is the
  source itself with probability 1/W, another rank of its node (G−1)/W, another node's (W−G)/W.
  The limit binds only at EP 64 (8 nodes); below it the routing is plain uniform top-k. Every
  expert keeps its marginal k/E, so the (token, expert) pairs split 1/W, (G−1)/W, (W−G)/W too.
* **Rows**: MXFP8 = H e4m3 + H/32 e8m0 = {MX_ROW} bytes; a token-level copy adds mxep's slot table
  ({K} int32 layout rows + {K} fp32 gate weights = {slot} bytes; the source token is the slot's
  position) = {TOKEN_ROW} bytes, (ii)'s network copy too (its k rows can carry their owner rank in
  spare bits); the combine's partial and the bf16 flow's rows are 2H = {BF16_ROW}
  bytes. A copy to the rank itself moves nothing; to its own node it crosses NVLink, to another
  node the network. Not counted: the count exchange (W·E int32), barriers, latency.
* **Transports**: (i) flat, one copy per (token, destination rank), straight from the source
  (mxep's symm_mem token path on one node, the `nvshmem` transport across nodes); (ii)
  hierarchical, one network copy per (token, destination node) to the GPU of the source's local
  index there, which forwards it over NVLink to the other ranks hit on its node, and a combine
  that reduces each node's partials there and sends one bf16 row per (token, node) back (DeepEP's
  internode mode); (iii) mxep's `collective` transport: the source expands its tokens and every
  peer gets a fixed message of T·{K} MXFP8 rows (`max_tokens_per_rank * top_k`,
  `src/mxep/ep/transport/collective/transport.py`), W·T·{K} rows per rank whatever the routing,
  the same slots back in bf16 in the combine; (iv) the usual bf16 all-to-all: one 2H row per
  (token, expert) pair off the rank, both ways.
* **Links**: NVLink {nvlink} GB/s per GPU per direction (H100 / H200 SXM), network {net} GB/s per GPU
  (one 400 Gb/s NIC each). A phase takes max(NVLink bytes / {nvlink} GB/s, network bytes / {net} GB/s)
  if the two overlap ("overlapped"), their sum if not ("summed"). 1 MB = 10^6 bytes.

## Routing, per token

{routing_table}

## Bytes and times, per rank, one forward dispatch and combine

{main_table}

For scale: this rank's forward expert GEMMs (T·{K} rows, F {F}) are {gemm_tf} TFLOP, {gemm_us} µs at the
H100's {bf16_peak} TFLOPS dense bf16 peak.

## Beside DeepEP

DeepEP V1 publishes its normal kernels' internode bandwidth for this very layer ({T} tokens, H {H},
top-4 groups, top-{K}, FP8 dispatch, BF16 combine) on H800 (~{h800} GB/s NVLink) with one CX7 400 Gb/s
InfiniBand NIC per GPU (~{net} GB/s) ([docs/legacy.md]({deepep_url}), the README's table before V2).
Its test ([tests/legacy/test_internode.py]({deepep_test_url})) counts as RDMA bytes one row per
(token, node hit), the source's own node included (a "logical" bandwidth: the own node's rows
never reach the NIC), at H·(1 + 4/128) bytes in the dispatch and 2H in the combine. Its gate keeps
the 4 nodes with the highest maximum score, then the top {K} among them: a seeded Monte-Carlo
({mc} tokens per EP, `random.Random`) gives its ranks and nodes per token ({dg64} nodes at EP 64
against {um64} for the model's uniform draw). "Its µs" = its byte count / its GB/s; "model (ii) on
its setup" = the hierarchical row of the model with its gate, its row bytes and the H800's
NVLink ({h800} GB/s), overlapped.

{deepep_table}

DeepEP reaches {smin}-{smax} of the model's bound, so the model is a fair yardstick for (ii). (DeepEP
V2's README now gives {v2_82} GB/s at EP 8x2 and {v2_84} at 8x4 on SM90 with CX7, but with 8K tokens,
a different gate and byte count; not converted here.)

## Conclusion

* One node (EP 8): no network; flat = hierarchical, NVLink-bound, {fl8} µs per dispatch + combine.
  The flat transport is the right one there.
* From EP 16 every token-level phase is network-bound, and the flat transport sends one network
  copy per remote *rank* hit where the hierarchical one sends one per remote *node*: {f16} against
  {h16} per token at EP 16 ({r16}x), {f32} against {h32} at EP 32 ({r32}x), {f64} against {h64} at EP 64
  ({r64}x). Dispatch + combine: flat {fl16} / {fl32} / {fl64} µs at EP 16 / 32 / 64, hierarchical {hi16} /
  {hi32} / {hi64}, against the {gemm_us} µs floor of the forward expert GEMMs.
* So the flat transport stops being enough as soon as the group spans two nodes: {tmin}-{tmax}x the
  hierarchical one's time at every EP past 8. It is still the correct first step across nodes:
  it beats the bf16 all-to-all ({bf16_16} / {bf16_64} µs at EP 16 / 64) and the collective ({co16} /
  {co64} µs; {coll64_gb} GB per rank per dispatch at EP 64 against {flat64_mb} MB). Even the hierarchical
  one passes the GEMM floor at EP {over}: hiding it takes overlap with other work, as DeepSeek-V3's
  DualPipe overlaps one micro-batch's communication with another's compute.
* The hierarchical transport (a later issue) would take: (1) a forwarding rank per (source,
  node), the GPU of the source's local index (rail-aligned NICs), receiving one copy per (token,
  node) with the token's whole slot table ({K} layout rows with their owner ranks, {K} weights); (2) an
  NVLink fan-out there into the destination ranks' token slots (symmetric memory or NVSHMEM
  within the node), chunked and signalled per chunk so that network and NVLink stages overlap
  (the "overlapped" column assumes this), with worst-case receive queues sized per source node;
  (3) a two-stage combine: owners send their bf16 partials over NVLink to the forwarder, which
  sums its node's in fp32 in rank order, rounds to bf16 and sends one row per (token, node); the
  source sums the nodes' rows in node order. Bit-identity with the other transports then needs
  one definition for all: each rank's partial rounded to bf16, the partials summed in fp32 per
  node in rank order and rounded, the nodes' sums in fp32 in node order and rounded. On one node
  that is today's arithmetic (a single node sum: a single rounding), so only the multi-node paths
  (flat `nvshmem`, collective) would change. (4) Own kernels on NVSHMEM's device API (`putmem_signal_block`,
  `signal_wait_until`): `all_to_all_vdev` has no two-hop form.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--markdown", action="store_true", help="print the tables only")
    g.add_argument("--write-doc", action="store_true", help="write docs/scaling.md")
    a = p.parse_args()
    if a.markdown:
        print(markdown(), end="")
    elif a.write_doc:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "docs", "scaling.md")
        with open(path, "w") as f:
            f.write(render_doc())
    else:
        print(render_doc(), end="")


if __name__ == "__main__":
    main()
