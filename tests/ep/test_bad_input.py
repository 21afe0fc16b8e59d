"""Bad input never corrupts memory; ranks that disagree get a clear error.

* Adversarial ``num_tokens_per_expert`` in normal mode (``debug=False``: nothing is checked on
  the host, that needs a sync): counts summing past ``n`` (``n < max_tokens_per_rank``: this
  used to SIGSEGV in the combine push), past ``max_tokens_per_rank``, negative, huge int64
  (saturated, never wrapped), int32 near 2**31 (the plan's running sum must not overflow),
  summing to fewer than ``n``, far past ``n`` on every rank. Every kernel must stay inside its
  tensors (guard margins around every input, output and rank memory, then allocator churn;
  the dispatch never writes the combine region), the counts must be clamped
  (negatives to 0, the running sum cut at ``n``: :func:`mxep.ep.layout.clamp_counts`) and the
  result must equal the oracle (:mod:`mxep.ep.naive`) of the clamped counts bit for bit, for
  the dispatch, both combines (push from a regular ``expert_out``, pull from the combine
  input) and the backward passes; the status word says BAD_COUNTS on the rank whose counts
  were bad, and only there; the next valid call is exact. One test, parametrized over the
  paths: the simulated world (CPU under TRITON_INTERPRET=1; the ``gpu`` cases on one CUDA GPU)
  and the collective path (Buffer on gloo, 2 processes).
* ``grouped_mm_mxfp8(impl="fused")`` with group ends past the capacity, negative or
  decreasing: clamped on the device, no access outside the tensors.
* Ranks that disagree: Buffer settings that differ (every rank raises, naming the setting and
  every rank's value), a handle of another Buffer, sizes that are not ints, and a rank one call
  ahead of the other, mid-call or after a timed-out call (SEQUENCE_MISMATCH on the rank behind,
  TIMEOUT_COUNTS on the one ahead).
"""
from __future__ import annotations

import gc
import os
import traceback
from types import SimpleNamespace

import pytest
import torch

import mxep
from mxep.ep.buffer import Buffer
from mxep.ep.config import EPConfig
from mxep.ep.layout import clamp_counts
from mxep.ep.naive import simulate_combine, simulate_dispatch_layout, simulate_dispatch_mxfp8, simulate_dispatch_rows
from mxep.ep.transport.base import BAD_COUNTS, SEQUENCE_MISMATCH, TIMEOUT_COUNTS
from mxep.ep.transport.symm_mem.memory import POISON
from mxep.ep.transport.symm_mem.transport import SymmMemTransport
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld
from support.dist import run_distributed

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU Triton kernels need TRITON_INTERPRET=1")
# (the interpreter cannot run the peer kernels on CUDA memory: the GPU variants need it off)
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET,
                               reason="needs a CUDA GPU and TRITON_INTERPRET unset")
DEVICES = [pytest.param("cpu", marks=needs_interpreter), pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])]

GUARD = 0x5A          # guard margins (outputs and rank memory start as POISON = 0xA5)
MARGIN = 1024         # bytes each side (keeps the 256-byte alignment the kernels assume)
W, E, H, N = 2, 4, 64, 16

