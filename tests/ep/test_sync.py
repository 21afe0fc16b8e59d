"""The counts-flags sync (``ep/transport/symm_mem/sync.py``) on CPU: the plan kernel stores this
rank's count row into every rank's matrix, raises a flag there and waits for every rank's flag
of this call; the push, copy-out and combine phases are ordered by barriers. Run for real in the
simulated world (Triton interpreter) and on the one-rank symmetric-memory transport. Outputs
are checked bit for bit against the oracle, the signal words after every call, the timeout of
a rank that never arrives, the barriers each call queues, and the host-side rules the ordering
argument relies on. (The call-sequence mismatch of a rank one call ahead:
tests/ep/test_bad_input.py.)"""
import pytest
import torch

from support.dist import single_rank_group
from support.fused_cases import POISON_ONE_PART as POISON_CONFIG   # the walk order is not the subject here
from support.fused_cases import Case, check_dispatch, expected_combine

from mxep.ep.layout import capacity_rows
from mxep.ep.transport.base import TIMEOUT_COUNTS
from mxep.ep.transport.symm_mem.memory import RegionLayout
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld
from mxep.ep.transport.symm_mem.sync import num_signal_words, word_index
from mxep.ep.transport.symm_mem.transport import SymmMemTransport

KINDS = ("uniform", "skewed", "one_expert", "empty_experts", "none")


def expected_signals(world: int, dispatches: int) -> list[int]:
    """counts_flag: every rank raised it in every rank's words (itself included); seq: the
    dispatches so far; status clean."""
    return [dispatches] * world + [dispatches, 0]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_counts_flags_sync_simulated_world(world):
    """The plan kernel's counts exchange (put on every rank, then wait + plan), the barriers'
    phase order after it. Several calls with changing routing (a rank that sends nothing, empty
    experts, odd sizes, a zero-copy dispatch): bit-exact; after every call every rank's counts
    flags and seq name it; the combines (two push combines per dispatch, the region reused, and
    the zero-copy pull) leave the words alone."""
    E, H, N = 3 * world, 64, 15
    sim = SimulatedWorld(world, E, H, N, 8, config=POISON_CONFIG)
    assert num_signal_words(world) == world + 2 and sim.peers[0].signals.numel() == world + 2
    for it in range(3):
        routing = tuple(KINDS[(2 * it + r) % 5] for r in range(world))
        rows = tuple(0 if k == "none" else 3 + (11 * it + 7 * r) % (N - 2) for r, k in enumerate(routing))
        case = Case(world, E, H, N, 8, routing, rows, seed=300 + it)
        counts, xs = case.inputs()
        res = sim.dispatch(xs, counts, zero_copy=it == 1)
        for r in range(world):
            check_dispatch(case, r, res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, counts, xs)
            assert sim.peers[r].signals.tolist() == expected_signals(world, it + 1)
        _, outs, _ = case.upstream(sim.capacity)
        handles = [x.handle for x in res]
        exp = expected_combine(case, outs, counts)
        for _ in range(2):
            for y, e in zip(sim.combine(outs, handles), exp):
                assert torch.equal(y, e)
        zin = sim.combine_inputs()
        for z, o in zip(zin, outs):
            z.copy_(o)
        for y, e in zip(sim.combine(zin, handles), exp):
            assert torch.equal(y, e)
        for r in range(world):
            assert sim.peers[r].signals.tolist() == expected_signals(world, it + 1)
            assert sim.peers[r].signal_word("seq") == it + 1 and sim.peers[r].status() == 0


def test_timeout_when_a_rank_never_sends_its_counts():
    """Rank 0 never calls: rank 1's plan gives up after its polls, reports it in the status
    word (check_status raises, naming it) and writes nothing outside its buffers."""
    sim = SimulatedWorld(2, 4, 64, 12, 32)
    counts = [torch.tensor([3, 0, 5, 2], dtype=torch.int32), torch.tensor([1, 1, 1, 1], dtype=torch.int32)]
    p0, p1 = sim.peers
    before = p0.mem.clone()
    p1.exchange_and_plan(counts[1], 4, 32, "put")
    p1.exchange_and_plan(counts[1], 4, 32, "plan")
    assert p1.status() == TIMEOUT_COUNTS
    with pytest.raises(RuntimeError, match="rank 1.*counts"):
        p1.check_status()
    # rank 1 wrote only its count row and its counts flag into rank 0's allocation
    changed = (p0.mem != before).nonzero().flatten()
    row_bytes = p0.counts.shape[1] * 4      # one row of the count matrix
    allowed = set(range(row_bytes, 2 * row_bytes)) | {p0.regions.signal_offset + 4 * 1 + i for i in range(4)}
    assert set(changed.tolist()) <= allowed and len(changed) > 0
    assert p0.status() == 0 and p0.signal_word("seq") == 0
    assert p1.signal_word("seq") == 1     # the call happened (its outputs are invalid)


def _one_rank_transport(E=6, H=64, N=20, align=8):
    cap = capacity_rows(1, E, N, align)
    return SymmMemTransport.over_local_memory(RegionLayout(1, E, H, N, cap), POISON_CONFIG)


