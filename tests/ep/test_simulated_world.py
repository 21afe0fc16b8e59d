"""Fused MXFP8 dispatch / combine on CPU: the peer-store kernels in a simulated world (Triton
interpreter), and the public Buffer API on 1-4 gloo processes. All against the single-process
oracle in mxep.reference.layout, bit for bit."""
import pytest
import torch

from _dist import run_distributed
from _fused_cases import Case, cases_for_world, check_dispatch, expected_combine, run_buffer_case

import mxep
from mxep.comm.simulated import POISON, SimulatedWorld
from mxep.reference.layout import simulate_dispatch_layout


# ----------------------------------------------------------------------------- simulated world
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_world_dispatch_combine(world):
    for case in cases_for_world(world, hidden=(96, 256), aligns=(16, 32, 128))[:5]:
        counts, xs = case.inputs()
        sim = SimulatedWorld(world, case.num_experts, case.hidden, case.max_tokens, case.align, case.scale_mode)
        res = sim.dispatch(xs, counts)
        for r in range(world):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
        grads, outs, gys = case.upstream(sim.capacity)
        handles = [x.handle for x in res]
        exp = expected_combine(case, outs, counts)
        for mode in ("push", "pull"):
            ys = sim.combine(outs, handles, mode=mode)
            for r in range(world):
                assert torch.equal(ys[r], exp[r]), mode
        back = sim.dispatch_bf16(gys, handles)
        lays = simulate_dispatch_layout(counts, case.align)
        for r in range(world):
            R = lays[r].num_rows
            pad = lays[r].is_pad
            assert (back[r][:R][pad] == 0).all()
            src = lays[r]
            for p in (~pad).nonzero().flatten().tolist():
                assert torch.equal(back[r][p], gys[int(src.src_rank[p])][int(src.src_row[p])])


@pytest.mark.parametrize("tuning", [
    dict(dispatch_block_m=1, dispatch_block_k=64, combine_block_m=4, combine_block_n=64, peer_order="spread"),
    dict(dispatch_block_m=4, dispatch_block_k=64, combine_block_m=8, combine_block_n=32,
         copy_block_m=2, copy_block_n=64, peer_order="natural", sync="flags"),
    dict(dispatch_block_m=2, dispatch_block_k=256, combine_block_m=1, combine_block_n=256, peer_order="spread",
         pull_block_m=4),
])
def test_simulated_world_kernel_tunings(tuning, monkeypatch):
    """Every tuning knob gives the same bytes: partial column chunks (H=96 with 64-wide chunks),
    row blocks that do not divide the rows, every peer order, push or pull."""
    from mxep.kernels.rows import TUNING

    for k, v in tuning.items():
        monkeypatch.setitem(TUNING, k, v)
    case = Case(3, 9, 96, 40, 32, ("skewed", "none", "uniform"), (37, 0, 23), seed=11)
    counts, xs = case.inputs()
    sim = SimulatedWorld(3, 9, 96, 40, 32)
    res = sim.dispatch(xs, counts)
    for r in range(3):
        check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
    _, outs, _ = case.upstream(sim.capacity)
    for mode in ("push", "pull"):
        ys = sim.combine(outs, [x.handle for x in res], mode=mode)
        for y, e in zip(ys, expected_combine(case, outs, counts)):
            assert torch.equal(y, e)


def test_simulated_world_zero_copy_combine():
    """Owners write expert outputs into their own region (poisoned pads and tail stay as they
    are: never read); sources pull bit-exact rows; a rank with no rows gets [0, H]."""
    case = Case(3, 6, 160, 30, 32, ("skewed", "uniform", "none"), (29, 17, 0), seed=5)
    counts, xs = case.inputs()
    sim = SimulatedWorld(3, 6, 160, 30, 32)
    res = sim.dispatch(xs, counts)
    _, outs, _ = case.upstream(sim.capacity)
    zin = sim.combine_inputs()
    for r in range(3):
        R = int(res[r].group_end_offsets[-1])
        zin[r][:R].copy_(outs[r][:R])      # rows past the end keep whatever was there
    ys = sim.combine(zin, [x.handle for x in res], mode="pull")
    for y, e in zip(ys, expected_combine(case, outs, counts)):
        assert torch.equal(y, e)
    assert ys[2].shape == (0, 160)


