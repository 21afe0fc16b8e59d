"""The NVSHMEM transport (``Buffer(top_k=k, transport="nvshmem")``).

* its simulated world (every kernel around the exchange, several ranks in one process) through
  every check of the token-level path (tests/ep/test_token_dispatch.py: the layout oracle bit for
  bit, float64 combines and gradients), and bit for bit against the symmetric-memory kernels'
  world, with blocked scales and with a capacity factor;
* gloo ranks (2, 3, 4) through the public Buffer and autograd with the exchange's stand-in:
  the same bits as the symmetric-memory kernels, forward and backward;
* one rank: the registered ops and ``torch.compile(fullgraph=True)``; the row level refused;
* transport selection (``"auto"``), including a group faked as spanning two nodes;
* GPU: the kernels compiled for sm_90 on the simulated world; one GPU: no host sync and a CUDA
  graph of the whole step (the one-rank exchange); 2 and 4 GPUs: the real NVSHMEM exchange
  against the symmetric-memory kernels (``multigpu``).
"""
from __future__ import annotations

import os

import pytest
import torch

from mxep.ep.config import EPConfig
from mxep.ep.transport.nvshmem.simulated import SimulatedNvshmemWorld
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld
from support import worlds
from test_token_dispatch import (CASES, DEVICES, POISON, _check_simulated, _inputs, _one_rank_token_step,
                                 _token_forward, buffer_vs_kernels)

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
MULTI = [w for w in (2, 4) if w <= NGPU]


def nvshmem_world(W, E, H, T, k, align, device):
    return SimulatedNvshmemWorld(W, E, H, T, k, align, config=POISON, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"W{c[0]}-E{c[1]}-k{c[4]}-{c[5]}")
def test_simulated_nvshmem_against_the_oracle(case, device):
    _check_simulated(case, device, 32, make_world=nvshmem_world)


def _same_as_symm_mem(case, device, align=32, scale_layout="row_major", expert_capacity=None):
    """Dispatch, combine and both backward passes: the NVSHMEM world's bits are the
    symmetric-memory world's (layout rows, scales, drops, partial sums)."""
    W, E, H, T, k, kind, empty = case
    xs, idx, ws = _inputs(100 + W + k, W, E, H, T, k, kind, empty)
    on = lambda ts: [t.to(device) for t in ts]   # noqa: E731
    a = SimulatedWorld(W, E, H, T, align, top_k=k, config=POISON, device=device, expert_capacity=expert_capacity,
                       scale_layout=scale_layout)
    b = SimulatedNvshmemWorld(W, E, H, T, k, align, config=POISON, device=device, expert_capacity=expert_capacity,
                              scale_layout=scale_layout)
    assert a.capacity == b.capacity
    oa, ob = a.dispatch_tokens(on(xs), on(idx), on(ws)), b.dispatch_tokens(on(xs), on(idx), on(ws))
    ends = []
    for r in range(W):
        end = int(oa[r].group_end_offsets[-1])   # debug-only (test)
        ends.append(end)
        assert torch.equal(oa[r].group_end_offsets, ob[r].group_end_offsets)
        assert torch.equal(oa[r].tokens_per_expert, ob[r].tokens_per_expert)
        assert torch.equal(oa[r].tokens.qdata.view(torch.uint8)[:end], ob[r].tokens.qdata.view(torch.uint8)[:end])
        assert torch.equal(oa[r].tokens.scale.view(torch.uint8)[:end], ob[r].tokens.scale.view(torch.uint8)[:end])
        assert torch.equal(oa[r].handle.state.pair_rows, ob[r].handle.state.pair_rows)
    g = torch.Generator().manual_seed(5)
    eos = on([torch.randn(a.capacity, H, generator=g).bfloat16() for _ in range(W)])
    dys = on([torch.randn(x.shape[0], H, generator=g).bfloat16() for x in xs])
    ha, hb = [o.handle for o in oa], [o.handle for o in ob]
    for u, v in zip(a.combine_tokens(eos, ha), b.combine_tokens(eos, hb)):
        assert torch.equal(u, v)
    for r, ((ga, wa), (gb, wb)) in enumerate(zip(a.combine_tokens_backward(dys, eos, ha),
                                                 b.combine_tokens_backward(dys, eos, hb))):
        assert torch.equal(ga[:ends[r]], gb[:ends[r]])
        assert torch.equal(wa, wb)
    for u, v in zip(a.dispatch_tokens_backward(eos, ha), b.dispatch_tokens_backward(eos, hb)):
        assert torch.equal(u, v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,align,layout,cap", [
    ((3, 6, 128, 7, 2, "skewed", 1), 128, "blocked", None),
    ((2, 8, 64, 11, 3, "skewed", None), 32, "row_major", 5),
    ((4, 8, 96, 6, 4, "holes", 2), 32, "row_major", 3),
], ids=["blocked", "capacity-W2", "capacity-W4-empty-rank"])
def test_simulated_nvshmem_matches_symm_mem(case, align, layout, cap, device):
    _same_as_symm_mem(case, device, align, layout, cap)


