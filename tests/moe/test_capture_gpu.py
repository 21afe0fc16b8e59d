"""The capture path on one GPU (world 1, NCCL: the symmetric-memory transport), in the GPU suite
(``make test-gpu``): mxep.moe.capture.CapturedStep's CUDA-graph replays, and
torch.compile(moe, mode="reduce-overhead") (inductor's CUDA graphs), each over several calls with
new tokens, new routing (in-place router updates) and in-place expert-weight updates, against
the eager layer. CapturedStep replays the eager step's own kernels: bit for bit, and without a
host sync (torch.cuda.set_sync_debug_mode("error")). The compiled layer runs the same mxep ops but
inductor's own kernels for the router (softmax, top-k, their backward), whose last bits may differ:
every result to a relative 1e-2, and no CUDA-graph skip."""
import pytest
import torch

import mxep
from mxep.moe.capture import CapturedStep
from mxep.testing import rel_err
from support.dist import single_rank_group

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, FF, E, K, T = 256, 128, 8, 2, 96
STEPS = 4


def _layers(n: int = 2):
    """``n`` layers with the same weights (each its own Buffer: a twin for the eager reference)."""
    out = []
    for _ in range(n):
        torch.manual_seed(0)
        out.append(mxep.MoE(hidden=H, ffn_hidden=FF, num_experts=E, top_k=K, max_tokens_per_rank=T, device="cuda"))
    assert out[0].buffer.transport_name == "symm_mem"
    return out


def _inputs(seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(T, H, generator=g, device="cuda").bfloat16(),
            torch.randn(T, H, generator=g, device="cuda").bfloat16())


def _eager(moe, x, dy):
    for p in moe.parameters():
        p.grad = None
    xi = x.clone().requires_grad_(True)
    y = moe(xi)
    y.backward(dy)
    return [y.detach(), xi.grad] + [p.grad for p in moe.parameters()]


def _update(*layers, i: int):
    """New routing (the router moved) and new expert weights (the MX weight cache rebuilds)."""
    g = torch.Generator(device="cuda").manual_seed(1000 + i)
    dr = torch.randn(E, H, generator=g, device="cuda") * 0.3
    with torch.no_grad():
        for m in layers:
            m.router.add_(dr)
            m.w13.mul_(1.01)
            m.w2.mul_(0.99)


def test_captured_step_replays_equal_eager():
    torch.cuda.set_device(0)
    with single_rank_group("nccl"):
        moe, twin = _layers()
        step = CapturedStep(moe, T)
        assert step.graph is not None
        for i in range(STEPS):
            x, dy = _inputs(i)
            torch.cuda.set_sync_debug_mode("error")   # a replay reads nothing back to the host
            try:
                y, x_grad = step(x, dy)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            got = [y.clone(), x_grad.clone()] + [p.grad.clone() for p in moe.parameters()]
            ref = _eager(twin, x, dy)
            names = ["y", "x.grad"] + [n for n, _ in moe.named_parameters()]
            for name, a, b in zip(names, got, ref):
                assert torch.equal(a, b), (i, name, (a.float() - b.float()).abs().max().item())
            _update(moe, twin, i=i)
            moe.zero_grad(set_to_none=True)   # the next replay gives the captured gradients back
        moe.buffer.check()
        torch.cuda.synchronize()


def test_compile_reduce_overhead_equals_eager():
    torch.cuda.set_device(0)
    from torch._dynamo.utils import counters

    with single_rank_group("nccl"):
        moe, twin = _layers()
        compiled = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
        counters.clear()
        for i in range(STEPS + 1):   # (the first calls record; later ones replay)
            x, dy = _inputs(10 + i)
            got = _eager(compiled, x, dy)
            got = [t.clone() for t in got]
            ref = _eager(twin, x, dy)
            for name, a, b in zip(["y", "x.grad"] + [n for n, _ in moe.named_parameters()], got, ref):
                assert rel_err(a, b) < 1e-2, (i, name, rel_err(a, b))
            _update(moe, twin, i=i)
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
        moe.buffer.check()
        torch.cuda.synchronize()


def test_one_node_step_equals_composed(monkeypatch):
    """The eager one-node step (mxep.moe.fused.TokenLayer: the router inside, the SwiGLU kernels
    writing GEMM 2's bf16 values forward and again in the backward) against the composed form
    (the router's autograd, then one autograd Function per Buffer call) on the GPU's kernels:
    bit for bit, over steps with new routing and weights."""
    from mxep.moe.layer import MoE

    torch.cuda.set_device(0)
    with single_rank_group("nccl"):
        fused, composed = _layers()
        one_node = MoE._one_node
        monkeypatch.setattr(MoE, "_one_node", lambda self, x, impl: self is not composed and one_node(self, x, impl))
        for i in range(STEPS):
            x, dy = _inputs(20 + i)
            got, ref = _eager(fused, x, dy), _eager(composed, x, dy)
            for name, a, b in zip(["y", "x.grad"] + [n for n, _ in fused.named_parameters()], got, ref):
                assert torch.equal(a, b), (i, name, (a.float() - b.float()).abs().max().item())
            _update(fused, composed, i=i)
        torch.cuda.synchronize()