def test_one_rank_transport_and_pairing_rules():
    """The symmetric-memory transport's own code path (one rank, CPU memory): outputs bit-exact
    over calls, and the host refuses what the ordering argument does not cover: a second plan
    before the first was dispatched, a handle dispatched twice, a stale handle."""
    t = _one_rank_transport()
    for it in range(3):
        case = Case(1, 6, 64, 20, 8, (KINDS[it],), (7 + 5 * it,), seed=40 + it)
        counts, xs = case.inputs()
        h = t.plan(counts[0].to(torch.int32), xs[0].shape[0], 8)
        tokens = t.dispatch_mxfp8(xs[0], h, "rceil")
        check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
        assert t.signals.tolist() == expected_signals(1, 2 * it + 1)
        with pytest.raises(RuntimeError, match="already ran"):
            t.dispatch_mxfp8(xs[0], h, "rceil")
        # the zero-copy dispatch: push and a barrier; no copy-out
        h = t.plan(counts[0].to(torch.int32), xs[0].shape[0], 8)
        tokens = t.dispatch_mxfp8(xs[0], h, "rceil", zero_copy=True)
        check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
        assert tokens.qdata.data_ptr() == t.region_tokens()[0].data_ptr()
        assert t.signal_word("seq") == 2 * (it + 1) and t.status() == 0
    c = counts[0].to(torch.int32)
    first = t.plan(c, xs[0].shape[0], 8)
    with pytest.raises(RuntimeError, match="never dispatched"):
        t.plan(c, xs[0].shape[0], 8)
    t.dispatch_mxfp8(xs[0], first, "rceil")
    stale = first
    t.plan(c, xs[0].shape[0], 8)
    with pytest.raises(RuntimeError, match="already ran"):
        t.dispatch_mxfp8(xs[0], stale, "rceil")


def test_barriers_per_call():
    """Barriers each call queues (the one-rank transport counts them): the dispatch has one (the
    plan kernel exchanges the counts); a push combine has one when a barrier came after the last
    combine copy-out (a dispatch in between), two when not (two combines in a row); the
    zero-copy pull combine one; the bf16 dispatch (combine backward) two. Outputs bit-exact
    throughout; the counts words count the dispatches."""
    t = _one_rank_transport()
    seen, expect = [], []
    for it in range(2):
        case = Case(1, 6, 64, 20, 8, (KINDS[it + 1],), (19 - 4 * it,), seed=60 + it)
        counts, xs = case.inputs()
        before = t.handle.barriers
        h = t.plan(counts[0].to(torch.int32), xs[0].shape[0], 8)
        tokens = t.dispatch_mxfp8(xs[0], h, "rceil")
        seen.append(t.handle.barriers - before)
        check_dispatch(case, 0, tokens, h.group_end_offsets, h.tokens_per_expert, counts, xs)
        _, outs, gys = case.upstream(t.regions.capacity)
        exp = expected_combine(case, outs, counts)[0]
        for _ in range(2):
            before = t.handle.barriers
            assert torch.equal(t.combine_bf16(outs[0], h), exp)
            seen.append(t.handle.barriers - before)
        before = t.handle.barriers
        zin = t.combine_input()
        zin.copy_(outs[0])
        assert torch.equal(t.combine_bf16(zin, h), exp)
        seen.append(t.handle.barriers - before)
        before = t.handle.barriers
        t.dispatch_bf16(gys[0], h)
        seen.append(t.handle.barriers - before)
        expect += [1, 1, 2, 1, 2]
    assert seen == expect
    assert t.signals.tolist() == expected_signals(1, 2)


def test_debug_buffer_raises_on_a_timed_out_wait():
    """Buffer(debug=True) reads the status word after every dispatch and combine (a host sync,
    debug only) and names what timed out; Buffer.check() does the same on demand; without
    debug nothing reads it."""
    import mxep

    with single_rank_group() as group:
        msgs = []
        for debug in (True, False):
            buf = mxep.Buffer(group, num_experts=4, hidden=64, max_tokens_per_rank=8, align=8, debug=debug,
                              config=POISON_CONFIG)
            buf.transport = SymmMemTransport.over_local_memory(buf.regions, buf.config, group=buf.group)   # symm-mem path
            x = torch.randn(5, 64, dtype=torch.bfloat16)
            counts = torch.tensor([2, 0, 3, 0])
            buf.dispatch(x, counts)                              # clean: no error
            buf.check()
            buf.transport.signals[word_index(1, "status")] = TIMEOUT_COUNTS   # as a timed-out plan leaves it
            for call in (lambda: buf.dispatch(x, counts),
                         lambda: buf.combine(torch.zeros(buf.capacity, 64).bfloat16(), buf.plan(counts, 5)),
                         buf.check):
                try:
                    call()
                    msgs.append((debug, None))
                except RuntimeError as exc:
                    msgs.append((debug, str(exc)))
    debug_msgs = [m for d, m in msgs if d]
    assert len(debug_msgs) == 3 and all(m is not None and "counts" in m and "invalid" in m for m in debug_msgs), msgs
    # without debug: the calls run (their outputs are invalid), only check() reads the word
    assert [m is None for d, m in msgs if not d] == [True, True, False], msgs
