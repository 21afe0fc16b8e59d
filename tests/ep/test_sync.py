"""The "flags" sync (mxep/kernels/signals.py) on CPU: for the forward dispatch, the plan kernel's
counts exchange, the push kernel's completion flags and the copy-out's wait; for the push
combine, the free and completion flags. Run for real in the simulated world (Triton
interpreter) and on the one-rank symmetric-memory transport. Outputs are checked bit for bit
against the oracle, the signal words after every call, the timeouts of a rank that never
arrives, and the host-side rules the ordering argument relies on."""
import pytest
import torch

from _dist import run_distributed
from _fused_cases import Case, check_dispatch, expected_combine

from mxep.comm.layout import capacity_rows
from mxep.comm.peer_memory import RegionLayout
from mxep.comm.simulated import SimulatedWorld
from mxep.comm.transport import SymmMemTransport
from mxep.kernels.signals import (TIMEOUT_COMBINE_DONE, TIMEOUT_COMBINE_FREE, TIMEOUT_COUNTS, TIMEOUT_PUSH,
                                  num_signal_words)

KINDS = ("uniform", "skewed", "one_expert", "empty_experts", "none")


@pytest.fixture
def flags(monkeypatch):
    from mxep.kernels.rows import TUNING

    monkeypatch.setitem(TUNING, "sync", "flags")


def expected_signals(world: int, rank: int, dispatches: int, combines: int = 0) -> list[int]:
    """counts_flag: every rank raised it (itself included); push_flag, cfree_flag, cdone_flag:
    every other rank; seq; cseq; ticket back at zero; status clean."""
    def others(v):
        return [v if s != rank else 0 for s in range(world)]
    return [dispatches] * world + others(dispatches) + others(combines) * 2 + [dispatches, combines, 0, 0]


@pytest.mark.parametrize("world", [1, 2, 4])   # (world 3 with flags: test_simulated_world_kernel_tunings)
def test_flags_sync_simulated_world(world, flags):
    """Several calls with changing routing (a rank that sends nothing, empty experts, odd sizes):
    bit-exact outputs, and every rank's signal words name the call just finished."""
    E, H, N = 3 * world, 96, 29
    sim = SimulatedWorld(world, E, H, N, 16)
    for it in range(3):
        routing = tuple(KINDS[(it + r) % 5] for r in range(world))
        rows = tuple(0 if k == "none" else 3 + (11 * it + 7 * r) % (N - 2) for r, k in enumerate(routing))
        case = Case(world, E, H, N, 16, routing, rows, seed=300 + it)
        counts, xs = case.inputs()
        res = sim.dispatch(xs, counts)
        for r in range(world):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
            assert sim.peers[r].signals.tolist() == expected_signals(world, r, it + 1, 2 * it)
        # the push combine with free / completion flags (twice per dispatch: the region is reused)
        _, outs, _ = case.upstream(sim.capacity)
        for _ in range(2):
            for y, e in zip(sim.combine(outs, [x.handle for x in res]), expected_combine(case, outs, counts)):
                assert torch.equal(y, e)
        # the pull combine keeps its barrier and leaves the words alone
        for y, e in zip(sim.combine(outs, [x.handle for x in res], mode="pull"), expected_combine(case, outs, counts)):
            assert torch.equal(y, e)
        for r in range(world):
            assert sim.peers[r].signals.tolist() == expected_signals(world, r, it + 1, 2 * (it + 1))


def test_flags_timeout_when_a_rank_never_sends_its_counts(flags):
    """Rank 0 never calls: rank 1's plan gives up after MAX_SPIN polls, reports it in the
    status word (check_status raises, naming it) and writes nothing outside its buffers."""
    sim = SimulatedWorld(2, 4, 64, 12, 32)
    counts = [torch.tensor([3, 0, 5, 2], dtype=torch.int32), torch.tensor([1, 1, 1, 1], dtype=torch.int32)]
    p0, p1 = sim.peers
    before = p0.mem.clone()
    p1.exchange_and_plan(counts[1], 32, "put")
    p1.exchange_and_plan(counts[1], 32, "plan")
    assert p1.status() == TIMEOUT_COUNTS
    with pytest.raises(RuntimeError, match="counts"):
        p1.check_status()
    # rank 1 wrote only its count row and its counts flag into rank 0's allocation
    changed = (p0.mem != before).nonzero().flatten()
    W, E = 2, 4
    allowed = set(range(1 * E * 4, 2 * E * 4)) | {p0.regions.signal_offset + 4 * 1 + i for i in range(4)}
    assert W == p0.regions.world_size
    assert set(changed.tolist()) <= allowed and len(changed) > 0
    assert p0.status() == 0


