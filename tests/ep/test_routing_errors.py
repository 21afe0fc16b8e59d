"""Nothing the caller passes vanishes silently, and a handle is used only while it is valid.

* ``topk_idx`` entries out of range (``== E``, negative other than ``-1``, ``2**40``) are routed
  as ``-1`` and counted on the device; entries repeating an earlier expert of their row are
  routed as given and counted: ``DispatchResult.routing_errors`` (this call) and
  ``Buffer.check()`` (since construction) say so, ``debug=True`` raises at the call; the data
  path is bit for bit the dispatch of the cleaned routing.
* A handle is valid until the next dispatch on its Buffer, on every transport and at both
  levels: a stale one is refused on the host; autograd's backward is not bound by it.

CPU: one gloo rank, the collective transport and the symmetric-memory code path over local
memory (Triton interpreter), plus a simulated world of three ranks; GPU (``make test-gpu``):
the same on one GPU (NCCL, real symmetric memory) and the simulated world on the GPU.
"""
import pytest
import torch

import mxep
from mxep.ep.transport.symm_mem import SymmMemTransport
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld
from support.dist import single_rank_group

E, H, T, K = 8, 64, 13, 3
HAS_CUDA = torch.cuda.is_available()
DEVICES = [pytest.param("cpu"),
           pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")])]


def _routing(seed: int, t: int, dtype=torch.int64, bad: bool = True, repeat: bool = True):
    """Distinct random experts per row, some ``-1``; with ``bad`` three out-of-range entries,
    with ``repeat`` one repeated entry. Returns ``(topk_idx, cleaned, n_bad, n_repeat)``:
    ``cleaned`` has the out-of-range entries as ``-1`` (what the dispatch must route)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]).to(torch.int64)
    idx[torch.rand(t, K, generator=g) < 0.2] = -1
    n_bad = n_rep = 0
    if bad:
        idx[0, 0] = E                      # an off-by-one router
        idx[1, 2] = -5
        idx[2, 1] = 2**40 if dtype == torch.int64 else 2**31 - 1
        n_bad = 3
    if repeat:
        idx[4] = torch.tensor([5, 2, 5])   # the second 5 repeats the first
        n_rep = 1
    cleaned = torch.where((idx >= 0) & (idx < E), idx, -1)
    return idx.to(dtype), cleaned.to(dtype), n_bad, n_rep


def _buffer(transport: str, device: str, debug: bool = False, group=None) -> mxep.Buffer:
    buf = mxep.Buffer(group, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=K, debug=debug,
                      transport="collective" if transport == "collective" else "auto", device=device)
    if transport == "symm_mem" and device == "cpu":   # the symmetric-memory code path over local memory
        buf.transport = SymmMemTransport.over_local_memory(buf.regions, buf.config, group=buf.group)
    assert buf.transport_name == transport
    return buf


def _step(buf, x, idx, w, eo):
    res = buf.dispatch_tokens(x, idx, w)
    y = buf.combine_tokens(eo, res.handle, w)
    return res, y


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transport", ["collective", "symm_mem"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_bad_and_repeated_expert_ids_are_counted(transport, device, dtype):
    if device == "cpu" and transport == "symm_mem" and dtype == torch.int32:
        pytest.skip("int32 ids run the same routing kernel: covered by the collective transport on CPU")
    with single_rank_group("nccl" if device == "cuda" else "gloo"):
        g = torch.Generator().manual_seed(7)
        x = torch.randn(T - 2, H, generator=g).bfloat16().to(device)
        w = torch.rand(T - 2, K, generator=g).to(device)
        idx, cleaned, n_bad, n_rep = _routing(3, T - 2, dtype)
        idx, cleaned = idx.to(device), cleaned.to(device)
        buf, ref_buf = _buffer(transport, device), _buffer(transport, device)
        eo = torch.randn(buf.capacity, H, generator=g).bfloat16().to(device)

        res, y = _step(buf, x, idx, w, eo)
        ref, y_ref = _step(ref_buf, x, cleaned, w, eo)
        assert res.routing_errors.device.type == device and res.routing_errors.dtype == torch.int32
        assert res.routing_errors.tolist() == [n_bad, n_rep]
        assert ref.routing_errors.tolist() == [0, n_rep]   # the cleaned routing keeps its repeat
        # the bad entries are routed as -1, nothing else changes: bit for bit the cleaned routing
        R = int(ref.group_end_offsets[-1])
        assert torch.equal(res.group_end_offsets, ref.group_end_offsets)
        assert torch.equal(res.tokens.qdata[:R].view(torch.uint8), ref.tokens.qdata[:R].view(torch.uint8))
        assert torch.equal(res.tokens.scale[:R].view(torch.uint8), ref.tokens.scale[:R].view(torch.uint8))
        assert torch.equal(y, y_ref)
        # the Buffer remembers (sticky, since construction) and check() names both counts
        with pytest.raises(RuntimeError, match=rf"{n_bad} topk_idx entries were neither .* {n_rep} topk_idx "
                                               "entries repeated"):
            buf.check()
        with pytest.raises(RuntimeError, match=rf"^(?!.*were neither).*{n_rep} topk_idx entries repeated"):
            ref_buf.check()
        # a second call adds to the Buffer's counts; its own counter is this call's
        res2, _ = _step(buf, x, idx, w, eo)
        assert res2.routing_errors.tolist() == [n_bad, n_rep]
        assert buf.transport.routing_errors.tolist() == [2 * n_bad, 2 * n_rep]


@pytest.mark.parametrize("transport", ["collective", "symm_mem"])
def test_debug_mode_raises_at_the_call(transport):
    with single_rank_group():
        x = torch.randn(T, H).bfloat16()
        w = torch.rand(T, K)
        idx, _, _, _ = _routing(5, T, bad=True, repeat=False)
        with pytest.raises(ValueError, match="expert ids in"):
            _buffer(transport, "cpu", debug=True).dispatch_tokens(x, idx, w)
        idx, _, _, n_rep = _routing(5, T, bad=False, repeat=True)
        with pytest.raises(RuntimeError, match=f"{n_rep} topk_idx entries repeated"):
            _buffer(transport, "cpu", debug=True).dispatch_tokens(x, idx, w)


@pytest.mark.parametrize("device", DEVICES)
def test_routing_errors_simulated_world(device):
    """Three ranks, one of which sends nothing: every rank counts its own entries."""
    W = 3
    world = SimulatedWorld(W, 6, H, T, device=device, top_k=K)
    g = torch.Generator().manual_seed(11)
    ts = [T, 0, T - 4]
    idx = [torch.randint(0, 6, (t, K), generator=g) for t in ts]
    for i in idx:   # distinct within rows
        for r in range(i.shape[0]):
            i[r] = torch.randperm(6, generator=g)[:K]
    idx[0][0, 1] = 6
    idx[0][3, 0] = -3
    idx[2][1] = torch.tensor([4, 1, 4])
    idx[2][2, 2] = 99
    xs = [torch.randn(t, H, generator=g).bfloat16().to(device) for t in ts]
    ws = [torch.rand(t, K, generator=g).to(device) for t in ts]
    world.dispatch_tokens(xs, [i.to(device) for i in idx], ws)
    assert [p.routing_errors.tolist() for p in world.peers] == [[2, 0], [0, 0], [1, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transport", ["collective", "symm_mem"])
def test_stale_handle_is_refused(transport, device):
    """Token level and row level: the handle of dispatch A after dispatch B raises; B's works;
    A's backward (autograd's own saved state) still runs and gives A's gradient."""
    with single_rank_group("nccl" if device == "cuda" else "gloo"):
        g = torch.Generator().manual_seed(2)
        buf = _buffer(transport, device)
        xa = torch.randn(T, H, generator=g).bfloat16().to(device).requires_grad_(True)
        xb = torch.randn(T - 3, H, generator=g).bfloat16().to(device)
        wa, wb = torch.rand(T, K, generator=g).to(device), torch.rand(T - 3, K, generator=g).to(device)
        ia, _, _, _ = _routing(1, T, bad=False, repeat=False)
        ib, _, _, _ = _routing(2, T - 3, bad=False, repeat=False)
        eo = torch.randn(buf.capacity, H, generator=g).bfloat16().to(device)
        # reference: A alone
        ref = buf.dispatch_tokens(xa, ia.to(device), wa)
        ref_loss = (ref.tokens.dequantize() * eo).float().sum()
        y_ref = buf.combine_tokens(eo, ref.handle, wa)
        ref_loss.backward()
        grad_ref, xa.grad = xa.grad.clone(), None

        a = buf.dispatch_tokens(xa, ia.to(device), wa)
        loss_a = (a.tokens.dequantize() * eo).float().sum()
        b = buf.dispatch_tokens(xb, ib.to(device), wb)
        with pytest.raises(RuntimeError, match="stale"):
            buf.combine_tokens(eo, a.handle, wa)
        assert buf.combine_tokens(eo, b.handle, wb).shape == (T - 3, H)
        buf.check()                             # clean routing: nothing recorded
        loss_a.backward()                       # autograd is not bound by the handle's lifetime
        assert torch.equal(xa.grad, grad_ref)
        a2 = buf.dispatch_tokens(xa.detach(), ia.to(device), wa)
        assert torch.equal(buf.combine_tokens(eo, a2.handle, wa), y_ref)

    with single_rank_group("nccl" if device == "cuda" else "gloo"):   # row level
        rows = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, device=device,
                           transport="collective" if transport == "collective" else "auto")
        if transport == "symm_mem" and device == "cpu":
            rows.transport = SymmMemTransport.over_local_memory(rows.regions, rows.config, group=rows.group)
        counts = torch.tensor([3, 0, 2, 1, 0, 4, 0, 1], device=device)
        x = torch.randn(11, H, generator=g).bfloat16().to(device)
        ra = rows.dispatch(x, counts)
        rb = rows.dispatch(x[:7], torch.tensor([1, 1, 1, 1, 1, 1, 1, 0], device=device))
        out = torch.randn(rows.capacity, H, generator=g).bfloat16().to(device)
        with pytest.raises(RuntimeError, match="stale"):
            rows.combine(out, ra.handle)
        assert rows.combine(out, rb.handle).shape == (7, H)
