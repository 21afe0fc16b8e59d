"""The public Buffer API on 1-4 gloo processes (the collective transport) and on the one-rank
symmetric-memory transport over local memory: dispatch / combine forward and backward, reuse
safety, zero-copy dispatch and combine, the functional alias, bad input. All against the
single-process oracle in mxep.ep.naive, bit for bit. (Counts that do not describe the rows:
tests/ep/test_bad_input.py.)"""
import pytest
import torch

from support import worlds
from support.dist import single_rank_group
from support.fused_cases import POISON, Case, cases_for_world, check_dispatch, run_buffer_case

import mxep
from mxep.ep.transport.symm_mem.transport import SymmMemTransport


def _buffer(case: Case, group=None) -> "mxep.Buffer":
    return mxep.Buffer(group, num_experts=case.num_experts, hidden=case.hidden, max_tokens_per_rank=case.max_tokens,
                       align=case.align, scale_mode=case.scale_mode, config=POISON)


def _buffer_body(rank, world, cases):
    for case in cases:
        buf = _buffer(case)
        assert buf.transport_name == "collective" and "collective" in repr(buf)
        run_buffer_case(buf, case, rank, torch.device("cpu"))
    return True


def _gloo_cases(world: int) -> list[Case]:
    return cases_for_world(world, hidden=(96,), aligns=(16, 128))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_buffer_gloo(world):
    if world == 1:      # a world of one needs no spawn
        with single_rank_group():
            assert _buffer_body(0, 1, _gloo_cases(1))
    else:               # the session's shared gloo world of this size (support/worlds.py)
        assert all(worlds.results(world, "ep/buffer"))


def test_buffer_symm_mem_one_rank():
    """The same public-API scenario through the symmetric-memory transport's code path (host
    logic, plan, push, copy-out, push and pull combine, zero-copy) on one rank over local
    memory."""
    with single_rank_group() as group:
        for case in cases_for_world(1, hidden=(96,), aligns=(16, 128)):
            buf = _buffer(case, group)
            buf.transport = SymmMemTransport.over_local_memory(buf.regions, buf.config, group=buf.group)
            assert buf.transport_name == "symm_mem"
            run_buffer_case(buf, case, 0, torch.device("cpu"))
            buf.check()


def _functional_alias_body(rank, world):
    case = Case(world, 2 * world, 64, 20, 32, ("skewed",) * world, (19,) * world, seed=5)
    counts, xs = case.inputs()
    buf = mxep.Buffer(None, case.num_experts, case.hidden, case.max_tokens)
    res = mxep.a2a_dispatch_and_group_mxfp8_fwd_hp_bwd(xs[rank], counts[rank], buf)
    check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)
    return True


def test_functional_alias_gloo():
    assert all(worlds.results(2, "ep/buffer/alias"))


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
        (TypeError, lambda: buf.combine(torch.zeros(3, 64).bfloat16(), None)),             # not a handle
    ]
    for exc, fn in checks:
        with pytest.raises(exc):
            fn()
    with pytest.raises(ValueError, match="multiple of 32"):
        mxep.Buffer(None, num_experts=4, hidden=48, max_tokens_per_rank=8)
    with pytest.raises(ValueError, match="multiple of the group size"):
        mxep.Buffer(None, num_experts=3, hidden=64, max_tokens_per_rank=8)
    with pytest.raises(TypeError, match="EPConfig"):
        mxep.Buffer(None, num_experts=4, hidden=64, max_tokens_per_rank=8, config={"poison_outputs": True})
    # after the errors the buffer still works (nothing was corrupted)
    res = buf.dispatch(good_x, good_c)
    assert res.tokens_per_expert.tolist() == ([4, 0] if rank == 0 else [6, 0])   # both ranks send [2, 0, 3, 0]
    first = good_x[:2] if rank == 0 else good_x[2:]
    assert torch.equal(res.tokens.dequantize()[: first.shape[0]], mxep.to_mxfp8(first).dequantize())
    return True


def test_bad_input_gloo():
    assert all(worlds.results(2, "ep/buffer/bad_input"))


for _w in (2, 3, 4):
    worlds.register(_w, "ep/buffer", _buffer_body, _gloo_cases(_w))
worlds.register(2, "ep/buffer/alias", _functional_alias_body)
worlds.register(2, "ep/buffer/bad_input", _bad_input_body)
