"""mxep.MoE on gloo ranks against the dense reference (mxep.moe.naive): output and the
gradients of the tokens, the local experts' weights and the router, by relative error (the
fused path rounds to bf16 at the same points; a value near an MXFP8 rounding boundary can land
one e4m3 step away, so these are tolerances, not bit equality). Also: skewed routing through
the router, a rank with fewer tokens, and bad input."""
import pytest
import torch

from support import worlds
from support.dist import run_distributed, single_rank_group

import mxep
from mxep.moe.naive import moe_reference
from mxep.testing import rel_err

H, FF, E, K = 64, 32, 6, 2


def params(world: int):
    g = torch.Generator().manual_seed(7)
    router = torch.randn(E, H, generator=g) / H ** 0.5
    router[1] += 0.5                                     # a popular expert: skewed counts
    w13 = (torch.randn(E, 2 * FF, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, FF, generator=g) / FF ** 0.5).bfloat16()
    xs = [torch.randn(12 - 5 * r, H, generator=g).bfloat16() for r in range(world)]
    dys = [torch.randn(x.shape, generator=g).bfloat16() for x in xs]
    return router, w13, w2, xs, dys


def _moe_body(rank, world, device="cpu", mx_weights=True, gemm_impl="auto", transport="auto"):
    router, w13, w2, xs, dys = params(world)
    L = E // world
    moe = mxep.MoE(H, FF, E, K, max_tokens_per_rank=12, mx_weights=mx_weights, device=device, gemm_impl=gemm_impl,
                   transport=transport)
    with torch.no_grad():
        moe.router.copy_(router)
        moe.w13.copy_(w13[rank * L:(rank + 1) * L])
        moe.w2.copy_(w2[rank * L:(rank + 1) * L])
    x = xs[rank].to(device).requires_grad_(True)
    y = moe(x)
    y.backward(dys[rank].to(device))
    return [t.cpu() for t in (y.detach(), x.grad, moe.w13.grad, moe.w2.grad, moe.router.grad)]


NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0


for _mx, _impl in [(True, "auto"), (False, "fused")]:   # the 2-rank gloo runs: the session's shared world
    worlds.register(2, f"moe/{_mx}-{_impl}", _moe_body, "cpu", _mx, _impl)


@pytest.mark.parametrize("world,backend,mx_weights,gemm_impl", [
    (1, "gloo", True, "auto"), (2, "gloo", True, "auto"), (2, "gloo", False, "fused"),
    pytest.param(2, "nccl", True, "auto", marks=[pytest.mark.multigpu, pytest.mark.skipif(NGPU < 2, reason="needs 2 GPUs")])])
def test_moe_matches_dense_reference(world, backend, mx_weights, gemm_impl):
    """(nccl: the symmetric-memory Buffer and the GPU grouped GEMM, in make test-gpu)"""
    if backend == "gloo" and world == 1:      # a world of one: in this process, no spawn
        with single_rank_group():
            got = [_moe_body(0, 1, "cpu", mx_weights, gemm_impl)]
    elif backend == "gloo":
        got = worlds.results(2, f"moe/{mx_weights}-{gemm_impl}")
    else:
        got = run_distributed(_moe_body, world, "cuda", mx_weights, gemm_impl, backend=backend)
    router, w13, w2, xs, dys = params(world)
    L = E // world
    gw13, gw2 = torch.zeros(E, 2 * FF, H), torch.zeros(E, H, FF)
    for s in range(world):
        x = xs[s].clone().requires_grad_(True)
        r = router.clone().requires_grad_(True)
        a, b = w13.clone().requires_grad_(True), w2.clone().requires_grad_(True)
        y = moe_reference(x, r, a, b, K, mx_weights=mx_weights)
        y.backward(dys[s])
        gw13 += a.grad.float()
        gw2 += b.grad.float()
        assert rel_err(got[s][0], y) < 5e-3
        assert rel_err(got[s][1], x.grad) < 2e-2
        assert rel_err(got[s][4], r.grad) < 2e-2
    for d in range(world):
        assert rel_err(got[d][2], gw13[d * L:(d + 1) * L]) < 2e-2
        assert rel_err(got[d][3], gw2[d * L:(d + 1) * L]) < 2e-2