# name: (per-rank counts, per-rank rows n, counts dtype); every rank's counts are bad but the
# second rank's of "sum_past_n" (its status word must stay clear)
CASES = {
    "sum_past_n": ([[5, 7, 0, 0], [3, 3, 2, 2]], [10, 10], torch.int64),   # n < N: the old combine-push SIGSEGV
    "sum_past_N": ([[20, 0, 9, 4], [0, 6, 0, 0]], [16, 0], torch.int64),   # and a rank with no rows
    "negative_or_short": ([[-3, 4, 2, -1], [2, 0, 1, 0]], [6, 8], torch.int64),   # sum < n on rank 1
    # int64 saturates: 2**40 -> n; 2**32 would wrap to 0 (rank 1's [0, 0, 0, 2] would look valid)
    "huge_int64": ([[2 ** 40, 3, -2 ** 40, 2 ** 32 + 3], [0, 0, 2 ** 32, 2]], [7, 2], torch.int64),
    # the plan's running sum must not overflow int32
    "int32_max": ([[2 ** 31 - 1, 2 ** 31 - 1, 0, 0], [0, 2 ** 31 - 1, 1, 2 ** 31 - 1]], [4, 6], torch.int32),
    # counts claiming far more rows than x has, on every rank (2**30 on a rank of 5 rows)
    "far_past_n": ([[1000, 0, 0, 700], [0, 0, 0, 2 ** 30]], [16, 5], torch.int64),
    # the same garbage on both ranks, 5 rows each
    "garbage": ([[40, 0, 3, 2 ** 20], [40, 0, 3, 2 ** 20]], [5, 5], torch.int64),
}
# the interpreter pays per row and pad row: align 32 and a follow-up call in a few cases only
# on the CPU (the GPU runs every case with both aligns and the follow-up, gloo with align 32)
CPU_ALIGN_32 = ("sum_past_n", "far_past_n")
CPU_FOLLOW_UP = ("sum_past_n", "huge_int64", "far_past_n")
GLOO_ALIGN = 32
GOOD = ([[3, 1, 0, 4], [0, 5, 2, 2]], [8, 9], torch.int64)   # a valid call after the bad ones


# ----------------------------------------------------------------------------- helpers
def clamp_model(counts: list[int], n: int) -> tuple[list[int], bool]:
    """The clamping rule, one expert after another: negatives count 0, the running sum stops at n."""
    out, left = [], n
    for c in counts:
        take = min(max(c, 0), left)
        out.append(take)
        left -= take
    return out, out != list(counts) or sum(out) != n


def transport_counts(c: torch.Tensor, n: int) -> torch.Tensor:
    """What ``Buffer`` hands its transport for ``c`` (int64 saturated, then int32): the simulated
    world takes int32 counts as the symmetric-memory transport does."""
    fake = SimpleNamespace(num_experts=c.numel(), device=c.device, debug=False)
    return Buffer._check_counts(fake, c, n)