def test_flags_timeout_when_a_push_never_completes(flags):
    """Both ranks plan; rank 0's push does not signal: rank 1's copy-out gives up and says so."""
    sim = SimulatedWorld(2, 4, 64, 12, 32)
    case = Case(2, 4, 64, 12, 32, ("uniform", "skewed"), (9, 12), seed=8)
    counts, xs = case.inputs()
    handles = sim.plan(counts, [9, 12])
    p0, p1 = sim.peers
    p0.push_mxfp8(xs[0], handles[0].plan, "rceil", signal=False)
    out1 = p1.push_mxfp8(xs[1], handles[1].plan, "rceil", signal=True)
    p1.copy_out_mxfp8(handles[1].plan, out1, wait=True)
    assert p1.status() == TIMEOUT_PUSH and p0.status() == 0
    with pytest.raises(RuntimeError, match="push"):
        p1.check_status()


def test_flags_combine_timeouts(flags):
    """A source that never frees its combine region stalls the owners' next push; an owner
    whose push never completes stalls the sources' copy-out. Both report, neither hangs."""
    sim = SimulatedWorld(2, 4, 64, 12, 32)
    case = Case(2, 4, 64, 12, 32, ("uniform", "skewed"), (9, 12), seed=8)
    counts, xs = case.inputs()
    res = sim.dispatch(xs, counts)
    _, outs, _ = case.upstream(sim.capacity)
    p0, p1 = sim.peers
    h0, h1 = (r.handle.plan for r in res)
    # combine 1: rank 0 never copies out (so never frees); rank 1 does
    o0 = p0.push_bf16_combine(outs[0], h0, 9, signal=True)
    o1 = p1.push_bf16_combine(outs[1], h1, 12, signal=True)
    p1.copy_out_combine(h1, o1, signal=True)
    assert p0.status() == 0 and p1.status() == 0
    # combine 2 on rank 1: its push waits for rank 0's free flag of combine 1, gives up, and
    # (the kernel runs to its end) still raises its completion flag
    p1.push_bf16_combine(outs[1], h1, 12, signal=True)
    assert p1.status() == TIMEOUT_COMBINE_FREE
    # rank 0: copy-outs of combines 1 and 2 find their flags; combine 3 was never pushed
    p0.copy_out_combine(h0, o0, signal=True)
    p0.copy_out_combine(h0, o0, signal=True)
    assert p0.status() == 0 and p0.signal_word("cseq") == 2
    p0.copy_out_combine(h0, o0, signal=True)
    assert p0.status() == TIMEOUT_COMBINE_DONE
    with pytest.raises(RuntimeError, match="combine copy-out"):
        p0.check_status()


def _one_rank_transport(E=6, H=64, N=20, align=32):
    cap = capacity_rows(1, E, N, align)
    return SymmMemTransport.over_local_memory(RegionLayout(1, E, H, N, cap))


