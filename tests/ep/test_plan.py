"""The one-launch plan kernel (``ep/transport/symm_mem/plan.py``: counts exchange, then the
plan vectors) against the torch-op layout of the collective path (``ep/layout.py``), on random
count matrices with empty experts, ranks that send nothing, odd world sizes and expert counts
that are not powers of two. Every plan vector of every rank is checked: the peer kernels trust
them blindly."""
import pytest
import torch

from mxep._utils import triton_available_for
from mxep.ep.layout import compute_dispatch_layout
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld

pytestmark = pytest.mark.skipif(not triton_available_for(torch.empty(0)),
                                reason="CPU kernel tests need TRITON_INTERPRET=1")


def random_counts(W: int, E: int, N: int, gen: torch.Generator) -> torch.Tensor:
    counts = torch.zeros(W, E, dtype=torch.int32)
    for s in range(W):
        n = int(torch.randint(0, N + 1, (1,), generator=gen)) if s != W - 1 else 0   # last rank sends nothing
        if n:
            hot = torch.rand(E, generator=gen) ** 4          # skewed; many experts get nothing
            e = torch.multinomial(hot, n, replacement=True, generator=gen)
            counts[s] = torch.bincount(e, minlength=E).to(torch.int32)
    return counts


@pytest.mark.parametrize("W,E,align", [(1, 4, 32), (2, 6, 16), (3, 9, 32), (4, 16, 128), (5, 15, 1), (4, 256, 32)])
def test_plan_vectors_match_the_layout(W, E, align):
    gen = torch.Generator().manual_seed(W * 1000 + E)
    N, L = 41, E // W
    sim = SimulatedWorld(W, E, 32, N, align)
    for call in range(3):
        counts = random_counts(W, E, N, gen)
        handles = sim.plan(list(counts), counts.sum(1).tolist())
        ref = compute_dispatch_layout(counts, N, align)
        for h in handles:
            plan = h.state
            assert torch.equal(plan.src_end, counts.cumsum(1).to(torch.int32))
            assert torch.equal(plan.recv, counts.sum(0).to(torch.int32))
            assert torch.equal(plan.recv_cum, counts.cumsum(0).to(torch.int32))
            for d in range(W):
                assert torch.equal(plan.group_end_offsets(d), ref.group_end_offsets[d])
                assert torch.equal(plan.tokens_per_expert(d), ref.tokens_per_expert[d])
            assert torch.equal(h.group_end_offsets, ref.group_end_offsets[h.rank])
            assert torch.equal(h.tokens_per_expert, ref.tokens_per_expert[h.rank])
            # row_base[s, g] + i is row i's destination row, for every real row i of every source
            for s in range(W):
                n = int(counts[s].sum())
                i = torch.arange(n)
                g = torch.repeat_interleave(torch.arange(E), counts[s].long())
                assert torch.equal((plan.row_base[s].long()[g] + i), ref.dest_row[s, :n].long())
        for p in sim.peers:   # the exchange itself: every rank's count matrix, flags and seq name this call
            assert torch.equal(p.counts[:, :E], counts)
            assert p.signals.tolist() == [call + 1] * W + [call + 1, 0]