class Guards:
    """Allocations with GUARD margins on both sides; :meth:`check` asserts nobody wrote there."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.blocks = []

    def empty(self, shape, dtype, fill=POISON) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        big = torch.full((2 * MARGIN + (nbytes + 255) // 256 * 256,), GUARD, dtype=torch.uint8, device=self.device)
        inner = big[MARGIN:MARGIN + nbytes]
        inner.fill_(fill)
        self.blocks.append((big, nbytes))
        return inner.view(dtype).view(shape)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        out = self.empty(t.shape, t.dtype)
        out.copy_(t)
        return out

    def check(self) -> None:
        for k, (big, nbytes) in enumerate(self.blocks):
            assert bool((big[:MARGIN] == GUARD).all()), f"guarded tensor {k}: written before its start"
            assert bool((big[MARGIN + nbytes:] == GUARD).all()), f"guarded tensor {k}: written past its end"


def churn(device) -> None:
    """Allocate, fill and check many tensors of several sizes (and free them): a corrupted heap
    or a stray write into freed memory shows up here, or as a crash."""
    kept = []
    for i in range(80):
        size = (17, 256, 4096, 65536, 1 << 18)[i % 5] * (1 + i % 3)
        t = torch.empty(size, dtype=(torch.uint8, torch.float32, torch.bfloat16)[i % 3], device=device)
        t.fill_(i % 100)
        assert bool((t == i % 100).all())
        if i % 4 == 0:
            kept.append((i, t))
    for i, t in kept:
        assert bool((t == i % 100).all())
    del kept
    gc.collect()


def case_inputs(name_or_case, seed: int):
    """(raw counts per rank, rows per rank, xs, gradients of the combine output, the generator
    for more) of one case; every rank builds the same."""
    raw, rows, dtype = CASES[name_or_case] if isinstance(name_or_case, str) else name_or_case
    counts = [torch.tensor(c, dtype=dtype) for c in raw]
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, H, generator=gen).bfloat16() for n in rows]
    gys = [torch.randn(n, H, generator=gen).bfloat16() for n in rows]
    return counts, rows, xs, gys, gen


def expected(counts, xs, align, scale_mode="rceil"):
    """The oracle of the clamped counts: (clamped, bad, dispatch refs, layouts). Rows past the
    clamped counts are not dispatched."""
    clamped, bad = [], []
    for c, x in zip(counts, xs):
        cc, b = clamp_counts(c, x.shape[0])
        model, mbad = clamp_model(c.tolist(), x.shape[0])
        assert cc.tolist() == model and bool(b) == mbad, (c.tolist(), x.shape[0], cc.tolist(), model)
        clamped.append(cc.to(torch.int64))
        bad.append(mbad)
    used = [x[:int(c.sum())] for x, c in zip(xs, clamped)]
    return clamped, bad, simulate_dispatch_mxfp8(used, clamped, align, scale_mode), \
        simulate_dispatch_layout(clamped, align), used


def expected_combine(eos, lays, clamped, rows):
    """Rows back to their sources; rows past the clamped counts come out zero."""
    got = simulate_combine([e.cpu()[:lay.num_rows] for e, lay in zip(eos, lays)], lays, clamped)
    return [torch.cat([g, torch.zeros(n - g.shape[0], H, dtype=torch.bfloat16)]) for g, n in zip(got, rows)]


def assert_tokens(tokens, goe, tpe, ref):
    R = ref.qdata.shape[0]
    assert goe.cpu().tolist() == ref.group_end_offsets.tolist()
    assert tpe.cpu().tolist() == ref.tokens_per_expert.tolist()
    assert torch.equal(tokens.qdata[:R].cpu().view(torch.uint8), ref.qdata.view(torch.uint8))
    assert torch.equal(tokens.scale[:R].cpu().view(torch.uint8), ref.scale.view(torch.uint8))


def test_clamp_counts_matches_the_rule():
    """clamp_counts (the collective path's clamp and the reference of the plan kernel's) is the
    rule of its docstring: negatives become 0, the running sum is cut at n; int64 input never
    wraps. Checked against the python model on the cases and on random counts."""
    for raw, rows, dtype in list(CASES.values()) + [GOOD]:
        for c, n in zip(raw, rows):
            got, bad = clamp_counts(torch.tensor(c, dtype=dtype), n)
            assert (got.tolist(), bool(bad)) == clamp_model(c, n), (c, n)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        c = torch.randint(-4, 9, (8,), generator=gen)
        n = int(torch.randint(0, 40, (1,), generator=gen))
        got, bad = clamp_counts(c, n)
        assert (got.tolist(), bool(bad)) == clamp_model(c.tolist(), n), (c.tolist(), n)


# ----------------------------------------------------------------------------- simulated world
def guarded_world(guards: Guards, align: int, device) -> SimulatedWorld:
    """A simulated world whose rank memories sit inside guard margins."""
    sim = SimulatedWorld(W, E, H, N, align, device=device, config=EPConfig(poison_outputs=True))
    regions = sim.peers[0].regions
    mems = [guards.empty((regions.total_bytes,), torch.uint8) for _ in range(W)]
    sim.peers = SymmMemTransport.simulated_ranks(regions, sim.config, mems=mems)
    return sim


def assert_unused_bytes_untouched(sim: SimulatedWorld) -> None:
    """The scratch rows and the padding after the last region of every rank: never written."""
    for r, p in enumerate(sim.peers):
        reg = p.regions
        assert bool((p.dispatch_region_bf16[sim.capacity].view(torch.uint8) == POISON).all()), f"rank {r}: dispatch scratch row"
        assert bool((p.combine_region[N].view(torch.uint8) == POISON).all()), f"rank {r}: combine scratch row"
        tail = reg.combine_offset + (N + 1) * H * 2
        assert bool((p.mem[tail:] == POISON).all()), f"rank {r}: bytes past the combine region"


def run_simulated_case(name: str, align: int, device, monkeypatch, follow_up: bool = True) -> None:
    guards = Guards(device)
    monkeypatch.setattr(SymmMemTransport, "_new_output", lambda self, shape, dtype: guards.empty(shape, dtype))
    sim = guarded_world(guards, align, device)
    counts, rows, xs, gys, gen = case_inputs(name, seed=len(name))
    clamped, bad, ref, lays, _ = expected(counts, xs, align)
    dev_counts = [transport_counts(c.to(device), n) for c, n in zip(counts, rows)]

    res = sim.dispatch([guards.like(x.to(device)) for x in xs], dev_counts)
    for r in range(W):
        assert_tokens(res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, ref[r])
        assert sim.peers[r].status() == (BAD_COUNTS if bad[r] else 0), (name, r)
        p = sim.peers[r]   # the dispatch never writes the combine region or its scratch row
        assert bool((p.combine_region.view(torch.uint8) == POISON).all()), (name, r, "combine region")
        assert bool((p.dispatch_data[sim.capacity] == POISON).all()), (name, r, "dispatch scratch row")
    handles = [x.handle for x in res]

    eos = [torch.randn(sim.capacity, H, generator=gen).bfloat16() for _ in range(W)]
    exp_y = expected_combine(eos, lays, clamped, rows)
    ys = sim.combine([guards.like(e.to(device)) for e in eos], handles)          # push (regular input)
    for r in range(W):
        assert torch.equal(ys[r].cpu(), exp_y[r]), (name, r, "push")
    for zin, e in zip(sim.combine_inputs(), eos):
        zin.copy_(e.to(device))
    ys = sim.combine(sim.combine_inputs(), handles)                              # pull (combine input)
    for r in range(W):
        assert torch.equal(ys[r].cpu(), exp_y[r]), (name, r, "pull")

    back = sim.dispatch_bf16([guards.like(g.to(device)) for g in gys], handles)  # the combine's backward
    exp_back = simulate_dispatch_rows([g[:int(c.sum())] for g, c in zip(gys, clamped)], clamped, align)
    for r in range(W):
        assert torch.equal(back[r][:lays[r].num_rows].cpu(), exp_back[r]), (name, r, "dispatch_bf16")

    if follow_up:   # the next valid call on the same memory is exact; the status word keeps its record
        check_valid_call_after(sim, guards, align, bad, device)

    churn(device)
    guards.check()
    assert_unused_bytes_untouched(sim)


def check_valid_call_after(sim, guards, align, bad, device) -> None:
    counts2, rows2, xs2, _, _ = case_inputs(GOOD, seed=99)
    _, bad2, ref2, _, _ = expected(counts2, xs2, align)
    assert not any(bad2)
    res2 = sim.dispatch([guards.like(x.to(device)) for x in xs2],
                        [transport_counts(c.to(device), n) for c, n in zip(counts2, rows2)])
    for r in range(W):
        assert_tokens(res2[r].tokens, res2[r].group_end_offsets, res2[r].tokens_per_expert, ref2[r])
        assert sim.peers[r].status() == (BAD_COUNTS if bad[r] else 0)
        assert sim.peers[r].signal_word("seq") == 2
        if bad[r]:
            with pytest.raises(RuntimeError, match=f"rank {r}, dispatch: num_tokens_per_expert was negative"):
                sim.peers[r].check_status("dispatch")
        else:
            sim.peers[r].check_status("dispatch")


def bad_counts_paths():
    """(path, device, align, follow-up call) for every case: the simulated world on the CPU and
    on one GPU, and the Buffer on 2 gloo ranks (one spawn runs every case: the gloo fixture)."""
    out = []
    for name in CASES:
        out.append(pytest.param("simulated", "cpu", 32 if name in CPU_ALIGN_32 else 16, name in CPU_FOLLOW_UP, name,
                                marks=needs_interpreter, id=f"simulated-cpu-{name}"))
        out += [pytest.param("simulated", "cuda", align, True, name, marks=[pytest.mark.gpu, needs_gpu],
                             id=f"simulated-cuda-align{align}-{name}") for align in (16, 32)]
        out.append(pytest.param("gloo", "cpu", GLOO_ALIGN, True, name, id=f"gloo-{name}"))
    return out


@pytest.mark.parametrize("path,device,align,follow_up,name", bad_counts_paths())
def test_bad_counts(path, device, align, follow_up, name, request, monkeypatch):
    if path == "gloo":
        _assert_ok(request.getfixturevalue("gloo_results"), f"bad_counts:{name}")
        return
    run_simulated_case(name, align, device, monkeypatch, follow_up)
    if device == "cuda":
        torch.cuda.synchronize()


def drive_out_of_step(device, how: str) -> tuple[SimulatedWorld, int, int]:
    """Two ranks one call apart; returns the world, the rank behind and the rank ahead.

    ``"mid_call"``: rank 0 runs one dispatch plan while rank 1 runs two, phase by phase:
    put(0, #1), put(1, #1), plan(1, #1), put(1, #2), plan(0, #1), plan(1, #2).
    ``"after_timeout"``: after a clean call on both ranks (bit-exact), rank 0 runs call 2 alone
    (its plan times out: rank 1 is not there) and then puts the counts of call 3: when rank 1
    plans its call 2 it finds rank 0's flag past its own call number (instead of silently
    pairing rank 0's call 3 with its call 2)."""
    sim = SimulatedWorld(W, E, H, N, 32, device=device,   # (wait_polls: ms on a GPU, not s)
                         config=EPConfig(poison_outputs=True, spread_parts=1, wait_polls=1 << 12))
    p0, p1 = sim.peers
    if how == "mid_call":
        c = torch.tensor([2, 1, 0, 3], dtype=torch.int32, device=device)
        p0.exchange_and_plan(c, 6, 32, "put")
        p1.exchange_and_plan(c, 6, 32, "put")
        p1.exchange_and_plan(c, 6, 32, "plan")
        assert p1.status() == 0
        p1.exchange_and_plan(c, 6, 32, "put")     # rank 1's second call, rank 0 still in its first
        p0.exchange_and_plan(c, 6, 32, "plan")    # sees rank 1's flag of call 2
        p1.exchange_and_plan(c, 6, 32, "plan")    # waits for rank 0's call 2, which never comes
        return sim, 0, 1
    counts, rows, xs, _, _ = case_inputs(GOOD, seed=8)
    _, _, ref, _, _ = expected(counts, xs, 32)
    counts = [transport_counts(c.to(device), n) for c, n in zip(counts, rows)]
    res = sim.dispatch([x.to(device) for x in xs], counts)   # call 1 on both ranks: clean
    for r in range(W):
        assert_tokens(res[r].tokens, res[r].group_end_offsets, res[r].tokens_per_expert, ref[r])
    assert p0.status() == 0 and p1.status() == 0
    p0.exchange_and_plan(counts[0], rows[0], 32)              # call 2 on rank 0 alone
    assert p0.status() == TIMEOUT_COUNTS and p0.signal_word("seq") == 2
    p0.exchange_and_plan(counts[0], rows[0], 32, "put")       # rank 0's call 3 puts its counts
    p1.exchange_and_plan(counts[1], rows[1], 32)              # rank 1's call 2
    return sim, 1, 0


@pytest.mark.parametrize("how", ["mid_call", "after_timeout"])
@pytest.mark.parametrize("device", DEVICES)
def test_rank_one_call_ahead_is_detected(device, how):
    sim, behind, ahead = drive_out_of_step(device, how)
    if device == "cuda":
        torch.cuda.synchronize()
    assert sim.peers[behind].status() == SEQUENCE_MISMATCH
    assert sim.peers[ahead].status() == TIMEOUT_COUNTS
    with pytest.raises(RuntimeError, match=f"rank {behind}, dispatch: a peer's counts belong to another dispatch call"):
        sim.peers[behind].check_status("dispatch")
    with pytest.raises(RuntimeError, match=f"rank {ahead}, dispatch: the dispatch plan waited too long"):
        sim.peers[ahead].check_status("dispatch")


# ----------------------------------------------------------------------------- grouped GEMM
BAD_OFFSETS = {   # cap = 64 rows, L = 3
    "past_capacity": [30, 64 + 50, 2 ** 31 - 1],
    "decreasing": [40, 20, 60],
    "negative": [-2 ** 31, 30, -1],
    "all_past": [2 ** 30, 2 ** 30, 2 ** 30],
}


def clamp_offsets(offs: list[int], cap: int) -> list[int]:
    out, hi = [], 0
    for o in offs:
        hi = max(hi, min(max(o, 0), cap))
        out.append(hi)
    return out


def run_gemm_bad_offsets(device) -> None:
    from mxep.gemm.grouped_gemm import grouped_mm_mxfp8_forward
    from mxep.gemm.naive import grouped_mm_reference

    cap, K, Nout, L = 64, 64, 32, 3
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(cap, K, generator=gen).bfloat16()
    t = mxep.to_mxfp8(x.to(device))
    w = (torch.randn(L, Nout, K, generator=gen) / K ** 0.5).bfloat16().to(device)
    guards = Guards(device)
    q = guards.like(t.qdata.view(torch.uint8))
    s = guards.like(t.scale.view(torch.uint8))
    wg = guards.like(w)
    for k, (name, offs) in enumerate(BAD_OFFSETS.items()):
        offs_t = guards.like(torch.tensor(offs, dtype=torch.int32, device=device))
        out = guards.empty((cap, Nout), torch.bfloat16)
        grouped_mm_mxfp8_forward(q, s, wg, offs_t, out=out)
        good = torch.tensor(clamp_offsets(offs, cap), dtype=torch.int32, device=device)
        same = grouped_mm_mxfp8_forward(q, s, wg, good)
        R = int(good[-1])
        assert torch.equal(out[:R], same[:R]), name                           # the clamp: the valid layout's result
        assert bool((out[R:].view(torch.uint8) == POISON).all()), name        # past the end: never written
        ref = grouped_mm_reference(t.qdata.cpu(), t.scale.cpu(), w.cpu(), good.cpu())
        err = (out[:R].float().cpu() - ref.float()).norm() / ref.float().norm().clamp(min=1e-30)
        assert float(err) < 4e-3, (name, float(err))
        if k == 0:   # the public op (it allocates its own output) on the same bad offsets
            tokens = mxep.MXFP8Tensor(q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu))
            pub = mxep.grouped_mm_mxfp8(tokens, wg, offs_t, impl="fused")
            assert torch.equal(pub[:R], same[:R]), name
    churn(device)
    guards.check()


