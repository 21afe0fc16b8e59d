"""Shared cases and checks for the fused dispatch/combine (simulated world, gloo, GPUs).

Every rank can rebuild every rank's inputs from the case's seed, so each process computes the
expected layout with the single-process oracle (``mxep.ep.naive``) and checks its own rank's
output bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from mxep.ep.config import EPConfig
from mxep.ep.naive import simulate_dispatch_layout, simulate_dispatch_mxfp8
from mxep.testing import make_inputs, make_routing

# The config of every fused test: every output of the fused kernels starts as poison, so that a
# row they forget cannot pass for data that an earlier call left in recycled memory.
POISON = EPConfig(poison_outputs=True)
# The peer kernels walk their rows in EPConfig.spread_parts interleaved parts (16 by default),
# the walk padded to a multiple of it: under the interpreter a dispatch of one row costs 16 row
# steps. Tests whose subject is not the walk (the sync protocol, call sequences) take one part;
# the default walk runs in the other fused tests (and tests/ep/test_work_order.py).
POISON_ONE_PART = POISON.replace(spread_parts=1)


@dataclass(frozen=True)
class Case:
    world: int
    num_experts: int
    hidden: int
    max_tokens: int
    align: int
    routing: tuple[str, ...]   # one routing kind per rank ("none" = the rank sends nothing)
    rows: tuple[int, ...]      # rows per rank (<= max_tokens)
    seed: int = 0
    scale_mode: str = "rceil"
    scale_layout: str = "row_major"

    def inputs(self, device="cpu"):
        g = torch.Generator().manual_seed(self.seed)
        counts, xs = [], []
        for r in range(self.world):
            c = make_routing(self.rows[r], self.num_experts, self.routing[r], g)
            counts.append(c)
            xs.append(make_inputs(c, self.hidden, generator=g))
        return [c.to(device) for c in counts], [x.to(device) for x in xs]

    def upstream(self, capacity: int, device="cpu"):
        """Per-rank random bf16 tensors: gradients for tokens, expert outputs, combine grads."""
        g = torch.Generator().manual_seed(self.seed + 1000)
        grads = [torch.randn(capacity, self.hidden, generator=g).bfloat16().to(device) for _ in range(self.world)]
        outs = [torch.randn(capacity, self.hidden, generator=g).bfloat16().to(device) for _ in range(self.world)]
        gys = [torch.randn(n, self.hidden, generator=g).bfloat16().to(device) for n in self.rows]
        return grads, outs, gys


def cases_for_world(world: int, hidden=(96,), aligns=(16, 32), seed=0, max_tokens: int = 40,
                    rows: tuple[int, int] = (13, 7)) -> list[Case]:
    """Awkward cases: random, skewed, one hot expert, empty experts, a rank sending nothing,
    odd row counts, a full rank (n == max_tokens). Rank r of the (hidden, align) case j sends
    ``rows[0] + rows[1] * r + 3 * j`` rows (at most ``max_tokens``): the Triton interpreter pays
    per row, so the peer-kernel tests pass fewer."""
    E = 2 * world + (world if world > 2 else 0)     # 2, 4, 9, 12 experts...
    E = max(E, world)
    N = max_tokens
    out = []
    kinds = ["uniform", "skewed", "one_expert", "empty_experts"]
    for i, H in enumerate(hidden):
        for j, align in enumerate(aligns):
            s = seed + 17 * i + 5 * j
            routing = tuple(kinds[(r + i + j) % len(kinds)] for r in range(world))
            n = tuple(min(N, rows[0] + rows[1] * r + 3 * j) for r in range(world))
            out.append(Case(world, E, H, N, align, routing, n, seed=s))
    # a rank that sends nothing, and everything to one expert on the others
    n = tuple(0 if r == world - 1 else N for r in range(world))
    routing = tuple("none" if r == world - 1 else "one_expert" for r in range(world))
    out.append(Case(world, E, hidden[0], N, 32, routing, n, seed=seed + 99, scale_mode="floor"))
    return out


GPU_HIDDENS = (256, 2048, 5120, 7168)


def gpu_cases(world: int, max_tokens: int = 300) -> list[Case]:
    """The GPU tests' cases (model sizes): every hidden of GPU_HIDDENS with aligns 32 and 128,
    the routing kinds rotating over the ranks, then a rank that sends nothing (n = 0) while the
    others send everything to one expert (floor scales)."""
    E = 8 * world
    out = []
    kinds = ("uniform", "skewed", "one_expert", "empty_experts")
    for i, H in enumerate(GPU_HIDDENS):
        for align in (32, 128):
            routing = tuple(kinds[(r + i) % 4] for r in range(world))
            rows = tuple(max_tokens - 37 * r - 11 * i for r in range(world))
            out.append(Case(world, E, H, max_tokens, align, routing, rows, seed=31 * i + align))
    out.append(Case(world, E, 2048, max_tokens, 32, ("none",) + ("one_expert",) * (world - 1),
                    (0,) + (max_tokens,) * (world - 1), seed=7, scale_mode="floor"))
    return out


def check_dispatch(case: Case, rank: int, tokens, group_end_offsets, tokens_per_expert, counts, xs) -> None:
    """Bit-exact check of one rank's dispatch output against the oracle (blocked scales,
    ``tokens.scale_layout == "blocked"``: against the oracle's scales in the blocked layout,
    ``mxep.format.blocked.to_blocked_scales``, itself checked against torchao's
    ``torch_to_blocked_2d_M_groups`` in tests/ep/test_blocked_scales.py)."""
    exp = simulate_dispatch_mxfp8([x.cpu() for x in xs], [c.cpu() for c in counts], case.align, case.scale_mode)[rank]
    R = exp.qdata.shape[0]
    assert torch.equal(group_end_offsets.cpu(), exp.group_end_offsets), (group_end_offsets, exp.group_end_offsets)
    assert torch.equal(tokens_per_expert.cpu(), exp.tokens_per_expert)
    assert group_end_offsets.dtype == torch.int32 and tokens_per_expert.dtype == torch.int32
    q = tokens.qdata[:R].cpu().view(torch.uint8)
    s = tokens.scale[:R].cpu().view(torch.uint8)
    bad = (q != exp.qdata.view(torch.uint8)).any(1).nonzero().flatten()
    assert bad.numel() == 0, f"rank {rank}: qdata rows differ: {bad[:10].tolist()}"
    exp_s = exp.scale.view(torch.uint8)
    if getattr(tokens, "scale_layout", "row_major") == "blocked":
        from mxep.format.blocked import to_blocked_scales
        exp_s = to_blocked_scales(exp_s)    # R is a multiple of 128: whole tiles
    assert torch.equal(s, exp_s), f"rank {rank}: scales differ"


def expected_grad_x(case: Case, grads, counts) -> list[torch.Tensor]:
    """x_s.grad[i] = grads[d][p] where row i of source s landed at row p of rank d."""
    lays = simulate_dispatch_layout([c.cpu() for c in counts], case.align)
    out = [torch.zeros(n, case.hidden, dtype=torch.bfloat16) for n in case.rows]
    for d, lay in enumerate(lays):
        real = lay.src_row >= 0
        for p in real.nonzero().flatten().tolist():
            out[int(lay.src_rank[p])][int(lay.src_row[p])] = grads[d][p].cpu()
    return out


def expected_combine(case: Case, outs, counts) -> list[torch.Tensor]:
    return expected_grad_x(case, outs, counts)  # the same data movement


def expected_grad_expert_out(case: Case, gys, counts, rank: int, capacity: int) -> torch.Tensor:
    """Rows [0, R) of the bf16 dispatch of ``gys`` on ``rank`` (pad rows zero)."""
    lay = simulate_dispatch_layout([c.cpu() for c in counts], case.align)[rank]
    out = torch.zeros(lay.num_rows, case.hidden, dtype=torch.bfloat16)
    for p in (lay.src_row >= 0).nonzero().flatten().tolist():
        out[p] = gys[int(lay.src_rank[p])][int(lay.src_row[p])].cpu()
    return out


def run_buffer_case(buf, case: Case, rank: int, device) -> None:
    """Full forward + backward of dispatch and combine through the public Buffer API on one rank,
    including reuse safety: a second dispatch with other routing before the first's backward."""
    counts, xs = case.inputs(device)
    grads, outs, gys = case.upstream(buf.capacity, device)
    x = xs[rank].clone().requires_grad_(True)
    res = buf.dispatch(x, counts[rank])
    check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)

    # A second dispatch on the same buffer (next layer / micro-batch) before any backward.
    case2 = Case(case.world, case.num_experts, case.hidden, case.max_tokens, case.align,
                 tuple(reversed(case.routing)), tuple(reversed(case.rows)), seed=case.seed + 7,
                 scale_mode=case.scale_mode, scale_layout=case.scale_layout)
    counts2, xs2 = case2.inputs(device)
    x2 = xs2[rank].clone().requires_grad_(True)
    res2 = buf.dispatch(x2, counts2[rank])
    check_dispatch(case2, rank, res2.tokens, res2.group_end_offsets, res2.tokens_per_expert, counts2, xs2)
    # the first result survived the second dispatch
    check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)

    # Backward of the dispatch: bf16, exact, straight-through, pad rows dropped.
    R = int(res.group_end_offsets[-1])
    mask = torch.zeros(buf.capacity, 1, dtype=torch.bfloat16, device=device)
    mask[:R] = 1   # rows past the end are undefined: keep them out of the loss
    (res.tokens.dequantize() * grads[rank] * mask).float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad.cpu(), expected_grad_x(case, grads, counts)[rank])

    # The first dispatch's handle is stale now (a handle is valid until the next dispatch on its
    # Buffer, every transport): refused on the host. Dispatch case 1 again for its combine.
    with pytest.raises(RuntimeError, match="stale"):
        buf.combine(outs[rank], res.handle)
    with torch.no_grad():
        res = buf.dispatch(xs[rank], counts[rank])
    check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)

    # Combine forward (bit-exact copy back) and backward (bf16 dispatch, pad rows zero).
    eo = outs[rank].clone().requires_grad_(True)
    y = buf.combine(eo, res.handle)
    assert y.shape == (case.rows[rank], case.hidden) and y.dtype == torch.bfloat16
    assert torch.equal(y.detach().cpu(), expected_combine(case, outs, counts)[rank])
    y.backward(gys[rank])
    exp = expected_grad_expert_out(case, gys, counts, rank, buf.capacity)
    assert torch.equal(eo.grad[:R].cpu(), exp)

    # Pull combine: the zero-copy input (owners write their expert outputs into the Buffer's
    # region after a dispatch), bit-exact; then a regular input again (the push).
    exp_y = expected_combine(case, outs, counts)[rank]
    with torch.no_grad():
        res3 = buf.dispatch(xs[rank], counts[rank])
        zin = buf.combine_input()
        assert zin.shape == (buf.capacity, case.hidden) and zin.dtype == torch.bfloat16
        zin.copy_(outs[rank])
        assert torch.equal(buf.combine(zin, res3.handle).cpu(), exp_y)
        assert torch.equal(buf.combine(outs[rank], res3.handle).cpu(), exp_y)

    # Zero-copy dispatch: the tokens stay in the receive region (symmetric memory) until the
    # next dispatch; checked before that, then combined from a regular expert_out, and its
    # backward (which never reads the tokens) after a later dispatch has overwritten them.
    xz = xs2[rank].clone().requires_grad_(True)
    resz = buf.dispatch(xz, counts2[rank], zero_copy=True)
    check_dispatch(case2, rank, resz.tokens, resz.group_end_offsets, resz.tokens_per_expert, counts2, xs2)
    if buf.transport_name == "symm_mem":
        region = buf.transport.region_tokens()
        assert resz.tokens.qdata.data_ptr() == region[0].data_ptr()
        assert resz.tokens.scale.data_ptr() == region[1].data_ptr()
    grads2, outs2, _ = case2.upstream(buf.capacity, device)
    assert torch.equal(buf.combine(outs2[rank], resz.handle).cpu(), expected_combine(case2, outs2, counts2)[rank])
    R2 = int(resz.group_end_offsets[-1])
    loss = (resz.tokens.dequantize()[:R2] * grads2[rank][:R2]).float().sum()
    with torch.no_grad():
        buf.dispatch(xs[rank], counts[rank], zero_copy=True)   # overwrites the region
    loss.backward()
    assert torch.equal(xz.grad.cpu(), expected_grad_x(case2, grads2, counts2)[rank])