def test_flags_one_rank_transport_and_pairing_rules(flags):
    """The symmetric-memory transport's own code path (one rank, CPU memory): outputs bit-exact
    over calls, and the host refuses what the ordering argument does not cover: a second plan
    before the first was dispatched, a handle dispatched twice, a stale handle."""
    t = _one_rank_transport()
    for it in range(3):
        case = Case(1, 6, 64, 20, 32, (KINDS[it],), (7 + 5 * it,), seed=40 + it)
        counts, xs = case.inputs()
        h = t.plan(counts[0].to(torch.int32), xs[0].shape[0], 32)
        assert h.sync == "flags"
        tokens = t.dispatch_mxfp8(xs[0], h, "rceil")
        check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
        assert t.peer.signals.tolist() == expected_signals(1, 0, 2 * it + 1)
        with pytest.raises(RuntimeError, match="already ran"):
            t.dispatch_mxfp8(xs[0], h, "rceil")
        # the zero-copy dispatch of this mode: push, then a one-program wait; no copy-out
        h = t.plan(counts[0].to(torch.int32), xs[0].shape[0], 32)
        tokens = t.dispatch_mxfp8(xs[0], h, "rceil", zero_copy=True)
        check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
        assert tokens.qdata.data_ptr() == t.peer.region_tokens()[0].data_ptr()
        assert t.peer.signal_word("seq") == 2 * (it + 1) and t.peer.status() == 0
    c = counts[0].to(torch.int32)
    first = t.plan(c, xs[0].shape[0], 32)
    with pytest.raises(RuntimeError, match="never dispatched"):
        t.plan(c, xs[0].shape[0], 32)
    t.dispatch_mxfp8(xs[0], first, "rceil")
    stale = first
    t.plan(c, xs[0].shape[0], 32)
    with pytest.raises(RuntimeError, match="already ran"):
        t.dispatch_mxfp8(xs[0], stale, "rceil")


def test_barrier_mode_refuses_a_second_dispatch_of_one_handle(monkeypatch):
    from mxep.kernels.rows import TUNING

    monkeypatch.setitem(TUNING, "sync", "barrier")
    t = _one_rank_transport()
    case = Case(1, 6, 64, 20, 32, ("skewed",), (13,), seed=2)
    counts, xs = case.inputs()
    h = t.plan(counts[0].to(torch.int32), 13, 32)
    assert h.sync == "barrier"
    tokens = t.dispatch_mxfp8(xs[0], h, "rceil")
    check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
    with pytest.raises(RuntimeError, match="already ran"):
        t.dispatch_mxfp8(xs[0], h, "rceil")
    assert t.peer.signals.tolist() == [0] * num_signal_words(1)   # the barrier path leaves them alone


def test_flags_combine_after_a_barrier_combine_puts_one_barrier_first(monkeypatch):
    """A barrier-ordered combine's copy-out raises no free flag, so the first flags combine
    after it starts with a barrier; flags after flags need none; the words count flags combines."""
    from mxep.kernels.rows import TUNING

    t = _one_rank_transport()
    case = Case(1, 6, 64, 20, 32, ("skewed",), (17,), seed=6)
    counts, xs = case.inputs()
    h = t.plan(counts[0].to(torch.int32), 17, 32)
    t.dispatch_mxfp8(xs[0], h, "rceil")
    _, outs, _ = case.upstream(t.peer.regions.capacity)
    exp = expected_combine(case, outs, counts)[0]
    seen = []
    for sync in ("barrier", "flags", "flags", "barrier", "flags"):
        monkeypatch.setitem(TUNING, "sync", sync)
        before = t.handle.barriers
        assert torch.equal(t.combine_bf16(outs[0], h), exp)
        seen.append(t.handle.barriers - before)
    # the first barrier combine needs no entry barrier: the dispatch's barrier came after the
    # last combine copy-out (there was none); the second one follows a flags copy-out
    assert seen == [1, 1, 0, 2, 1]
    assert t.peer.signal_word("cseq") == 3 and t.peer.status() == 0


def _debug_buffer_body(rank, world):
    import mxep
    from mxep.kernels.rows import TUNING
    from mxep.kernels.signals import word_index

    TUNING["sync"] = "flags"
    buf = mxep.Buffer(None, num_experts=4, hidden=64, max_tokens_per_rank=8, debug=True)
    buf.transport = SymmMemTransport.over_local_memory(buf.regions, group=buf.group)   # the symm-mem code path
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    counts = torch.tensor([2, 0, 3, 0])
    buf.dispatch(x, counts)                                  # clean: no error
    out = []
    buf.transport.peer.signals[word_index(1, "status")] = TIMEOUT_PUSH    # as a timed-out copy-out leaves it
    for call in (lambda: buf.dispatch(x, counts), lambda: buf.combine(torch.zeros(buf.capacity, 64).bfloat16(),
                                                                       buf.plan(counts, 5))):
        try:
            call()
            out.append(None)
        except RuntimeError as exc:
            out.append(str(exc))
    return out