# ------------------------------------------------------------------ gloo ranks, public Buffer
def _buffer_body(rank, world, cases):
    return [buffer_vs_kernels(rank, world, case, "nvshmem") for case in cases]


def _gloo_cases(world):
    if world == 3:   # a rank that sends nothing; tokens whose experts all live on one rank
        return [(6, 96, 7, 2, "one_rank", 2, 24, None)]
    cases = [(4 * world, 64, 9, 3, "holes", None, 21, None)]
    if world == 2:
        cases.append((8, 32, 6, 2, "skewed", 1, 22, None))        # rank 1 sends nothing
        cases.append((8, 32, 12, 2, "skewed", None, 23, 0.25))    # capacity drops (2 rows per expert)
    return cases


for _w in (2, 3, 4):
    worlds.register(_w, "ep/nvshmem", _buffer_body, _gloo_cases(_w))


@pytest.mark.parametrize("world", [2, 3, 4])
def test_nvshmem_buffer_on_gloo_matches_symm_mem_kernels(world):
    res = worlds.results(world, "ep/nvshmem")
    assert all(ok for per_rank in res for ok, _ in per_rank), res
    for c, case in enumerate(_gloo_cases(world)):
        if case[-1] is not None:   # a capacity factor: the case must drop pairs somewhere
            assert sum(per_rank[c][1] for per_rank in res) > 0, res


# ------------------------------------------------------------------ one rank: ops, compile, errors
def test_one_rank_ops_compile_and_row_level_refused():
    import torch.distributed as dist

    import mxep
    from support.dist import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        E, H, T, k = 8, 64, 11, 3
        xs, idx, ws = _inputs(3, 1, E, H, T, k, "holes")
        coll = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, transport="collective")
        nv = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, transport="nvshmem")
        assert "local copy" in repr(nv) and nv.symm_bytes > 0
        g = torch.Generator().manual_seed(4)
        eo = torch.randn(coll.capacity, H, generator=g).bfloat16()
        dy = torch.randn(xs[0].shape[0], H, generator=g).bfloat16()
        a = _one_rank_token_step(coll, xs[0], idx[0], ws[0], eo, dy)
        b = _one_rank_token_step(nv, xs[0], idx[0], ws[0], eo, dy)
        for u, v in zip(a, b):
            assert torch.equal(u, v) if u.dtype != torch.float32 else torch.allclose(u, v, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(_token_forward, fullgraph=True, backend="aot_eager")
        c = _one_rank_token_step(nv, xs[0], idx[0], ws[0], eo, dy, forward=compiled)
        for u, v in zip(b, c):
            assert torch.equal(u, v)
        # routing input never vanishes: an out-of-range id and a repeated one are counted
        bad = idx[0].clone()
        bad[0, 0] = E + 3
        bad[1] = torch.tensor([2, 2, -1])
        res = nv.dispatch_tokens(xs[0], bad, ws[0])
        assert res.routing_errors.tolist() == [1, 1]
        with pytest.raises(RuntimeError, match="neither -1 nor an expert id"):
            nv.check()
        with pytest.raises(ValueError, match="token-level API only"):
            mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, transport="nvshmem")
        with pytest.raises(ValueError, match="transport must be"):
            mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, transport="nvshmm")
        with pytest.raises(RuntimeError, match="token-level API"):
            nv.transport.plan(torch.zeros(E, dtype=torch.int32), 0, 32)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ selection
