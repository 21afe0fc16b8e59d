"""The unfused EP pipeline (gloo, 1-4 ranks) against the single-process layout oracle, bit for bit.

The ranks of the session's shared gloo worlds run every case (tests/support/worlds.py: process
startup dominates on 2 cores; a world of one runs here, without a process group); the ranks return their outputs and the comparison happens here, against mxep.ep.naive computed
locally without collectives.
"""
from __future__ import annotations

import zlib

import pytest
import torch

from support import worlds
from support.dist import ChildFailed, run_distributed

from mxep.ep.naive import (
    destination_of_rows,
    simulate_combine,
    simulate_dispatch_layout,
    simulate_dispatch_mxfp8,
    simulate_dispatch_rows,
)
from mxep.testing import ROUTING_KINDS, make_inputs, make_routing
from mxep.format.naive import dequantize_mxfp8_reference

# ------------------------------------------------------------------------------------------
# cases: (name, experts per rank, hidden, align, scale_mode, per-rank routing spec)
# a routing spec per rank: (kind, num_rows, make_routing kwargs)
# ------------------------------------------------------------------------------------------


def _cases(world: int) -> list[dict]:
    w = world
    return [
        dict(name="uniform", E=2 * w, H=96, align=32, mode="rceil",
             spec=[("uniform", 40 + 7 * r, {}) for r in range(w)]),
        dict(name="skewed_floor", E=4 * w, H=160, align=16, mode="floor",
             spec=[("skewed", 50 + 3 * r, {"fraction": 0.6}) for r in range(w)]),
        dict(name="one_expert", E=2 * w, H=64, align=128, mode="rceil",
             spec=[("one_expert", 20 + r, {"expert": 2 * w - 1}) for r in range(w)]),
        dict(name="empty_experts", E=4 * w, H=96, align=32, mode="rceil",
             spec=[("empty_experts", 45, {"num_empty": 2 * w}) for r in range(w)]),
        dict(name="rank0_sends_nothing", E=2 * w, H=32, align=16, mode="rceil",
             spec=[("none", 0, {})] + [("skewed", 30 + r, {"zero_experts": [0]}) for r in range(1, w)]),
        dict(name="nobody_sends", E=w, H=64, align=16, mode="rceil",
             spec=[("none", 0, {}) for _ in range(w)]),
    ]


def _seed(*parts) -> int:
    # not hash(): string hashing is salted per process, and the ranks are separate processes
    return zlib.crc32(repr(parts).encode())


def _inputs(case: dict, world: int, rank: int):
    kind, n, kw = case["spec"][rank]
    g = torch.Generator().manual_seed(_seed(case["name"], world, rank))
    counts = make_routing(n, case["E"], kind, g, **kw)
    return make_inputs(counts, case["H"], torch.bfloat16, g), counts


def _expert_out(case: dict, world: int, rank: int, pad_mask: torch.Tensor) -> torch.Tensor:
    """A random per-row 'expert output' with NaN in the pad rows (combine must never read them)."""
    g = torch.Generator().manual_seed(_seed("out", case["name"], world, rank))
    out = torch.randn(pad_mask.numel(), case["H"], generator=g).to(torch.bfloat16)
    out[pad_mask] = float("nan")
    return out