def test_debug_buffer_raises_on_a_timed_out_wait():
    """Buffer(debug=True) reads the status word after every dispatch and combine (a host sync,
    debug only) and names what timed out; without debug nothing reads it."""
    (msgs,) = run_distributed(_debug_buffer_body, 1)
    assert all(m is not None and "push" in m and "invalid" in m for m in msgs), msgs


@pytest.mark.parametrize("sync", ["barrier", "counts_flags"])
def test_barriers_per_call(sync, monkeypatch):
    """Barriers each call queues (the one-rank transport counts them): the dispatch has two
    ("barrier": counts, push) or one ("counts_flags": the plan kernel exchanges the counts);
    a push combine has one when a barrier came after the last combine copy-out (a dispatch in
    between), two when not (two combines in a row); outputs bit-exact throughout."""
    from mxep.kernels.rows import TUNING

    monkeypatch.setitem(TUNING, "sync", sync)
    t = _one_rank_transport()
    per_dispatch = 2 if sync == "barrier" else 1
    seen, expect = [], []
    for it in range(2):
        case = Case(1, 6, 64, 20, 32, (KINDS[it + 1],), (19 - 4 * it,), seed=60 + it)
        counts, xs = case.inputs()
        before = t.handle.barriers
        h = t.plan(counts[0].to(torch.int32), xs[0].shape[0], 32)
        tokens = t.dispatch_mxfp8(xs[0], h, "rceil")
        seen.append(t.handle.barriers - before)
        check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
        _, outs, _ = case.upstream(t.peer.regions.capacity)
        exp = expected_combine(case, outs, counts)[0]
        for _ in range(2):
            before = t.handle.barriers
            assert torch.equal(t.combine_bf16(outs[0], h), exp)
            seen.append(t.handle.barriers - before)
        expect += [per_dispatch, 1, 2]
    assert seen == expect
    # counts_flags: the counts words count the dispatches, push and combine words stay zero
    words = expected_signals(1, 0, 2) if sync == "counts_flags" else [0] * num_signal_words(1)
    assert t.peer.signals.tolist() == words


@pytest.mark.parametrize("world", [2, 3])
def test_counts_flags_sync_simulated_world(world, monkeypatch):
    """"counts_flags": the plan kernel's counts exchange (put on every rank, then wait + plan),
    the barrier's phase order after the push. Bit-exact over calls; every rank's counts flags
    and seq name the last call, the push and combine flags are never raised. A plan must be
    followed by its dispatch (the same host rule as "flags")."""
    from mxep.kernels.rows import TUNING

    monkeypatch.setitem(TUNING, "sync", "counts_flags")
    E, H, N = 2 * world, 64, 23
    sim = SimulatedWorld(world, E, H, N, 32)
    for it in range(3):
        routing = tuple(KINDS[(2 * it + r) % 5] for r in range(world))
        rows = tuple(0 if k == "none" else 5 + (13 * it + 3 * r) % (N - 4) for r, k in enumerate(routing))
        case = Case(world, E, H, N, 32, routing, rows, seed=500 + it)
        counts, xs = case.inputs()
        res = sim.dispatch(xs, counts, zero_copy=it == 1)
        for r in range(world):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
            assert res[r].handle.sync == "counts_flags"
            assert sim.peers[r].signals.tolist() == [it + 1] * world + [0] * (3 * world) + [it + 1, 0, 0, 0]
        _, outs, _ = case.upstream(sim.capacity)
        for y, e in zip(sim.combine(outs, [x.handle for x in res]), expected_combine(case, outs, counts)):
            assert torch.equal(y, e)
    t = _one_rank_transport()
    c = torch.tensor([3, 0, 2, 0, 0, 1], dtype=torch.int32)
    t.plan(c, 6, 32)
    with pytest.raises(RuntimeError, match="counts_flags.*never dispatched"):
        t.plan(c, 6, 32)