def test_select_transport_rules():
    from mxep.ep.buffer import select_transport

    assert select_transport("auto", "nccl", "cuda", 1, True)[0] == "symm_mem"
    assert select_transport("auto", "nccl", "cuda", 2, True)[0] == "nvshmem"
    name, why = select_transport("auto", "nccl", "cuda", 4, False)
    assert name == "collective" and "not available" in why and "4 nodes" in why
    assert select_transport("auto", "gloo", "cpu", 2, True)[0] == "collective"
    assert select_transport("nvshmem", "gloo", "cpu", None, False) == ("nvshmem", "requested")
    with pytest.raises(ValueError, match="transport must be"):
        select_transport("nccl", "nccl", "cuda", 1, True)


def _nodes_body(rank, world):
    import mxep
    import mxep.ep.buffer as buffer_mod

    real = buffer_mod._hostname
    buffer_mod._hostname = lambda: f"node{rank % 2}"    # ranks 0, 2 on one host, 1, 3 on another
    try:
        nodes = buffer_mod.group_nodes(torch.distributed.group.WORLD)
        buf = mxep.Buffer(None, num_experts=8, hidden=32, max_tokens_per_rank=4, top_k=2)
    finally:
        buffer_mod._hostname = real
    return nodes, buf.transport_name, repr(buf)


worlds.register(2, "ep/nvshmem-nodes", _nodes_body)


def test_auto_on_a_group_faked_as_two_nodes():
    """Node counting through the group (host names faked per rank); on gloo ranks ``auto`` keeps
    the collective transport and says why (the CUDA rules are test_select_transport_rules')."""
    for nodes, name, text in worlds.results(2, "ep/nvshmem-nodes"):
        assert nodes == 2 and name == "collective" and "gloo group of cpu tensors" in text, text


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case,align,layout,cap", [
    ((4, 16, 256, 40, 8, "skewed", 1), 32, "row_major", None),
    ((4, 32, 512, 64, 4, "holes", None), 128, "blocked", None),
    ((2, 8, 7168, 33, 8, "uniform", None), 32, "row_major", 40),
], ids=["skewed", "blocked", "H7168-capacity"])
def test_gpu_simulated_nvshmem_kernels(case, align, layout, cap):
    """The pack / unpack / reduce / expand kernels compiled for this GPU: the symmetric-memory
    kernels' bits."""
    _same_as_symm_mem(case, "cuda", align, layout, cap)


@pytest.mark.gpu
@pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU")
def test_gpu_one_rank_no_host_sync_and_graph_capture():
    """One GPU, one-rank NCCL group (the local exchange): the whole token-level step through the
    Buffer and autograd runs with sync-debug "error", and a CUDA graph of it replays with new
    tokens and routing to the eager result."""
    from support.dist import run_distributed

    assert all(run_distributed(_one_gpu_body, 1, backend="nccl", timeout=600))