def _rank_body(rank: int, world: int, cases: list[dict]) -> list[dict]:
    from mxep.ep.naive_pipeline import unfused_combine, unfused_dispatch_bf16, unfused_dispatch_mxfp8

    results = []
    for case in cases:
        x, counts = _inputs(case, world, rank)
        res = unfused_dispatch_mxfp8(x, counts, align=case["align"], scale_mode=case["mode"])
        bf = unfused_dispatch_bf16(x, counts, align=case["align"])
        round_trip = unfused_combine(res.tokens.dequantize(), res.handle)
        # Pad rows are where the gather index points past the received rows (dest_rows misses them).
        pad = torch.ones(res.handle.num_padded_rows, dtype=torch.bool)
        pad[res.handle.dest_rows] = False
        fout = _expert_out(case, world, rank, pad)
        results.append(dict(
            qdata=res.tokens.qdata.view(torch.uint8).clone(), scale=res.tokens.scale.view(torch.uint8).clone(),
            offs=res.group_end_offsets, tpe=res.tokens_per_expert, bf16=bf.tokens,
            bf16_offs=bf.group_end_offsets, round_trip=round_trip, fout=fout,
            combined=unfused_combine(fout, res.handle),
        ))
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_unfused_pipeline_matches_oracle(world):
    cases = _cases(world)
    if world == 1:   # no process group: a single rank, the collectives are local copies (no spawn)
        per_rank = [_rank_body(0, 1, cases)]
    else:            # the session's shared gloo world of this size (support/worlds.py)
        per_rank = worlds.results(world, "ep/naive_pipeline")
    for ci, case in enumerate(cases):
        where = f"[W={world} case={case['name']}]"
        inputs = [_inputs(case, world, r) for r in range(world)]
        xs, counts = [i[0] for i in inputs], [i[1] for i in inputs]
        sim = simulate_dispatch_mxfp8(xs, counts, case["align"], case["mode"])
        layouts = simulate_dispatch_layout(counts, case["align"])
        sim_bf16 = simulate_dispatch_rows(xs, counts, case["align"])
        got = [per_rank[r][ci] for r in range(world)]
        sim_comb = simulate_combine([g["fout"] for g in got], layouts, counts)
        for r in range(world):
            g, s, lay = got[r], sim[r], layouts[r]
            assert g["offs"].dtype == torch.int32 and g["tpe"].dtype == torch.int32, where
            assert g["offs"].tolist() == s.group_end_offsets.tolist(), f"{where} rank {r} offsets"
            assert g["tpe"].tolist() == s.tokens_per_expert.tolist(), f"{where} rank {r} tokens_per_expert"
            assert torch.equal(g["qdata"], s.qdata.view(torch.uint8)), f"{where} rank {r} qdata bytes"
            assert torch.equal(g["scale"], s.scale.view(torch.uint8)), f"{where} rank {r} scale bytes"
            # pad rows: zero bytes (already implied by the byte equality; stated explicitly)
            assert not g["qdata"][lay.is_pad].any() and not g["scale"][lay.is_pad].any(), f"{where} rank {r} pads"
            assert torch.equal(g["bf16"].view(torch.int16), sim_bf16[r].view(torch.int16)), f"{where} rank {r} bf16"
            # round trip: combine(dequantize(dispatch(x))) == dequantize(quantize(x)), original order
            expect_rt = dequantize_mxfp8_reference(*_ref_quant(xs[r], case["mode"]), torch.bfloat16)
            assert torch.equal(g["round_trip"], expect_rt), f"{where} rank {r} round trip"
            assert torch.equal(g["combined"], sim_comb[r]), f"{where} rank {r} combine"


for _w in (2, 3, 4):
    worlds.register(_w, "ep/naive_pipeline", _rank_body, _cases(_w))


def _ref_quant(x, mode):
    from mxep.format.naive import to_mxfp8_reference

    return to_mxfp8_reference(x, mode)


# ------------------------------------------------------------------------------------------
# the oracle itself
# ------------------------------------------------------------------------------------------

