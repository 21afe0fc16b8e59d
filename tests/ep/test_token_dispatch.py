"""Token-level dispatch and combine (``Buffer(top_k=k).dispatch_tokens`` / ``combine_tokens``).

Against independent references: the layout bit for bit against the single-process oracle of
the stably expert-sorted expansion (``mxep.ep.naive``, pure-torch quantizer); the combine, the
dispatch's backward and both combine gradients against float64 sums; the simulated world
(the symmetric-memory kernels) and the collective transport (gloo ranks) against each other,
bit for bit. Routing: skewed, ``-1`` slots, a rank with no tokens, tokens whose experts all
live on one rank, top_k 1, 2 and 8; outputs poisoned before the kernels write them.
"""
from __future__ import annotations

import pytest
import torch

from mxep.ep.config import EPConfig
from mxep.ep.naive import simulate_dispatch_mxfp8
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld
from support import worlds

POISON = EPConfig(poison_outputs=True)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def _routing(g, t, E, k, W, kind):
    """``topk_idx`` int64 ``[t, k]`` (distinct per row, ``-1`` slots where ``kind`` says)."""
    if kind == "one_rank":     # every expert of a token on one rank
        L = E // W
        d = torch.randint(0, W, (t,), generator=g)
        idx = torch.stack([d[i] * L + torch.randperm(L, generator=g)[:k] for i in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.int64)
    elif kind == "skewed":     # expert 0 in most tokens
        rows = []
        for _ in range(t):
            r = torch.randperm(E, generator=g)[:k]
            if torch.rand((), generator=g) < 0.7 and 0 not in r:
                r[0] = 0
            rows.append(r)
        idx = torch.stack(rows) if t else torch.zeros(0, k, dtype=torch.int64)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]) if t else \
            torch.zeros(0, k, dtype=torch.int64)
    if kind in ("holes", "skewed") and t:
        holes = torch.rand(t, k, generator=g) < 0.25
        idx = torch.where(holes, -1, idx)
    return idx


def _inputs(seed, W, E, H, T, k, kind, empty_rank=None):
    g = torch.Generator().manual_seed(seed)
    ts = [0 if r == empty_rank else int(torch.randint(1, T + 1, (), generator=g)) for r in range(W)]
    xs = [torch.randn(t, H, generator=g).bfloat16() for t in ts]
    idx = [_routing(g, t, E, k, W, kind) for t in ts]
    ws = [torch.rand(t, k, generator=g) for t in ts]
    return xs, idx, ws