def _one_gpu_body(rank, world):
    import mxep

    E, H, T, k = 16, 256, 48, 4
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, transport="nvshmem",
                      config=EPConfig(poison_outputs=False))
    dev = buf.device
    x = torch.zeros(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.zeros(T, k, device=dev, dtype=torch.int64)
    w = torch.zeros(T, k, device=dev, requires_grad=True)
    eo = torch.zeros(buf.capacity, H, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def load(seed):
        xs, ids, ws = _inputs(seed, 1, E, H, T, k, "holes")
        n = xs[0].shape[0]
        with torch.no_grad():
            x.zero_()[:n].copy_(xs[0])
            idx.fill_(-1)[:n].copy_(ids[0])
            w.zero_()[:n].copy_(ws[0])
            eo.copy_(torch.randn(buf.capacity, H, generator=torch.Generator().manual_seed(seed)).bfloat16())

    def step():
        for t in (x, w, eo):
            t.grad = None
        res = buf.dispatch_tokens(x, idx, w)
        y = buf.combine_tokens(eo, res.handle, w)
        ((y.float() ** 2).sum() + (res.tokens.dequantize().float() * eo.detach().float()).sum()).backward()
        return [y.detach(), x.grad, w.grad, res.group_end_offsets]

    load(1)
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    from mxep.testing.timing import capture_graph

    outs = []
    graph = capture_graph(lambda: outs.append(step()))
    load(2)
    graph.replay()
    torch.cuda.synchronize()
    got = [c.clone() for c in outs[-1]]   # the captured call's outputs: the graph's own tensors
    eager = step()
    return all(torch.equal(a, b) for a, b in zip(got, eager))


def _multi_gpu_body(rank, world, cases):
    """The real NVSHMEM exchange through the Buffer against the symmetric-memory kernels (the
    simulated world on this GPU; no symmetric allocation of the CUDA backend in this process)."""
    import mxep

    dev = torch.device("cuda", torch.cuda.current_device())
    ok = []
    for (E, H, T, k, kind, empty, seed, cf) in cases:
        xs, idx, ws = _inputs(seed, world, E, H, T, k, kind, empty)
        buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, transport="nvshmem",
                          capacity_factor=cf, config=EPConfig(poison_outputs=True, wait_polls=1 << 25))
        assert "NVSHMEM all_to_all_vdev" in repr(buf), repr(buf)
        g = torch.Generator().manual_seed(seed + 1)
        eos = [torch.randn(buf.capacity, H, generator=g).bfloat16().to(dev) for _ in range(world)]
        dys = [torch.randn(x.shape[0], H, generator=g).bfloat16().to(dev) for x in xs]
        xs, idx, ws = [t.to(dev) for t in xs], [t.to(dev) for t in idx], [t.to(dev) for t in ws]
        x = xs[rank].clone().requires_grad_(True)
        w = ws[rank].clone().requires_grad_(True)
        eo = eos[rank].clone().requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error")
        try:
            res = buf.dispatch_tokens(x, idx[rank], w)
            y = buf.combine_tokens(eo, res.handle, w)
            (y.float() * dys[rank].float()).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sw = SimulatedWorld(world, E, H, T, top_k=k, expert_capacity=buf.expert_capacity, device=dev)
        out = sw.dispatch_tokens(xs, idx, ws)
        hs = [o.handle for o in out]
        ys, gr = sw.combine_tokens(eos, hs), sw.combine_tokens_backward(dys, eos, hs)
        end = int(res.group_end_offsets[-1])
        o = out[rank]
        ok.append(torch.equal(res.tokens.qdata.view(torch.uint8)[:end], o.tokens.qdata.view(torch.uint8)[:end])
                  and torch.equal(res.tokens.scale.view(torch.uint8)[:end], o.tokens.scale.view(torch.uint8)[:end])
                  and torch.equal(y, ys[rank]) and torch.equal(eo.grad[:end], gr[rank][0][:end])
                  and torch.equal(w.grad, gr[rank][1]))
    return ok


@pytest.mark.multigpu
@pytest.mark.parametrize("world", MULTI)
def test_nvshmem_buffer_on_gpus(world):
    from support.dist import run_distributed

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    cases = [(8 * world, 7168, 512, 8, "uniform", None, 31, None), (4 * world, 256, 96, 4, "skewed", None, 32, None),
             (4 * world, 256, 64, 2, "one_rank", 1, 33, None), (4 * world, 512, 64, 4, "holes", None, 34, 0.75)]
    res = run_distributed(_multi_gpu_body, world, cases, backend="nccl", timeout=900)
    assert all(all(r) for r in res), res