@pytest.mark.parametrize("device", DEVICES)
def test_fused_grouped_gemm_clamps_bad_group_ends(device):
    run_gemm_bad_offsets(device)
    if device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- Buffer on gloo
def _try(results: dict, key: str, fn) -> None:
    try:
        fn()
        results[key] = "ok"
    except BaseException:   # reported to the parent, test by test
        results[key] = traceback.format_exc()


def _gloo_bad_counts_case(rank: int, name: str) -> None:
    align = GLOO_ALIGN
    counts, rows, xs, gys, gen = case_inputs(name, seed=len(name))
    clamped, bad, ref, lays, _ = expected(counts, xs, align)
    buf = Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N, align=align)
    assert buf.transport_name == "collective" and not buf.debug
    cap = buf.capacity
    eos = [torch.randn(cap, H, generator=gen).bfloat16() for _ in range(W)]
    grads = [torch.randn(cap, H, generator=gen).bfloat16() for _ in range(W)]
    exp_y = expected_combine(eos, lays, clamped, rows)
    R = lays[rank].num_rows

    # x and expert_out inside larger tensors with poison neighbours (row slices: contiguous views)
    poison = torch.full((4, H), float("nan"), dtype=torch.bfloat16)
    xbig = torch.cat([poison, xs[rank], poison]).requires_grad_(True)
    x = xbig[4:4 + rows[rank]]
    res = buf.dispatch(x, counts[rank])
    assert_tokens(res.tokens, res.group_end_offsets, res.tokens_per_expert, ref[rank])

    # backward of the dispatch: a combine of the tokens' gradient (rows past the clamped counts: 0)
    mask = torch.zeros(cap, 1, dtype=torch.bfloat16)
    mask[:R] = 1
    (res.tokens.dequantize() * grads[rank] * mask).float().sum().backward()
    gexp = expected_combine([g * mask for g in grads], lays, clamped, rows)[rank]
    assert torch.equal(xbig.grad[4:4 + rows[rank]], gexp)
    assert bool((xbig.grad[:4] == 0).all() and (xbig.grad[4 + rows[rank]:] == 0).all())

    # push combine of a regular expert_out, and its backward (a bf16 dispatch)
    ebig = torch.cat([poison, eos[rank], poison]).requires_grad_(True)
    y = buf.combine(ebig[4:4 + cap], res.handle)
    assert torch.equal(y.detach(), exp_y[rank])
    y.backward(gys[rank])
    exp_back = simulate_dispatch_rows([g[:int(c.sum())] for g, c in zip(gys, clamped)], clamped, align)[rank]
    assert torch.equal(ebig.grad[4:4 + R], exp_back)
    assert bool((ebig.grad[:4] == 0).all() and (ebig.grad[4 + cap:] == 0).all())

    # pull combine from the combine input
    with torch.no_grad():
        zin = buf.combine_input()
        zin.copy_(eos[rank])
        assert torch.equal(buf.combine(zin, res.handle), exp_y[rank])
    assert bool(torch.isnan(xbig.detach()[:4]).all() and torch.isnan(ebig.detach()[4 + cap:]).all())

    # recorded: check() raises on the rank whose counts were bad, naming it and the op
    assert buf.transport.status() == (BAD_COUNTS if bad[rank] else 0)
    if bad[rank]:
        with pytest.raises(RuntimeError, match=f"rank {rank}, step 3: num_tokens_per_expert was negative.*clamped"):
            buf.check("step 3")
    else:
        buf.check("step 3")
    # the next valid call on the same Buffer is exact
    counts2, _, xs2, _, _ = case_inputs(GOOD, seed=99)
    _, bad2, ref2, _, _ = expected(counts2, xs2, align)
    assert not any(bad2)
    res2 = buf.dispatch(xs2[rank], counts2[rank])
    assert_tokens(res2.tokens, res2.group_end_offsets, res2.tokens_per_expert, ref2[rank])
    churn("cpu")


