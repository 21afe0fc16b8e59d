"""The capture path on the CPU (one-process gloo world, TRITON_INTERPRET=1): what runs without
CUDA graphs. mxep.moe.capture.CapturedStep's argument checks, its static-buffer step
(mode="eager") equal to the plain eager step over several calls with new inputs, new routing and
weight updates; and torch.compile(moe, mode="reduce-overhead"), which on a CPU is inductor
without CUDA graphs, equal to eager. The CUDA-graph replays themselves: tests/moe/test_capture_gpu.py."""
import pytest
import torch

import mxep
from mxep.moe.capture import CapturedStep
from mxep.testing import rel_err
from support.dist import single_rank_group

H, FF, E, K, T = 64, 32, 4, 2, 16


@pytest.fixture(scope="module")
def world():
    with single_rank_group():
        yield


def _layer(**kw):
    torch.manual_seed(0)
    return mxep.MoE(hidden=H, ffn_hidden=FF, num_experts=E, top_k=K, max_tokens_per_rank=T, **kw)


def _inputs(seed: int, n: int = T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, H, generator=g).bfloat16(), torch.randn(n, H, generator=g).bfloat16()


def test_captured_step_argument_checks(world):
    moe = _layer()
    with pytest.raises(TypeError, match="mxep.MoE"):
        CapturedStep(torch.nn.Linear(4, 4), 4)
    with pytest.raises(ValueError, match="mode"):
        CapturedStep(moe, 4, mode="cuda")
    with pytest.raises(ValueError, match="num_tokens"):
        CapturedStep(moe, 0, mode="eager")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        CapturedStep(moe, T + 1, mode="eager")
    with pytest.raises(TypeError, match="num_tokens"):
        CapturedStep(moe, 4.0, mode="eager")
    with pytest.raises(RuntimeError, match="CUDA"):
        CapturedStep(moe, 4)                       # mode="graph" on a CPU layer
    moe.buffer.debug = True
    with pytest.raises(ValueError, match="debug"):
        CapturedStep(moe, 4)
    moe.buffer.debug = False
    step = CapturedStep(moe, 4, mode="eager")
    x, dy = _inputs(0, 4)
    with pytest.raises(ValueError, match=r"\[4, 64\]"):
        step(x[:3], dy)
    with pytest.raises(ValueError, match="bf16"):
        step(x.float(), dy)
    with pytest.raises(ValueError, match="dy"):
        step(x, dy.float())


def test_captured_step_eager_mode_equals_eager(world):
    """Four calls with new tokens, routing moved by in-place router updates, and in-place
    expert-weight updates (the MX weight cache rebuilds): y, x.grad and every parameter's
    gradient bit for bit the plain eager step of a twin layer (gradients are this step's, not
    accumulated); a parameter replaced by a new tensor is refused."""
    moe, twin = _layer(), _layer()
    step = CapturedStep(moe, T, mode="eager")
    for i in range(4):
        x, dy = _inputs(i)
        y, x_grad = step(x, dy)
        xt = x.clone().requires_grad_(True)
        for p in twin.parameters():
            p.grad = None
        yt = twin(xt)
        yt.backward(dy)
        assert torch.equal(y, yt) and torch.equal(x_grad, xt.grad), i
        for (name, p), pt in zip(moe.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, pt.grad), (i, name)
        with torch.no_grad():
            for m in (moe, twin):   # new routing and new weights for the next call
                m.router.add_(torch.randn(E, H, generator=torch.Generator().manual_seed(i)) * 0.5)
                m.w13.mul_(1.01)
        moe.zero_grad(set_to_none=True)   # (the next call's gradients are its own either way)
    moe.w2.data = moe.w2.data.clone()
    with pytest.raises(RuntimeError, match="capture again"):
        step(*_inputs(9))


def test_compile_reduce_overhead_equals_eager(world):
    """torch.compile(moe, mode="reduce-overhead", fullgraph=True) (on a CPU: inductor, no CUDA
    graphs; the Buffer's calls stay registered ops) over three calls with new inputs: the output
    and the expert weights' gradients equal eager bit for bit; the router's and the input's,
    which inductor computes with fused kernels of its own, to a relative 1e-2."""
    moe = _layer()
    compiled = torch.compile(moe, mode="reduce-overhead", fullgraph=True)
    for i in range(3):
        x, dy = _inputs(20 + i)
        got = []
        for fn in (moe, compiled):
            moe.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            y = fn(xi)
            y.backward(dy)
            got.append([y.detach(), moe.w13.grad, moe.w2.grad, xi.grad, moe.router.grad])
        (y, g13, g2, gx, gr), (cy, cg13, cg2, cgx, cgr) = got
        assert torch.equal(y, cy) and torch.equal(g13, cg13) and torch.equal(g2, cg2), i
        assert rel_err(cgx, gx) < 1e-2 and rel_err(cgr, gr) < 1e-2, i