def _transports_body(rank, world):
    """The same layer on the collective and the NVSHMEM transports (gloo: its exchange's stand-in):
    the output and the expert weights' gradients bit for bit; the gate-weight gradients (the
    collective transport's dot products are torch reductions, the NVSHMEM transport's are the
    kernels') and so the input and router gradients to fp32 rounding."""
    out = []
    for transport in ("collective", "nvshmem"):
        torch.manual_seed(0)
        got = _moe_body(rank, world, transport=transport)
        out.append(got)
    (y, gx, g13, g2, gr), (y2, gx2, g13b, g2b, gr2) = out
    return (torch.equal(y, y2) and torch.equal(g13, g13b) and torch.equal(g2, g2b)
            and rel_err(gx2, gx) < 1e-3 and rel_err(gr2, gr) < 1e-4)


worlds.register(2, "moe/transports", _transports_body)


def test_moe_nvshmem_transport_matches_collective():
    assert all(worlds.results(2, "moe/transports"))


def _bad_input_body(rank, world):
    moe = mxep.MoE(H, FF, E, K, max_tokens_per_rank=4)
    errors = []
    for bad in (torch.zeros(5, H, dtype=torch.bfloat16), torch.zeros(3, H + 32, dtype=torch.bfloat16)):
        try:
            moe(bad)
        except ValueError as exc:
            errors.append(str(exc))
    for kw in (dict(ffn_hidden=40), dict(top_k=0), dict(gemm_impl="cublas")):
        try:
            mxep.MoE(**{**dict(hidden=H, ffn_hidden=FF, num_experts=E, top_k=K, max_tokens_per_rank=4), **kw})
        except ValueError as exc:
            errors.append(str(exc))
    return errors


def test_moe_bad_input():
    with single_rank_group():
        errors = _bad_input_body(0, 1)
    assert len(errors) == 5
    assert "max_tokens_per_rank" in errors[0] and "[n, 64]" in errors[1]
    assert "multiple of 32" in errors[2] and "top_k" in errors[3] and "gemm_impl" in errors[4]


def _moe_sync_free_body(rank, world):
    moe = mxep.MoE(H, FF, E, K, max_tokens_per_rank=12, device="cuda")
    x = torch.randn(12 - 5 * rank, H, device="cuda").bfloat16().requires_grad_(True)
    for mode in ("warn", "error"):    # warm-up (allocator, Triton compile) outside "error"
        torch.cuda.set_sync_debug_mode(mode)
        try:
            moe(x).float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return bool(torch.isfinite(x.grad).all())


@pytest.mark.multigpu
@pytest.mark.skipif(NGPU < 2, reason="needs 2 GPUs")
def test_moe_forward_backward_without_host_sync():
    """The whole layer, forward and backward, under torch.cuda.set_sync_debug_mode("error")."""
    assert all(run_distributed(_moe_sync_free_body, 2, backend="nccl", timeout=300))


@pytest.mark.parametrize("mx_weights,gemm_impl", [(True, "auto"), (False, "auto"), (True, "fused")])
def test_moe_compile_fullgraph_equals_eager(mx_weights, gemm_impl):
    """torch.compile(moe, fullgraph=True) of the layer's forward (the registered dispatch /
    combine ops stay opaque nodes; aot_eager on CPU traces forward and backward) gives the eager
    output and gradients."""
    import torch.distributed as dist

    import mxep
    from support.dist import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        moe = mxep.MoE(hidden=64, ffn_hidden=32, num_experts=4, top_k=2, max_tokens_per_rank=16,
                       mx_weights=mx_weights, gemm_impl=gemm_impl)
        x = torch.randn(13, 64).bfloat16()
        results = []
        for fn in (moe, torch.compile(moe, fullgraph=True, backend="aot_eager")):
            moe.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            (y.float() ** 2).sum().backward()
            results.append([y, xi.grad, moe.router.grad, moe.w13.grad, moe.w2.grad])
        for a, b in zip(*results):
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3), (a - b).abs().max()
    finally:
        dist.destroy_process_group()