def _gloo_debug_mode(rank: int) -> None:
    buf = Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N, debug=True)
    x = torch.randn(6, H).bfloat16()
    for bad in ([5, 7, 0, 0], [-1, 4, 3, 0], [2 ** 40, 0, 0, 0], [1, 1, 1, 1]):   # raised before any collective
        with pytest.raises(ValueError, match="must be >= 0 and sum to n=6"):
            buf.dispatch(x, torch.tensor(bad))
    res = buf.dispatch(x, torch.tensor([1, 2, 3, 0]))      # checked after: the status word is clear
    buf.combine(res.tokens.dequantize().detach(), res.handle)
    assert buf.transport.status() == 0


SETTINGS = {   # setting: (rank 0's value, rank 1's value)
    "hidden": (64, 128),
    "align": (32, 16),
    "scale_mode": ("rceil", "floor"),
    "max_tokens_per_rank": (8, 16),
    "num_experts": (4, 8),
}


def _gloo_settings_disagree(rank: int, setting: str) -> None:
    kwargs = dict(num_experts=4, hidden=64, max_tokens_per_rank=8, align=32, scale_mode="rceil")
    values = SETTINGS[setting]
    kwargs[setting] = values[rank]
    with pytest.raises(ValueError) as err:
        Buffer(None, **kwargs)
    msg = str(err.value)
    assert f"different {setting} (rank 0: {values[0]!r}, rank 1: {values[1]!r})" in msg, msg