@pytest.mark.parametrize("sync", ["barrier", "flags", "counts_flags"])
def test_simulated_world_zero_copy_dispatch(sync, monkeypatch):
    """zero_copy: every rank's tokens are its receive region (own rows and pad zeros written
    there by its push, other ranks' rows by theirs): bit-exact, no copy-out, rows past the end
    untouched (poison), and the next dispatch overwrites them (the documented lifetime)."""
    from mxep.kernels.rows import TUNING

    monkeypatch.setitem(TUNING, "sync", sync)
    sim = SimulatedWorld(3, 6, 96, 30, 32)
    first = None
    for it, routing in enumerate([("skewed", "none", "uniform"), ("one_expert", "empty_experts", "skewed")]):
        rows = tuple(0 if k == "none" else 11 + 6 * r + 4 * it for r, k in enumerate(routing))   # <= 30
        case = Case(3, 6, 96, 30, 32, routing, rows, seed=70 + it)
        counts, xs = case.inputs()
        res = sim.dispatch(xs, counts, zero_copy=True)
        for r in range(3):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
            assert res[r].tokens.qdata.data_ptr() == sim.peers[r].dispatch_data.data_ptr()
            if it == 0:
                R = int(res[r].group_end_offsets[-1])
                assert (sim.peers[r].dispatch_data[R:sim.capacity] == POISON).all()
        _, outs, _ = case.upstream(sim.capacity)
        for y, e in zip(sim.combine(outs, [x.handle for x in res]), expected_combine(case, outs, counts)):
            assert torch.equal(y, e)
        if it == 0:
            first = (res[2].tokens.qdata.view(torch.uint8).clone(), res[2].tokens.qdata.view(torch.uint8))
    # the first call's tokens now show the second call's rows: the same memory
    assert torch.equal(first[1], res[2].tokens.qdata.view(torch.uint8)) and not torch.equal(first[0], first[1])


def test_simulated_world_poison_outside_rows_untouched():
    """Rows past group_end_offsets[-1] are never written in the receive regions (poison stays),
    so the copy-out provably reads only rows the dispatch wrote or zeroed. Rows a rank sends to
    itself never touch its region: the push writes them straight into the output."""
    case = Case(2, 4, 64, 24, 32, ("uniform", "skewed"), (11, 24), seed=3)
    counts, xs = case.inputs()
    sim = SimulatedWorld(2, 4, 64, 24, 32)
    res = sim.dispatch(xs, counts)
    for r in range(2):
        R = int(res[r].group_end_offsets[-1])
        region = sim.peers[r].dispatch_data
        assert (region[R:sim.capacity] == POISON).all()
        # every row below R was written (no poison row survives among data rows, pads are zero)
        lay = simulate_dispatch_layout(counts, 32)[r]
        from_peer = ~lay.is_pad & (lay.src_rank != r)
        from_self = ~lay.is_pad & (lay.src_rank == r)
        assert not (region[:R][from_peer] == POISON).all(1).any()
        assert from_self.any() and (region[:R][from_self] == POISON).all()


def test_simulated_world_many_calls_changing_routing():
    sim = SimulatedWorld(3, 6, 64, 30, 16)
    for it in range(6):
        kinds = [("uniform", "skewed", "one_expert", "empty_experts", "none")[(it + r) % 5] for r in range(3)]
        rows = tuple(0 if k == "none" else 5 + 9 * ((it + r) % 3) for r, k in enumerate(kinds))
        case = Case(3, 6, 64, 30, 16, tuple(kinds), rows, seed=100 + it)
        counts, xs = case.inputs()
        res = sim.dispatch(xs, counts)
        for r in range(3):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)


