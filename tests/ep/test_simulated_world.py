"""The symmetric-memory transport's kernels (dispatch push, copy-out, push combine, pull combine)
in a simulated world of several ranks in one process (Triton interpreter), against the
single-process oracle in mxep.ep.naive, bit for bit. Every output starts as poison
(``EPConfig(poison_outputs=True)``)."""
import pytest
import torch

from support.fused_cases import POISON as POISON_CONFIG
from support.fused_cases import POISON_ONE_PART
from support.fused_cases import Case, cases_for_world, check_dispatch, expected_combine

from mxep.ep.config import EPConfig, KernelTiles
from mxep.ep.naive import simulate_dispatch_layout
from mxep.ep.transport.symm_mem.memory import POISON
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld


def world_for(case: Case, config: EPConfig = POISON_CONFIG, **kw) -> SimulatedWorld:
    return SimulatedWorld(case.world, case.num_experts, case.hidden, case.max_tokens, case.align, case.scale_mode,
                          config=config, **kw)


def pull_combine(sim: SimulatedWorld, outs, handles, rows=None):
    """The zero-copy pull: every owner writes its expert outputs (rows ``[0, rows[r])``, default
    all) into its combine input, then every source reads its rows from the owners."""
    zin = sim.combine_inputs()
    for r, o in enumerate(outs):
        n = o.shape[0] if rows is None else rows[r]
        zin[r][:n].copy_(o[:n])
    return sim.combine(zin, handles)


# ----------------------------------------------------------------------------- simulated world
# Of cases_for_world(hidden=(96, 256), aligns=(16, 32, 128)): 0 (96, 16), 1 (96, 32), 2 (96, 128),
# 3 (256, 16), 4 (256, 32), 5 (256, 128), then 6: a rank sending nothing while the others send
# everything to one expert (floor scales). Every hidden size, align and the floor case run on
# some world; the interpreter pays per row and per pad row, so the large worlds take the fewest
# (align 128 on one rank only).
SIMULATED_CASES = {1: (2, 4), 2: (0, 6), 3: (1, 6), 4: (3,)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_world_dispatch_combine(world):
    cases = cases_for_world(world, hidden=(96, 256), aligns=(16, 32, 128), max_tokens=16, rows=(5, 4))
    for case in (cases[i] for i in SIMULATED_CASES[world]):
        counts, xs = case.inputs()
        sim = world_for(case)
        res = sim.dispatch(xs, counts)
        for r in range(world):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
        grads, outs, gys = case.upstream(sim.capacity)
        handles = [x.handle for x in res]
        exp = expected_combine(case, outs, counts)
        for mode, ys in (("push", sim.combine(outs, handles)), ("pull", pull_combine(sim, outs, handles))):
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


@pytest.mark.parametrize("config", [
    EPConfig(dispatch=KernelTiles(1, 64, 4, 8), combine=KernelTiles(4, 64, 4, 8), poison_outputs=True),
    EPConfig(dispatch=KernelTiles(4, 64, 4, 8), combine=KernelTiles(8, 32, 4, 8), copy=KernelTiles(2, 64, 4, 8),
             spread_parts=1, poison_outputs=True),
    EPConfig(dispatch=KernelTiles(2, 256, 4, 8), combine=KernelTiles(1, 256, 4, 8), pull=KernelTiles(4, 64, 4, 8),
             spread_parts=3, poison_outputs=True),
], ids=["dispatch1x64", "blocks4x64-walk-from-row-0", "dispatch2x256-spread3"])
def test_simulated_world_kernel_tunings(config):
    """Every kernel configuration gives the same bytes: partial column chunks (H=96 with 64-wide
    chunks), row blocks that do not divide the rows, the rows walked from row 0 (one part) or
    interleaved (3 parts, the default 16), push and pull combine."""
    case = Case(3, 9, 96, 24, 16, ("skewed", "none", "uniform"), (21, 0, 13), seed=11)
    counts, xs = case.inputs()
    sim = world_for(case, config)
    res = sim.dispatch(xs, counts)
    for r in range(3):
        check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
    _, outs, _ = case.upstream(sim.capacity)
    handles = [x.handle for x in res]
    for mode, ys in (("push", sim.combine(outs, handles)), ("pull", pull_combine(sim, outs, handles))):
        for y, e in zip(ys, expected_combine(case, outs, counts)):
            assert torch.equal(y, e), mode


def test_simulated_world_zero_copy_combine():
    """Owners write expert outputs into their own region (poisoned pads and tail stay as they
    are: never read); sources pull bit-exact rows; a rank with no rows gets [0, H]."""
    case = Case(3, 6, 160, 30, 32, ("skewed", "uniform", "none"), (29, 17, 0), seed=5)
    counts, xs = case.inputs()
    sim = world_for(case)
    res = sim.dispatch(xs, counts)
    _, outs, _ = case.upstream(sim.capacity)
    zin = sim.combine_inputs()
    for r in range(3):
        R = int(res[r].group_end_offsets[-1])
        zin[r][:R].copy_(outs[r][:R])      # rows past the end keep whatever was there
    ys = sim.combine(zin, [x.handle for x in res])
    for y, e in zip(ys, expected_combine(case, outs, counts)):
        assert torch.equal(y, e)
    assert ys[2].shape == (0, 160)


def test_simulated_world_zero_copy_dispatch():
    """zero_copy: every rank's tokens are its receive region (own rows and pad zeros written
    there by its push, other ranks' rows by theirs): bit-exact, no copy-out, rows past the end
    untouched (poison), and the next dispatch overwrites them (the documented lifetime)."""
    sim = SimulatedWorld(3, 6, 96, 30, 8, config=POISON_CONFIG)
    first = None
    for it, routing in enumerate([("skewed", "none", "uniform"), ("one_expert", "empty_experts", "skewed")]):
        rows = tuple(0 if k == "none" else 11 + 6 * r + 4 * it for r, k in enumerate(routing))   # <= 30
        case = Case(3, 6, 96, 30, 8, routing, rows, seed=70 + it)
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
    sim = world_for(case)
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
    sim = SimulatedWorld(3, 6, 64, 20, 8, config=POISON_ONE_PART)
    for it in range(6):
        kinds = [("uniform", "skewed", "one_expert", "empty_experts", "none")[(it + r) % 5] for r in range(3)]
        rows = tuple(0 if k == "none" else 1 + 5 * ((it + r) % 3) for r, k in enumerate(kinds))
        case = Case(3, 6, 64, 20, 8, tuple(kinds), rows, seed=100 + it)
        counts, xs = case.inputs()
        res = sim.dispatch(xs, counts)
        for r in range(3):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)