def test_layout_hand_written_example():
    # docs/layout.md worked example: W=2, E=4 (L=2), align=4.
    # rank 0 sends a0..a5 to experts [0,0,0,2,2,3]; rank 1 sends b0..b5 to [0,2,2,2,2,2].
    counts = [torch.tensor([3, 0, 2, 1]), torch.tensor([1, 0, 5, 0])]
    d0, d1 = simulate_dispatch_layout(counts, align=4)
    assert d0.src_rank.tolist() == [0, 0, 0, 1, -1, -1, -1, -1]
    assert d0.src_row.tolist() == [0, 1, 2, 0, -1, -1, -1, -1]
    assert d0.group_end_offsets.tolist() == [4, 8] and d0.tokens_per_expert.tolist() == [4, 0]
    assert d1.src_rank.tolist() == [0, 0, 1, 1, 1, 1, 1, -1, 0, -1, -1, -1]
    assert d1.src_row.tolist() == [3, 4, 1, 2, 3, 4, 5, -1, 5, -1, -1, -1]
    assert d1.group_end_offsets.tolist() == [8, 12] and d1.tokens_per_expert.tolist() == [7, 1]
    assert d0.group_end_offsets.dtype == torch.int32 and d0.tokens_per_expert.dtype == torch.int32
    (r0, w0), (r1, w1) = destination_of_rows(counts, align=4)
    assert r0.tolist() == [0, 0, 0, 1, 1, 1] and w0.tolist() == [0, 1, 2, 0, 1, 8]
    assert r1.tolist() == [0, 1, 1, 1, 1, 1] and w1.tolist() == [3, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("world,experts,align", [(1, 3, 8), (2, 4, 32), (3, 6, 16), (4, 8, 128), (4, 4, 1)])
def test_closed_form_destinations_match_layout(world, experts, align):
    g = torch.Generator().manual_seed(world * 100 + experts)
    kinds = ["uniform", "skewed", "one_expert", "empty_experts", "none"]
    counts = [make_routing(0 if kinds[r % 5] == "none" else 37 * r + 5, experts, kinds[r % 5], g)
              for r in range(world)]
    layouts = simulate_dispatch_layout(counts, align)
    for s, (dr, drow) in enumerate(destination_of_rows(counts, align)):
        for i in range(drow.numel()):
            lay = layouts[int(dr[i])]
            assert (int(lay.src_rank[drow[i]]), int(lay.src_row[drow[i]])) == (s, i)
    for lay in layouts:
        sizes = torch.diff(lay.group_end_offsets, prepend=torch.zeros(1, dtype=torch.int32))
        assert (sizes % align == 0).all() and (sizes >= align).all() and (sizes >= lay.tokens_per_expert).all()
        assert lay.num_rows == int(lay.group_end_offsets[-1])


def test_simulate_combine_inverts_dispatch():
    counts = [torch.tensor([3, 0, 2, 1]), torch.tensor([1, 0, 5, 0])]
    xs = [torch.arange(6 * 32, dtype=torch.float32).view(6, 32) + 1000 * s for s in range(2)]
    placed = simulate_dispatch_rows(xs, counts, 4)
    back = simulate_combine(placed, simulate_dispatch_layout(counts, 4), counts)
    assert all(torch.equal(a, b) for a, b in zip(back, xs))


# ------------------------------------------------------------------------------------------
# routing and input validation (single process: no process group means world size 1)
# ------------------------------------------------------------------------------------------

def test_routing_kinds_deterministic():
    for kind in ROUTING_KINDS:
        n = 0 if kind == "none" else 200
        a = make_routing(n, 8, kind, torch.Generator().manual_seed(3))
        b = make_routing(n, 8, kind, torch.Generator().manual_seed(3))
        assert a.dtype == torch.int64 and a.shape == (8,) and int(a.sum()) == n and torch.equal(a, b), kind
    g = torch.Generator().manual_seed(0)
    assert int(make_routing(200, 8, "skewed", g, fraction=0.3, expert=5)[5]) >= 60
    assert (make_routing(200, 8, "one_expert", g, expert=2) == torch.tensor([0, 0, 200, 0, 0, 0, 0, 0])).all()
    assert int((make_routing(200, 8, "empty_experts", g, num_empty=3) == 0).sum()) >= 3
    assert int(make_routing(200, 8, "uniform", g, zero_experts=[1, 4])[[1, 4]].sum()) == 0
    with pytest.raises(ValueError, match="num_rows must be 0"):
        make_routing(5, 8, "none", g)
    with pytest.raises(ValueError, match="kind"):
        make_routing(5, 8, "zipf", g)
    x = make_inputs(torch.tensor([3, 0, 4]), 96, torch.bfloat16, torch.Generator().manual_seed(1))
    assert x.shape == (7, 96) and x.dtype == torch.bfloat16 and torch.isfinite(x).all()


def test_input_validation_errors():
    from mxep.ep.naive_pipeline import unfused_combine, unfused_dispatch_bf16, unfused_dispatch_mxfp8

    x = torch.randn(6, 64, dtype=torch.bfloat16)
    c = torch.tensor([2, 4])
    with pytest.raises(TypeError, match="bfloat16"):
        unfused_dispatch_mxfp8(x.float(), c)
    with pytest.raises(ValueError, match="2-D"):
        unfused_dispatch_mxfp8(x.view(6, 2, 32), c)
    with pytest.raises(ValueError, match="multiple of 32"):
        unfused_dispatch_mxfp8(torch.zeros(6, 48, dtype=torch.bfloat16), c)
    with pytest.raises(ValueError, match=r"1-D tensor \[E\]"):
        unfused_dispatch_mxfp8(x, c.view(1, 2))
    with pytest.raises(TypeError, match="int32 or int64"):
        unfused_dispatch_bf16(x, c.float())
    with pytest.raises(ValueError, match="sums to 5"):
        unfused_dispatch_mxfp8(x, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="align"):
        unfused_dispatch_mxfp8(x, c, align=0)
    with pytest.raises(ValueError, match="scale_mode"):
        unfused_dispatch_mxfp8(x, c, scale_mode="round")
    res = unfused_dispatch_mxfp8(x, c, align=4)  # world size 1 without a process group
    assert res.group_end_offsets.tolist() == [4, 8] and res.tokens.shape == (8, 64)
    with pytest.raises(ValueError, match="rows"):
        unfused_combine(torch.zeros(7, 64, dtype=torch.bfloat16), res.handle)


def _experts_not_multiple(rank, world):
    from mxep.ep.naive_pipeline import unfused_dispatch_mxfp8

    unfused_dispatch_mxfp8(torch.zeros(3, 32, dtype=torch.bfloat16), torch.tensor([1, 1, 1]))


def test_harness_reports_child_traceback():
    with pytest.raises(ChildFailed, match=r"(?s)rank \d of 2 failed.*multiple of the world size \(2\)"):
        run_distributed(_experts_not_multiple, 2, timeout=60)