# ----------------------------------------------------------------------------- Buffer on gloo
def _buffer_body(rank, world, cases):
    for case in cases:
        buf = mxep.Buffer(None, num_experts=case.num_experts, hidden=case.hidden,
                          max_tokens_per_rank=case.max_tokens, align=case.align, scale_mode=case.scale_mode)
        assert buf.transport_name == "collective" and "collective" in repr(buf)
        run_buffer_case(buf, case, rank, torch.device("cpu"))
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_buffer_gloo(world):
    cases = cases_for_world(world, hidden=(96,), aligns=(16, 128))
    assert all(run_distributed(_buffer_body, world, cases, timeout=240))


def _functional_alias_body(rank, world):
    case = Case(world, 2 * world, 64, 20, 32, ("skewed",) * world, (19,) * world, seed=5)
    counts, xs = case.inputs()
    buf = mxep.Buffer(None, case.num_experts, case.hidden, case.max_tokens)
    res = mxep.a2a_dispatch_and_group_mxfp8_fwd_hp_bwd(xs[rank], counts[rank], buf)
    check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)
    return True


def test_functional_alias_gloo():
    assert all(run_distributed(_functional_alias_body, 2))


# ----------------------------------------------------------------------------- bad input
def _bad_input_body(rank, world):
    buf = mxep.Buffer(None, num_experts=4, hidden=64, max_tokens_per_rank=8, debug=True)
    good_x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)).bfloat16()  # same on all ranks
    good_c = torch.tensor([2, 0, 3, 0])
    checks = [
        (TypeError, lambda: buf.dispatch(good_x.float(), good_c)),
        (ValueError, lambda: buf.dispatch(torch.randn(5, 96).bfloat16(), good_c)),
        (ValueError, lambda: buf.dispatch(torch.randn(9, 64).bfloat16(), torch.tensor([9, 0, 0, 0]))),
        (ValueError, lambda: buf.dispatch(good_x, torch.tensor([2, 3]))),
        (TypeError, lambda: buf.dispatch(good_x, good_c.float())),
        (ValueError, lambda: buf.dispatch(good_x, torch.tensor([2, 0, 2, 0]))),   # debug: sum != n
        (ValueError, lambda: buf.combine(torch.zeros(3, 64).bfloat16(), None)),
    ]
    for exc, fn in checks:
        with pytest.raises(exc):
            fn()
    with pytest.raises(ValueError, match="multiple of 32"):
        mxep.Buffer(None, num_experts=4, hidden=48, max_tokens_per_rank=8)
    with pytest.raises(ValueError, match="multiple of the group size"):
        mxep.Buffer(None, num_experts=3, hidden=64, max_tokens_per_rank=8)
    # after the errors the buffer still works (nothing was corrupted)
    res = buf.dispatch(good_x, good_c)
    assert res.tokens_per_expert.tolist() == ([4, 0] if rank == 0 else [6, 0])   # both ranks send [2, 0, 3, 0]
    first = good_x[:2] if rank == 0 else good_x[2:]
    assert torch.equal(res.tokens.dequantize()[: first.shape[0]], mxep.to_mxfp8(first).dequantize())
    return True


def test_bad_input_gloo():
    assert all(run_distributed(_bad_input_body, 2))


def test_simulated_world_special_values():
    """The dispatch kernel quantizes like the reference on awkward values too: bf16 subnormals,
    all-zero blocks, NaN/Inf blocks (0xFF scale, NaN elements) next to normal blocks."""
    from mxep.reference.mxfp8 import to_mxfp8_reference

    g = torch.Generator().manual_seed(11)
    counts = [torch.tensor([3, 2, 0, 1]), torch.tensor([0, 4, 2, 0])]
    xs = []
    for c in counts:
        x = torch.randn(int(c.sum()), 128, generator=g)
        x[0, :32] = 0.0                                    # all-zero block
        x[1, 32:64] *= 2.0 ** -130                         # bf16 subnormals
        x[-1, 64:96] = float("nan") if x.shape[0] > 3 else float("inf")
        x[2, 96:] = torch.tensor([-31.13, 15.5, 0.0157] * 10 + [447.9, -0.0])  # carries into exponent
        xs.append(x.bfloat16())
    sim = SimulatedWorld(2, 4, 128, 8, 32)
    res = sim.dispatch(xs, counts)
    lays = simulate_dispatch_layout(counts, 32)
    for r in range(2):
        for p in (~lays[r].is_pad).nonzero().flatten().tolist():
            s, i = int(lays[r].src_rank[p]), int(lays[r].src_row[p])
            q, sc = to_mxfp8_reference(xs[s][i:i + 1], "rceil")
            assert torch.equal(res[r].tokens.qdata[p].view(torch.uint8), q[0].view(torch.uint8))
            assert torch.equal(res[r].tokens.scale[p].view(torch.uint8), sc[0].view(torch.uint8))