def _gloo_handles_and_sizes(rank: int) -> None:
    a = Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N)
    b = Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N)
    x = torch.randn(6, H).bfloat16()
    res = a.dispatch(x, torch.tensor([1, 2, 3, 0]))
    eo = torch.zeros(b.capacity, H, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="handle belongs to a dispatch on another Buffer"):
        b.combine(eo, res.handle)
    sim = SimulatedWorld(1, E, H, N)   # a handle of a transport that is no Buffer's
    foreign = sim.plan([torch.tensor([1, 2, 3, 0])], [6])[0]
    with pytest.raises(ValueError, match="another Buffer"):
        a.combine(eo, foreign)
    with pytest.raises(TypeError, match="handle must be a DispatchHandle"):
        a.combine(eo, "handle")
    assert torch.equal(a.combine(eo, res.handle), torch.zeros(6, H, dtype=torch.bfloat16))   # a still works
    for kwargs, exc, msg in [
        (dict(hidden=64.0), TypeError, r"hidden must be an int, got 64\.0 \(float\)"),
        (dict(hidden=True), TypeError, r"hidden must be an int, got True \(bool\)"),
        (dict(num_experts=4.0), TypeError, r"num_experts must be an int, got 4\.0"),
        (dict(max_tokens_per_rank=8.5), TypeError, r"max_tokens_per_rank must be an int, got 8\.5"),
        (dict(max_tokens_per_rank=-1), ValueError, r"max_tokens_per_rank must be >= 0, got -1"),
        (dict(align=0), ValueError, r"align must be >= 1, got 0"),
        (dict(align=1.5), TypeError, r"align must be an int, got 1\.5"),
        (dict(align=False), TypeError, r"align must be an int, got False \(bool\)"),
        (dict(hidden="64"), TypeError, r"hidden must be an int, got '64' \(str\)"),
    ]:
        full = dict(num_experts=E, hidden=H, max_tokens_per_rank=N)
        full.update(kwargs)
        with pytest.raises(exc, match=msg):
            Buffer(None, **full)
    # any integer type (``__index__``) is an int
    assert Buffer(None, num_experts=E, hidden=torch.tensor(H), max_tokens_per_rank=N).hidden == H


