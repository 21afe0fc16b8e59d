"""The router's top-k kernels (mxep.moe.router) against torch's expression: softmax over the
experts, top-k, gates renormalized over the chosen (the independent reference: the math
mxep.MoE used before the kernel, and the naive layers' routing)."""
import pytest
import torch

from mxep.moe.router import TopKGates, topk_gates, topk_gates_reference


def _torch_route(logits, k):
    probs = logits.softmax(dim=-1)
    gates, experts = probs.topk(k, dim=-1)
    return gates / gates.sum(dim=-1, keepdim=True), experts


@pytest.mark.parametrize("n,E,k", [(1, 2, 1), (37, 8, 2), (130, 32, 8), (5, 7, 7), (64, 160, 6), (0, 16, 4)])
def test_kernel_against_torch_expression(n, E, k):
    g = torch.Generator().manual_seed(n * 131 + E * 7 + k)
    logits = (torch.randn(n, E, generator=g) * 3).requires_grad_(True)
    # a skewed router: one expert far ahead for a third of the tokens
    with torch.no_grad():
        logits[: n // 3, E // 2] += 20
    gates, experts = TopKGates.apply(logits, k)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_gates, ref_experts = _torch_route(ref_logits, k)
    assert experts.dtype == torch.int64 and gates.dtype == torch.float32
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(gates, ref_gates, rtol=2e-6, atol=1e-7)
    dg = torch.randn(n, k, generator=g)
    (gates * dg).sum().backward()
    (ref_gates * dg).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
    # exactly zero off the chosen experts
    off = torch.ones(n, E, dtype=torch.bool).scatter_(1, experts, False)
    assert torch.all(logits.grad[off] == 0)


def test_ties_pick_the_lower_index_and_rows_are_exact():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.5, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    gates, experts = TopKGates.apply(logits, 2)
    assert experts.tolist() == [[1, 2], [0, 1]]
    assert gates.tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_nan_logit_is_chosen_and_shows_in_the_gates():
    logits = torch.randn(3, 6)
    logits[1, 4] = float("nan")
    gates, experts = TopKGates.apply(logits, 2)
    assert experts[1, 0] == 4                     # as torch.topk: NaN ranks first
    assert torch.isnan(gates[1]).all()            # nothing silently finite
    assert torch.isfinite(gates[[0, 2]]).all()
    _, ref_experts = topk_gates_reference(logits, 2)
    assert ref_experts[1, 0] == 4


def test_reference_path_matches_kernel():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(50, 12, generator=g)
    a = topk_gates(logits, 3)
    b = topk_gates_reference(logits, 3)
    assert torch.equal(a[1], b[1])
    torch.testing.assert_close(a[0], b[0], rtol=2e-6, atol=1e-7)


def test_bad_arguments():
    with pytest.raises(ValueError, match="fp32"):
        topk_gates(torch.randn(4, 8).bfloat16(), 2)
    with pytest.raises(ValueError, match="k must be"):
        topk_gates(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="k must be"):
        topk_gates(torch.randn(4, 8), 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("n,E,k", [(4096, 32, 8), (777, 256, 8), (33, 16, 1)])
def test_gpu_kernel_against_torch_expression(n, E, k):
    g = torch.Generator(device="cuda").manual_seed(n + E + k)
    logits = torch.randn(n, E, generator=g, device="cuda").requires_grad_(True)
    gates, experts = topk_gates(logits, k)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref_gates, ref_experts = _torch_route(ref_logits, k)
    assert torch.equal(experts, ref_experts)
    torch.testing.assert_close(gates, ref_gates, rtol=2e-6, atol=1e-7)
    dg = torch.randn(n, k, generator=g, device="cuda")
    (gates * dg).sum().backward()
    (ref_gates * dg).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-5, atol=1e-6)