def test_inconsistent_counts_write_nothing_outside():
    """Counts that claim more rows than x has (only caught in debug mode: it needs a host sync)
    must not make any rank write outside its receive region; the next valid call is exact."""
    sim = SimulatedWorld(2, 4, 64, 16, 32)
    xs = [torch.randn(16, 64).bfloat16(), torch.randn(5, 64).bfloat16()]
    bogus = [torch.tensor([1000, 0, 0, 700]), torch.tensor([0, 0, 0, 2 ** 30])]
    res = sim.dispatch(xs, bogus)
    for p in sim.peers:
        assert (p.combine_bf16.view(torch.uint8) == POISON).all()   # the region after the dispatch region
        assert (p.dispatch_data[sim.capacity] == POISON).all()      # the scratch row
    # Both combines stay inside their regions too (scratch rows untouched, outputs [n, H]).
    eo = [torch.randn(sim.capacity, 64).bfloat16() for _ in range(2)]
    for mode in ("pull", "push"):
        ys = sim.combine(eo, [r.handle for r in res], mode=mode)
        assert [tuple(y.shape) for y in ys] == [(16, 64), (5, 64)]
        for p in sim.peers:
            assert (p.combine_bf16[16].view(torch.uint8) == POISON).all()
            assert (p.dispatch_bf16[sim.capacity].view(torch.uint8) == POISON).all()
    case = Case(2, 4, 64, 16, 32, ("skewed", "uniform"), (16, 9), seed=21)
    counts, xs = case.inputs()
    res = sim.dispatch(xs, counts)
    for r in range(2):
        check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)


def _inconsistent_counts_body(rank, world):
    buf = mxep.Buffer(None, num_experts=4, hidden=64, max_tokens_per_rank=16)
    x = torch.randn(5, 64).bfloat16()
    res = buf.dispatch(x, torch.tensor([40, 0, 3, 2 ** 20]))        # garbage counts: no crash
    buf.combine(torch.zeros(buf.capacity, 64).bfloat16(), res.handle)
    case = Case(world, 4, 64, 16, 32, ("uniform",) * world, (11,) * world, seed=4)
    counts, xs = case.inputs()
    res = buf.dispatch(xs[rank], counts[rank])
    check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)
    return True


def test_inconsistent_counts_gloo():
    assert all(run_distributed(_inconsistent_counts_body, 2))


def test_env_tuning_override_is_checked(monkeypatch):
    """MXEP_TUNING overrides knobs; typos, wrong types and non-powers of two raise."""
    from mxep.kernels import rows

    for k in ("combine_block_n", "combine_mode", "peer_order", "sync"):
        monkeypatch.setitem(rows.TUNING, k, rows.TUNING[k])
    rows._apply_env_tuning('{"combine_block_n": 1024, "combine_mode": "pull", "peer_order": "spread", "sync": "flags"}')
    assert rows.TUNING["combine_block_n"] == 1024 and rows.TUNING["combine_mode"] == "pull"
    assert rows.TUNING["peer_order"] == "spread" and rows.TUNING["sync"] == "flags"
    for bad in ('{"combine_blockn": 1024}', '{"combine_block_n": "1024"}', '{"combine_block_n": 1000}',
                '{"combine_mode": "pul"}', '{"peer_order": "random"}', '{"sync": "flag"}', '{"spread_parts": 0}', '{"combine_block_n": true}', '[1, 2]'):
        with pytest.raises(ValueError):
            rows._apply_env_tuning(bad)