def _expansion(xs, idx, E, k):
    """Rows and counts of the stably expert-sorted expansion of every rank's pairs (the oracle's input)."""
    rows, counts = [], []
    for x, i in zip(xs, idx):
        e = torch.where(i >= 0, i, E).flatten()
        order = torch.argsort(e, stable=True)
        keep = e[order] < E
        rows.append(x[order // k][keep] if x.shape[0] else x[:0])
        counts.append(torch.bincount(e[e < E], minlength=E))
    return rows, counts


def _pair_rows_ref(idx, offsets_per_rank, E, W):
    """Oracle row of every pair: on the owner, expert e's group holds source 0's tokens that chose
    e in token order, then source 1's, ... (docs/layout.md)."""
    L = E // W
    nxt = {}
    out = []
    for s, i in enumerate(idx):
        rows = torch.full(i.shape, -1, dtype=torch.int64)
        out.append(rows)
    for g in range(E):
        d, e = divmod(g, L)
        start = 0 if e == 0 else int(offsets_per_rank[d][e - 1])
        p = start
        for s, i in enumerate(idx):
            for t in range(i.shape[0]):
                for j in range(i.shape[1]):
                    if int(i[t, j]) == g:
                        out[s][t, j] = p
                        p += 1
        nxt[g] = p
    return out


CASES = [  # (W, E, H, T, k, kind, empty_rank)
    (2, 8, 64, 9, 3, "holes", None),
    (3, 6, 96, 7, 2, "skewed", 1),
    (4, 16, 64, 6, 8, "uniform", None),
    (2, 4, 32, 5, 1, "one_rank", None),
    (4, 8, 64, 5, 2, "one_rank", 3),
]


@pytest.mark.parametrize("align", [32, 128])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}-E{c[1]}-k{c[4]}-{c[5]}")
def test_simulated_token_dispatch_combine(case, device, align):
    _check_simulated(case, device, align)


def symm_mem_world(W, E, H, T, k, align, device):
    return SimulatedWorld(W, E, H, T, align, top_k=k, config=POISON, device=device)


def _check_simulated(case, device, align=32, make_world=symm_mem_world):
    """Every check of the token-level path on the simulated world on ``device`` (inputs made and
    references computed on the CPU), groups padded to ``align`` rows; on CUDA with the kernels
    compiled for sm_90 (hardware e4m3 cast). ``make_world(W, E, H, T, k, align, device)``: the
    simulated world of a transport (default the symmetric-memory one's)."""
    W, E, H, T, k, kind, empty = case
    xs, idx, ws = _inputs(7 + W + k, W, E, H, T, k, kind, empty)
    world = make_world(W, E, H, T, k, align, device)
    on = lambda ts: [t.to(device) for t in ts]   # noqa: E731
    back = lambda ts: [t.cpu() for t in ts]      # noqa: E731
    dispatched = world.dispatch_tokens(on(xs), on(idx), on(ws))

    class _Out:   # the CPU view of one rank's result
        def __init__(self, o):
            self.group_end_offsets, self.tokens_per_expert = o.group_end_offsets.cpu(), o.tokens_per_expert.cpu()
            self.tokens = type("T", (), {"qdata": o.tokens.qdata.cpu(), "scale": o.tokens.scale.cpu()})
            self.handle = o.handle
            self.pair_rows = o.handle.state.pair_rows.cpu()
    out = [_Out(o) for o in dispatched]

    # layout, bit for bit, against the oracle of the sorted expansion
    rows, counts = _expansion(xs, idx, E, k)
    ref = simulate_dispatch_mxfp8(rows, counts, align)
    for r in range(W):
        end = int(out[r].group_end_offsets[-1])
        assert torch.equal(out[r].group_end_offsets, ref[r].group_end_offsets.to(torch.int32))
        assert torch.equal(out[r].tokens_per_expert, ref[r].tokens_per_expert.to(torch.int32))
        assert torch.equal(out[r].tokens.qdata.view(torch.uint8)[:end], ref[r].qdata.view(torch.uint8)[:end])
        assert torch.equal(out[r].tokens.scale.view(torch.uint8)[:end], ref[r].scale.view(torch.uint8)[:end])
    pair_rows = _pair_rows_ref(idx, [o.group_end_offsets for o in out], E, W)
    for r in range(W):
        assert torch.equal(out[r].pair_rows.long(), pair_rows[r])

    # combine against float64; run to run bit-identical
    g = torch.Generator().manual_seed(99)
    eos = [torch.randn(world.capacity, H, generator=g).bfloat16() for _ in range(W)]
    handles = [o.handle for o in out]
    ys = back(world.combine_tokens(on(eos), handles))
    ys2 = back(world.combine_tokens(on(eos), handles))
    L = E // W
    for r in range(W):
        assert torch.equal(ys[r], ys2[r])
        ref_y = torch.zeros(xs[r].shape[0], H, dtype=torch.float64)
        for t in range(xs[r].shape[0]):
            for j in range(k):
                e = int(idx[r][t, j])
                if e >= 0:
                    ref_y[t] += ws[r][t, j].double() * eos[e // L][int(pair_rows[r][t, j])].double()
        if ref_y.numel():
            assert (ys[r].double() - ref_y).norm() <= 1e-2 * ref_y.norm() + 1e-6

    # the combine's backward: bf16 w * dy at every pair's row (pad rows zero), fp32 dots
    dys = [torch.randn(x.shape[0], H, generator=g).bfloat16() for x in xs]
    grads = [(a.cpu(), b.cpu()) for a, b in world.combine_tokens_backward(on(dys), on(eos), handles)]
    for r in range(W):
        geo = grads[r][0]
        ends = out[r].group_end_offsets.tolist()   # debug-only (test)
        recv = out[r].tokens_per_expert.tolist()   # debug-only (test)
        for e in range(L):
            start = 0 if e == 0 else ends[e - 1]
            assert torch.all(geo[start + recv[e]:ends[e]] == 0)    # pad rows
    for s in range(W):
        gw = grads[s][1]
        for t in range(xs[s].shape[0]):
            for j in range(k):
                e = int(idx[s][t, j])
                if e < 0:
                    assert gw[t, j] == 0
                    continue
                row = int(pair_rows[s][t, j])
                assert torch.equal(grads[e // L][0][row], (ws[s][t, j] * dys[s][t].float()).bfloat16())
                dot = float((dys[s][t].double() * eos[e // L][row].double()).sum())
                assert abs(float(gw[t, j]) - dot) <= 1e-4 * (1 + abs(dot))

    # the dispatch's backward: x.grad[t] = the sum of the gradient at its pairs' rows
    gts = [torch.randn(world.capacity, H, generator=g).bfloat16() for _ in range(W)]
    gx = back(world.dispatch_tokens_backward(on(gts), handles))
    for s in range(W):
        ref_g = torch.zeros(xs[s].shape[0], H, dtype=torch.float64)
        for t in range(xs[s].shape[0]):
            for j in range(k):
                e = int(idx[s][t, j])
                if e >= 0:
                    ref_g[t] += gts[e // L][int(pair_rows[s][t, j])].double()
        if ref_g.numel():
            assert (gx[s].double() - ref_g).norm() <= 1e-2 * ref_g.norm() + 1e-6


def buffer_vs_kernels(rank, world, case, transport="auto"):
    """One case through this rank's ``Buffer(transport=...)`` and autograd against the
    symmetric-memory kernels of the simulated world on every rank's inputs: ``(same bits?,
    pairs of this rank the capacity dropped)``. ``case``: ``(E, H, T, k, kind, empty_rank, seed,
    capacity_factor)``. The gate-weight gradients are compared exactly on transports whose dot
    products are the kernels' (``nvshmem``), to fp32 rounding on the collective one (torch's)."""
    import mxep

    E, H, T, k, kind, empty, seed, cf = case
    xs, idx, ws = _inputs(seed, world, E, H, T, k, kind, empty)
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, config=POISON,
                      transport=transport, capacity_factor=cf)
    g = torch.Generator().manual_seed(seed + 1)
    eos = [torch.randn(buf.capacity, H, generator=g).bfloat16() for _ in range(world)]
    dys = [torch.randn(x.shape[0], H, generator=g).bfloat16() for x in xs]
    gts = [torch.randn(buf.capacity, H, generator=g).bfloat16() for _ in range(world)]
    x = xs[rank].clone().requires_grad_(True)
    w = ws[rank].clone().requires_grad_(True)
    res = buf.dispatch_tokens(x, idx[rank], w)
    eo = eos[rank].clone().requires_grad_(True)
    y = buf.combine_tokens(eo, res.handle, w)
    (y.float() * dys[rank].float()).sum().backward()
    x2 = xs[rank].clone().requires_grad_(True)
    res2 = buf.dispatch_tokens(x2, idx[rank], ws[rank])
    (res2.tokens.dequantize().float() * gts[rank].float()).sum().backward()

    sw = SimulatedWorld(world, E, H, T, top_k=k, expert_capacity=buf.expert_capacity)
    out = sw.dispatch_tokens(xs, idx, ws)
    hs = [o.handle for o in out]
    ys, gr, gx = sw.combine_tokens(eos, hs), sw.combine_tokens_backward(dys, eos, hs), sw.dispatch_tokens_backward(gts, hs)
    end = int(res.group_end_offsets[-1])
    o = out[rank]
    dropped = int(((o.handle.state.pair_owner >= 0) & (o.handle.state.pair_rows < 0)).sum())
    same_w = torch.equal(w.grad, gr[rank][1]) if buf.transport_name == "nvshmem" else \
        torch.allclose(w.grad, gr[rank][1], rtol=1e-4, atol=1e-4)
    ok = (sw.capacity == buf.capacity and torch.equal(res.group_end_offsets, o.group_end_offsets)
          and torch.equal(res.tokens.qdata.view(torch.uint8)[:end], o.tokens.qdata.view(torch.uint8)[:end])
          and torch.equal(res.tokens.scale.view(torch.uint8)[:end], o.tokens.scale.view(torch.uint8)[:end])
          and torch.equal(y, ys[rank]) and torch.equal(eo.grad[:end], gr[rank][0][:end]) and same_w
          and torch.equal(x2.grad, gx[rank]) and int(res.num_dropped) == dropped)
    buf.check()
    return ok, dropped


def _buffer_body(rank, world, cases):
    return [buffer_vs_kernels(rank, world, case)[0] for case in cases]


def _collective_cases(world):
    cases = [(8, 64, 9, 3, "holes", None, 11, None)]
    if world == 2:   # a rank with no tokens, skewed routing
        cases.append((8, 32, 6, 2, "skewed", 1, 12, None))
    return cases


for _w in (1, 2, 4):   # one shared gloo world per size for the session (tests/support/worlds.py)
    worlds.register(_w, "ep/tokens", _buffer_body, _collective_cases(_w))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_collective_matches_symmetric_memory_kernels(world):
    """The gloo ranks' Buffer (collective transport: source-side expansion) gives the same bits
    as the symmetric-memory kernels of the simulated world, forward and backward."""
    res = worlds.results(world, "ep/tokens")
    assert all(all(r) for r in res), res


def test_token_buffer_refuses_row_level_calls():
    import torch.distributed as dist

    from support.dist import free_port
    import mxep

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        buf = mxep.Buffer(None, num_experts=4, hidden=32, max_tokens_per_rank=4, top_k=2)
        with pytest.raises(RuntimeError, match="row-level"):
            buf.dispatch(torch.randn(2, 32).bfloat16(), torch.tensor([1, 1, 0, 0]))
        with pytest.raises(ValueError, match="topk_idx must be"):
            buf.dispatch_tokens(torch.randn(2, 32).bfloat16(), torch.zeros(2, 3, dtype=torch.int64), torch.rand(2, 3))
        rows = mxep.Buffer(None, num_experts=4, hidden=32, max_tokens_per_rank=4)
        with pytest.raises(RuntimeError, match="token-level"):
            rows.dispatch_tokens(torch.randn(2, 32).bfloat16(), torch.zeros(2, 2, dtype=torch.int64), torch.rand(2, 2))
        with pytest.raises(ValueError, match="top_k"):
            mxep.Buffer(None, num_experts=4, hidden=32, max_tokens_per_rank=4, top_k=5)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_token_path_no_host_sync_and_graph_capture():
    """dispatch_tokens -> combine_tokens -> both backward passes on the simulated world: no host
    sync (sync-debug "error"), and a CUDA graph of the whole step replays with new data and new
    routing (copied into the captured inputs) to the eager result."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    W, E, H, T, k = 4, 16, 128, 24, 4
    world = SimulatedWorld(W, E, H, T, top_k=k, device="cuda")
    def inputs(seed):
        xs, idx, ws = _inputs(seed, W, E, H, T, k, "holes")
        xs = [torch.cat([x, torch.zeros(T - x.shape[0], H).bfloat16()]).cuda() for x in xs]       # fixed shapes
        idx = [torch.cat([i, torch.full((T - i.shape[0], k), -1)]).cuda() for i in idx]
        ws = [torch.cat([w, torch.zeros(T - w.shape[0], k)]).cuda() for w in ws]
        return xs, idx, ws
    eos = [torch.randn(world.capacity, H, device="cuda").bfloat16() for _ in range(W)]
    dys = [torch.randn(T, H, device="cuda").bfloat16() for _ in range(W)]

    def step(xs, idx, ws):
        out = world.dispatch_tokens(xs, idx, ws)
        hs = [o.handle for o in out]
        ys = world.combine_tokens(eos, hs)
        gr = world.combine_tokens_backward(dys, eos, hs)
        gx = world.dispatch_tokens_backward(eos, hs)
        # (the layouts' rows past their ends are unspecified: compare what is defined everywhere)
        return ys + [g[1] for g in gr] + gx

    xs, idx, ws = inputs(1)
    step(xs, idx, ws)          # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(xs, idx, ws)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(xs, idx, ws)
    new = inputs(2)
    for dst, src in zip(xs + idx + ws, new[0] + new[1] + new[2]):
        dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    eager = step(*new)
    for c, e in zip(captured, eager):
        assert torch.equal(c, e) if c.dtype != torch.float32 else torch.allclose(c, e, rtol=1e-4, atol=1e-4)


def _token_forward(buf, x, idx, w, eo, dy):
    res = buf.dispatch_tokens(x, idx, w)
    y = buf.combine_tokens(eo, res.handle, w)
    loss = (y.float() * dy.float()).sum() + (res.tokens.dequantize().float() * eo.detach().float()).sum()
    return loss, y, res.tokens.qdata.view(torch.uint8), res.group_end_offsets


def _one_rank_token_step(buf, x, idx, w, eo, dy, forward=_token_forward):
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    eo = eo.clone().requires_grad_(True)
    loss, y, q, ends = forward(buf, x, idx, w, eo, dy)
    loss.backward()
    end = int(ends[-1])   # debug-only (test)
    return q[:end], y, x.grad, w.grad, eo.grad[:end]


def test_token_ops_symm_mem_path_and_compile():
    """The Buffer's registered token-level ops on the symmetric-memory transport's code path
    (a one-rank world over local memory, under the interpreter) give the collective transport's
    bits; and torch.compile(fullgraph=True) of dispatch -> combine -> backward equals eager."""
    import torch.distributed as dist

    import mxep
    from mxep.ep.transport.symm_mem import SymmMemTransport
    from support.dist import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        E, H, T, k = 8, 64, 11, 3
        xs, idx, ws = _inputs(3, 1, E, H, T, k, "holes")
        coll = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k)
        symm = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k)
        symm.transport = SymmMemTransport.over_local_memory(symm.regions, symm.config)
        g = torch.Generator().manual_seed(4)
        eo = torch.randn(coll.capacity, H, generator=g).bfloat16()
        dy = torch.randn(xs[0].shape[0], H, generator=g).bfloat16()
        a = _one_rank_token_step(coll, xs[0], idx[0], ws[0], eo, dy)
        b = _one_rank_token_step(symm, xs[0], idx[0], ws[0], eo, dy)
        for u, v in zip(a, b):
            assert torch.equal(u, v) if u.dtype != torch.float32 else torch.allclose(u, v, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(_token_forward, fullgraph=True, backend="aot_eager")
        for buf in (coll, symm):
            c = _one_rank_token_step(buf, xs[0], idx[0], ws[0], eo, dy, forward=compiled)
            for u, v in zip(a, c):
                assert torch.equal(u, v) if u.dtype != torch.float32 else torch.allclose(u, v, rtol=1e-4, atol=1e-4)
    finally:
        dist.destroy_process_group()


def _capacity_body(rank, world, cf):
    import mxep

    E, H, T, k = 8, 32, 12, 2
    xs, idx, ws = _inputs(31, world, E, H, T, k, "skewed")
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, capacity_factor=cf)
    res = buf.dispatch_tokens(xs[rank], idx[rank], ws[rank])
    L = E // world
    m = buf.expert_capacity
    # the oracle: the dropless layout's pair positions; a pair is kept iff its position in its
    # expert's group (source rank, then token, then slot order) is < m
    full = SimulatedWorld(world, E, H, T, top_k=k)
    out = full.dispatch_tokens(xs, idx, ws)
    pr = _pair_rows_ref(idx, [o.group_end_offsets for o in out], E, world)
    kept = []
    for s in range(world):
        kk = torch.zeros_like(idx[s], dtype=torch.bool)
        for t in range(idx[s].shape[0]):
            for j in range(k):
                e = int(idx[s][t, j])
                if e >= 0:
                    d, le = divmod(e, L)
                    start = 0 if le == 0 else int(out[d].group_end_offsets[le - 1])
                    kk[t, j] = int(pr[s][t, j]) - start < m
        kept.append(kk)
    dropped = int(((idx[rank] >= 0) & ~kept[rank]).sum())
    # the combine of a capped layout: only kept pairs contribute (expert_out = 1 on every row)
    eo = torch.ones(buf.capacity, H).bfloat16()
    w = ws[rank].clone().requires_grad_(True)
    y = buf.combine_tokens(eo, res.handle, w)
    expected = torch.where(kept[rank], ws[rank], 0.0).sum(1)
    y.float().sum().backward()
    # the symmetric-memory kernels with the same cap: the same bits
    capped = SimulatedWorld(world, E, H, T, top_k=k, expert_capacity=m)
    cout = capped.dispatch_tokens(xs, idx, ws)
    st = cout[rank].handle.state
    cy = capped.combine_tokens([eo] * world, [o.handle for o in cout])[rank]
    end = int(res.group_end_offsets[-1])
    same = (capped.capacity == buf.capacity and torch.equal(cout[rank].group_end_offsets, res.group_end_offsets)
            and torch.equal(cout[rank].tokens.qdata.view(torch.uint8)[:end], res.tokens.qdata.view(torch.uint8)[:end])
            and int(((st.pair_owner >= 0) & (st.pair_rows < 0)).sum()) == dropped and torch.equal(cy, y.detach()))
    return (same and int(res.num_dropped) == dropped and buf.capacity < full.capacity
            and torch.allclose(y[:, 0].float(), expected, rtol=1e-2, atol=1e-2)
            and torch.equal(w.grad == 0, ~kept[rank] | (idx[rank] < 0)))


for _w in (1, 2):
    worlds.register(_w, "ep/tokens-capacity", _capacity_body, 0.5)


@pytest.mark.parametrize("world", [1, 2])
def test_capacity_factor_drops_deterministically(world):
    """capacity_factor caps every expert's rows at ceil(f * W * T * k / E); the pairs past it in
    the group's order are dropped: counted in num_dropped, zero in the combine, zero gradient."""
    assert all(worlds.results(world, "ep/tokens-capacity"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["route_tokens", "torch"])
@pytest.mark.parametrize("t,k,E,W", [(1, 1, 2, 2), (13, 3, 12, 4), (64, 8, 256, 8), (37, 2, 6, 3), (0, 4, 8, 2),
                                     (300, 8, 64, 4), (301, 6, 24, 8), (1000, 3, 12, 3), (2500, 1, 16, 2),
                                     (77, 4, 512, 1), (129, 8, 96, 16)])
def test_route_tokens_against_a_loop(t, k, E, W, impl, device):
    """``route_tokens`` (the Triton kernels where Triton runs: several programs from 300 tokens
    of top-8 on) and its torch fallback against a plain Python walk over the tokens: counts,
    tokens per rank, the slot of each (token, rank), pair owners and each pair's index in the
    stable expert sort; ``-1`` and out-of-range ids are no expert."""
    from mxep.ep import routing as tokens
    route_tokens = tokens.route_tokens if impl == "route_tokens" else tokens._route_torch
    g = torch.Generator().manual_seed(t * 31 + k)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k, dtype=torch.int64)
    if t:
        idx[torch.rand(t, k, generator=g) < 0.2] = -1
        idx[0, 0] = E + 3                                    # out of range: no expert
        if t > 1:
            idx[1, -1] = -(2 ** 40)                          # far out of range (int64)
    if t % 2:
        idx = idx.to(torch.int32) if t < 2500 else idx       # both index dtypes
        if t > 1:
            idx[1, -1] = -7
    route = route_tokens(idx.to(device), E, W)
    assert route.slot.device.type == device
    L = E // W
    ids = idx.tolist()
    counts, sent, slot = [0] * E, [0] * W, [[-1] * W for _ in range(t)]
    owner = [[(e // L if 0 <= e < E else -1) for e in row] for row in ids]
    for i, row in enumerate(ids):
        for e in row:
            if 0 <= e < E:
                counts[e] += 1
        for d in sorted({o for o in owner[i] if o >= 0}):
            slot[i][d] = sent[d]
            sent[d] += 1
    pairs = sorted((e, i * k + j) for i, row in enumerate(ids) for j, e in enumerate(row) if 0 <= e < E)
    pair_index = [[-1] * k for _ in range(t)]
    for n, (_, f) in enumerate(pairs):
        pair_index[f // k][f % k] = n
    assert route.counts.tolist() == counts
    assert route.tokens_per_rank.tolist() == sent
    assert route.slot.tolist() == slot and route.slot.is_contiguous() and route.slot.dtype == torch.int32
    assert route.pair_owner.tolist() == owner
    assert route.pair_index.tolist() == pair_index
    assert route.expert.tolist() == [[(e if 0 <= e < E else E) for e in row] for row in ids]


def _pair_tables_reference(route, w, row_base, group_end, recv, rank, align, cap, slots):
    """The per-pair tables in torch ops: row = row_base[rank, expert] + index in the expansion;
    -1 for no expert and for a pair past its expert's first ``cap`` rows."""
    from mxep._utils import padded_group_rows
    E = row_base.shape[1]
    g = route.expert.clamp(0, E - 1)
    rows = row_base[rank].long()[g] + route.pair_index.long()
    keep = route.pair_index >= 0
    if cap < 2**31 - 1:
        start = group_end.long() - padded_group_rows(recv.long(), align)
        keep = keep & (rows - start[g] < cap)
    pair_rows = torch.where(keep, rows, -1).to(torch.int32)
    k = route.expert.shape[1]
    return (pair_rows, w.float(), torch.full((slots, k), -1, dtype=torch.int32),
            torch.zeros(slots, k), ((route.pair_owner >= 0) & (pair_rows < 0)).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("t,k,E,W,T,align,cap", [(13, 3, 12, 4, 20, 32, None), (0, 4, 8, 2, 5, 16, None),
                                                 (301, 6, 24, 8, 301, 32, 40), (77, 2, 6, 3, 90, 48, 1),
                                                 (1, 1, 2, 2, 1, 32, 0), (600, 8, 64, 4, 700, 32, 30)])
def test_pair_tables_against_torch(t, k, E, W, T, align, cap, device):
    """``pair_tables`` (one launch) equals the torch ops it replaced, bit for bit: rows from a
    random plan, ``-1`` slots, capacity drops (none, tight, zero), odd sizes, bf16 weights."""
    import types

    from mxep.ep.routing import route_tokens
    from mxep.ep.transport.symm_mem.tokens import pair_tables
    g = torch.Generator().manual_seed(t * 7 + k)
    idx = _routing(g, t, E, k, W, "holes").to(torch.int32).to(device)
    w = torch.rand(t, k, generator=g).bfloat16().to(device)
    # a plan whose groups start near this rank's rows (row_base = group start + a few rows, as
    # when earlier sources sent a few), so that the capacity test meets its boundary
    from mxep._utils import padded_group_rows
    rank = W - 1
    recv = torch.randint(0, 400, (E,), generator=g, dtype=torch.int32)
    group_end = padded_group_rows(recv, align).cumsum(0).to(torch.int32)
    row_base = torch.randint(-50, 5000, (W, E), generator=g, dtype=torch.int32)
    row_base[rank] = group_end - padded_group_rows(recv, align) + torch.randint(-2, 4, (E,), generator=g,
                                                                                dtype=torch.int32)
    plan = types.SimpleNamespace(row_base=row_base.to(device), group_end=group_end.to(device), recv=recv.to(device))
    route = route_tokens(idx, E, W)
    cap_rows = 2**31 - 1 if cap is None else cap
    got = pair_tables(route.expert, route.pair_index, route.pair_owner, w, plan, rank, align, cap_rows, W * T)
    want = _pair_tables_reference(types.SimpleNamespace(**{n: getattr(route, n).cpu() for n in
                                                           ("expert", "pair_index", "pair_owner")}),
                                  w.cpu(), plan.row_base.cpu(), plan.group_end.cpu(), plan.recv.cpu(), rank, align,
                                  cap_rows, W * T)
    names = ("pair_rows", "pair_weights", "rows", "weights", "num_dropped")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        assert torch.equal(a.cpu(), b), name
    if cap is not None and t > 100:   # the capacity both keeps and drops pairs here
        assert 0 < int(want[4]) < int((route.pair_owner >= 0).sum()), int(want[4])