def _gloo_body(rank: int, world: int) -> dict:
    results: dict = {}
    for name in CASES:
        _try(results, f"bad_counts:{name}", lambda: _gloo_bad_counts_case(rank, name))
    _try(results, "debug_mode", lambda: _gloo_debug_mode(rank))
    for setting in SETTINGS:
        _try(results, f"settings:{setting}", lambda: _gloo_settings_disagree(rank, setting))
    _try(results, "handles_and_sizes", lambda: _gloo_handles_and_sizes(rank))
    return results


@pytest.fixture(scope="module")
def gloo_results():
    """One spawn of 2 gloo ranks runs every collective-path check (startup is the cost); each
    test below reads its own entry. The timeout is also the process group's: a rank stuck in a
    collective fails the spawn instead of hanging it."""
    if not INTERPRET:
        pytest.skip("the collective path quantizes with a Triton kernel: needs TRITON_INTERPRET=1 on the CPU")
    return run_distributed(_gloo_body, W, timeout=150)


def _assert_ok(results, key):
    for rank, res in enumerate(results):
        assert res[key] == "ok", f"rank {rank}, {key}:\n{res[key]}"


def test_gloo_debug_mode_raises_before_dispatch(gloo_results):
    _assert_ok(gloo_results, "debug_mode")


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_gloo_settings_that_differ_raise_on_every_rank(gloo_results, setting):
    _assert_ok(gloo_results, f"settings:{setting}")


def test_gloo_foreign_handles_and_bad_sizes_refused(gloo_results):
    _assert_ok(gloo_results, "handles_and_sizes")
