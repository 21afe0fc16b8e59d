"""scripts/scaling_model.py (the arithmetic of docs/scaling.md): the doc is the script's current
output, the script's numbers match values worked out by hand here, the routing formula matches a
seeded sampling of the same routing, and the claims the doc's conclusion makes still hold."""
import importlib.util
import os
import random
import subprocess
import sys
from math import comb

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "scaling_model.py")


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("scaling_model", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scaling_model"] = mod   # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_doc_is_the_scripts_output(sm):
    with open(os.path.join(ROOT, "docs", "scaling.md")) as f:
        doc = f.read()
    assert doc == sm.render_doc(), "docs/scaling.md is stale: python scripts/scaling_model.py --write-doc"
    tables = subprocess.run([sys.executable, SCRIPT, "--markdown"], capture_output=True, text=True, check=True).stdout
    assert tables == sm.markdown()
    for table in tables.strip().split("\n\n"):
        assert table in doc


def test_by_hand(sm):
    T, k, H, G = 4096, 8, 7168, 8
    assert (sm.T, sm.K, sm.H, sm.E, sm.G) == (T, k, H, 256, G)
    assert (sm.MX_ROW, sm.TOKEN_ROW, sm.BF16_ROW) == (7392, 7456, 14336)
    for W in (8, 16, 32, 64):
        r = sm.routing(W)
        # (iv) bf16 all-to-all: T k rows of 2H per rank, less the local share 1/W; the network
        # part is the pairs on the other W - 8 ranks
        bf = sm.traffic(r, "bf16")
        assert bf.dispatch_nvl + bf.dispatch_net == pytest.approx(T * k * 2 * H * (W - 1) / W, rel=1e-12)
        assert bf.dispatch_net == pytest.approx(T * k * 2 * H * (W - G) / W, rel=1e-12)
        assert (bf.combine_nvl, bf.combine_net) == (bf.dispatch_nvl, bf.dispatch_net)
        # (iii) collective: T k MXFP8 rows to each of the W - 1 peers, whatever the routing
        co = sm.traffic(r, "collective")
        assert (co.dispatch_nvl, co.dispatch_net) == (7 * T * k * 7392, (W - 8) * T * k * 7392)
        assert co.combine_net == (W - 8) * T * k * 2 * H
    # the figure: ~15 GB per rank per dispatch at EP 64
    co = sm.traffic(sm.routing(64), "collective")
    assert co.dispatch_nvl + co.dispatch_net == 63 * 4096 * 8 * 7392 == 15_259_926_528
    # EP 16 (2 nodes: the 4-node limit does not bind): a rank of 16 experts is hit with
    # probability 1 - C(240, 8) / C(256, 8); 8 of the 16 ranks are on the other node
    p = 1 - comb(240, 8) / comb(256, 8)
    r = sm.routing(16)
    assert r.ranks == pytest.approx(16 * p) and r.remote_ranks == pytest.approx(8 * p)
    assert r.remote_nodes == pytest.approx(1 - comb(128, 8) / comb(256, 8))
    fl = sm.traffic(r, "flat")
    assert fl.dispatch_net == pytest.approx(T * 8 * p * 7456) and fl.combine_net == pytest.approx(T * 8 * p * 2 * H)
    # EP 64: 4 of the 8 nodes drawn (128 experts), a rank (4 experts) hit w.p. 1 - C(124, 8)/C(128, 8)
    q = 1 - comb(124, 8) / comb(128, 8)
    r = sm.routing(64)
    assert r.ranks == pytest.approx(32 * q) and r.remote_ranks == pytest.approx(32 * q * 56 / 64)
    assert r.nodes == pytest.approx(4 * (1 - comb(96, 8) / comb(128, 8)))
    hi = sm.traffic(r, "hierarchical")
    assert hi.dispatch_net == pytest.approx(T * r.nodes * 7 / 8 * 7456)
    # times: max of the two links (overlapped) and their sum
    fl = sm.traffic(r, "flat")
    (d_max, d_sum), _ = sm.times(fl)
    assert d_max == pytest.approx(fl.dispatch_net / 50e9)
    assert d_sum == pytest.approx(fl.dispatch_net / 50e9 + fl.dispatch_nvl / 450e9)
    # DeepEP at EP 64: its rows (one per node hit, own included) of H (1 + 4/128) bytes at 51 GB/s
    d, c = sm.deepep_published_times(64)
    assert d == pytest.approx(T * sm.deepep_routing(64).nodes * 7392 / 51e9)
    assert c == pytest.approx(T * sm.deepep_routing(64).nodes * 2 * H / 50e9)


def test_formula_matches_sampling(sm):
    """The exact expectations against a seeded draw of the same routing (m of the N nodes, then
    8 distinct experts among theirs), and DeepEP's gate where it is the same routing (EP 16, 32:
    all nodes kept, plain uniform top-8)."""
    rng = random.Random(1)
    for W in (16, 64):
        N, L = W // 8, 256 // W
        m = min(4, N)
        n = 3000
        ranks = nodes = 0
        for _ in range(n):
            drawn = rng.sample(range(N), m)
            pool = [e for node in drawn for e in range(node * 8 * L, (node + 1) * 8 * L)]
            picked = rng.sample(pool, 8)
            ranks += len({e // L for e in picked})
            nodes += len({e // (8 * L) for e in picked})
        r = sm.routing(W)
        assert abs(ranks / n - r.ranks) < 0.06 and abs(nodes / n - r.nodes) < 0.04, (W, ranks / n, nodes / n)
    for W in (16, 32):
        mc, exact = sm.deepep_routing(W), sm.routing(W)
        assert abs(mc.ranks - exact.ranks) < 0.05 and abs(mc.nodes - exact.nodes) < 0.03


def test_project_byte_accounting(sm):
    """EP 8 (one node) is what benchmarks/wire_bytes.py (docs/wire-bytes.md) counts for config (a):
    the same rows, from sampled routing."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from wire_bytes import wire
    finally:
        sys.path.pop(0)
    from mxep.testing.cases import CONFIGS

    w = wire(CONFIGS["a"], 8)
    fl = sm.traffic(sm.routing(8), "flat")
    assert fl.dispatch_net == 0 and fl.dispatch_nvl == pytest.approx(w["token_dispatch"], rel=0.01)
    assert fl.combine_nvl == pytest.approx(w["token_combine"], rel=0.01)


def test_conclusion_claims(sm):
    """What docs/scaling.md's conclusion says about the table."""
    total = {(W, t): sm._total_us_s(W, t) for W in sm.EP_SIZES for t in sm.TRANSPORTS}
    assert sm.traffic(sm.routing(8), "flat") == sm.traffic(sm.routing(8), "hierarchical")
    for W in sm.EP_SIZES[1:]:
        for t in ("flat", "hierarchical"):
            tr = sm.traffic(sm.routing(W), t)
            assert tr.dispatch_net / 50e9 > tr.dispatch_nvl / 450e9 and tr.combine_net / 50e9 > tr.combine_nvl / 450e9
        assert total[W, "hierarchical"] * 1.9 < total[W, "flat"] < total[W, "bf16"] < total[W, "collective"]
    for W in sm.DEEPEP_GBPS:   # DeepEP within the model's bound, and not far from it
        for model, published in zip(sm.deepep_model_times(W), sm.deepep_published_times(W)):
            assert 0.7 < model / published < 1.0