def test_simulated_world_special_values():
    """The dispatch kernel quantizes like the reference on awkward values too: bf16 subnormals,
    all-zero blocks, NaN/Inf blocks (0xFF scale, NaN elements) next to normal blocks."""
    from mxep.format.naive import to_mxfp8_reference

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
    sim = SimulatedWorld(2, 4, 128, 8, 32, config=POISON_CONFIG)
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
    are clamped on the device and must not make any rank write outside its receive region; the
    status word records them (BAD_COUNTS); the next valid call is exact."""
    from mxep.ep.transport.base import BAD_COUNTS

    sim = SimulatedWorld(2, 4, 64, 16, 32, config=POISON_CONFIG)
    xs = [torch.randn(16, 64).bfloat16(), torch.randn(5, 64).bfloat16()]
    bogus = [torch.tensor([1000, 0, 0, 700]), torch.tensor([0, 0, 0, 2 ** 30])]
    res = sim.dispatch(xs, bogus)
    for p in sim.peers:
        assert (p.combine_region.view(torch.uint8) == POISON).all()   # the region after the dispatch region
        assert (p.dispatch_data[sim.capacity] == POISON).all()      # the scratch row
        assert p.status() == BAD_COUNTS
    # Both combines stay inside their regions too (scratch rows untouched, outputs [n, H]).
    eo = [torch.randn(sim.capacity, 64).bfloat16() for _ in range(2)]
    handles = [r.handle for r in res]
    for mode, ys in (("pull", pull_combine(sim, eo, handles)), ("push", sim.combine(eo, handles))):
        assert [tuple(y.shape) for y in ys] == [(16, 64), (5, 64)], mode
        for p in sim.peers:
            assert (p.combine_region[16].view(torch.uint8) == POISON).all()
            assert (p.dispatch_region_bf16[sim.capacity].view(torch.uint8) == POISON).all()
    case = Case(2, 4, 64, 16, 32, ("skewed", "uniform"), (16, 9), seed=21)
    counts, xs = case.inputs()
    res = sim.dispatch(xs, counts)
    for r in range(2):
        check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
