"""The grouped GEMM on the dispatch layout (mxep.grouped_mm_mxfp8) against the pure-torch
reference (mxep.gemm.naive), on layouts made by the dispatch oracle: skewed routing,
empty experts, a rank that receives nothing, pad rows, odd K and N, aligns 16 / 32 / 48. Forward
and both gradients by relative error (the math is exact up to fp32 summation order and the
final bf16 rounding); pad rows exactly zero; rows past the layout untouched. Then the whole
expert path through the public Buffer on gloo: dispatch -> grouped GEMM -> combine -> backward."""
import pytest
import torch

from support import worlds
from support.fused_cases import Case

import mxep
from mxep.ep.naive import simulate_dispatch_layout, simulate_dispatch_mxfp8
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.gemm.grouped_gemm import GPU_TILE_CANDIDATES, INTERPRETER_TILES, GemmTiles, grouped_mm_mxfp8_forward
from mxep.gemm.naive import grouped_mm_reference
from mxep.format.naive import dequantize_mxfp8_reference
from mxep.testing import rel_err

POISON = -12345.0


def layout_for(case: Case, rank: int, device="cpu"):
    counts, xs = case.inputs()
    got = simulate_dispatch_mxfp8(xs, counts, case.align, case.scale_mode)[rank]
    lay = simulate_dispatch_layout(counts, case.align)[rank]
    tokens = MXFP8Tensor(got.qdata.to(device), got.scale.to(device), torch.bfloat16)
    return tokens, got.group_end_offsets.to(device), lay.is_pad.to(device)


CASES = [
    Case(2, 6, 96, 40, 16, ("skewed", "one_expert"), (37, 40), seed=1),
    Case(3, 9, 160, 30, 32, ("empty_experts", "uniform", "skewed"), (29, 17, 23), seed=2),
    Case(2, 4, 64, 24, 48, ("uniform", "none"), (21, 0), seed=3),
]


# Interpreter tiles, and tiles taller than the layouts' align (16 / 32 / 48): groups end inside
# tiles (partial last tiles, masked rows), K not a multiple of BLOCK_K, N not of BLOCK_N.
CPU_TILES = [INTERPRETER_TILES, GemmTiles(32, 16, 64, 1, 1, 1, "int"), GemmTiles(64, 32, 32, 2, 1, 3, "int")]


WEIGHTS = [(40, False), (72, False), (40, True)]   # (N, MXFP8 weights)
ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# On CUDA: groups ending inside the GPU tiles, an empty expert, K and N off the tile sizes.
GPU_CASE = Case(2, 16, 1056, 300, 32, ("skewed", "empty_experts"), (300, 257), seed=11)
# The default (interpreter) tiles with every case and weight; each other tile with every case, the
# weights rotating, so that every pair of (tiles, case, weights) values occurs (the interpreter
# pays per tile: the full product costs twice as much for no other code path). On CUDA every
# tile configuration the sweep may pick (GPU_TILES is one of them), bf16 and MXFP8 weights.
def _forward_case(device, tiles, case, N, mx_weight):
    return pytest.param(device, tiles, case, N, mx_weight, marks=ON_GPU if device == "cuda" else (),
                        id=f"{device}-{'x'.join(map(str, tiles[:6]))}-{tiles.decode}-W{case.world}-K{case.hidden}"
                           f"-align{case.align}-N{N}{'-mx' if mx_weight else ''}")


FORWARD_GRID = ([_forward_case("cpu", CPU_TILES[0], c, *w) for c in CASES for w in WEIGHTS]
                + [_forward_case("cpu", t, c, *WEIGHTS[(i + j) % 3]) for i, t in enumerate(CPU_TILES) if i
                   for j, c in enumerate(CASES)]
                + [_forward_case("cuda", t, GPU_CASE, 200, mx) for t in GPU_TILE_CANDIDATES for mx in (False, True)])


@pytest.mark.parametrize("device,tiles,case,N,mx_weight", FORWARD_GRID)
def test_forward_matches_reference(device, case, N, mx_weight, tiles):
    """bf16 weights, or MXFP8 weights (blocks along K) dequantized in registers like the tokens;
    poisoned output, pad rows zero, rows past the layout never written."""
    for rank in range(case.world):
        tokens, offs, is_pad = layout_for(case, rank, device)
        cap, K = tokens.shape
        L = case.num_experts // case.world
        w = (torch.randn(L, N, K, generator=torch.Generator().manual_seed(rank + N)) / K ** 0.5).bfloat16().to(device)
        out = torch.full((cap, N), POISON, dtype=torch.bfloat16, device=device)
        if mx_weight:
            w = mxep.to_mxfp8(w)
            grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, w.qdata, offs, out=out,
                                     weight_scale=w.scale, tiles=tiles)
        else:
            grouped_mm_mxfp8_forward(tokens.qdata, tokens.scale, w, offs, out=out, tiles=tiles)
        ref = grouped_mm_reference(tokens.qdata, tokens.scale, w, offs)
        R = ref.shape[0]
        real = ~is_pad[:R]
        if real.any():
            assert rel_err(out[:R][real], ref[real]) < 4e-3
        assert (out[:R][is_pad[:R]] == 0).all()            # zero tokens, zero products
        assert (out[R:] == POISON).all()                    # past the layout: never written
        assert torch.equal(mxep.grouped_mm_mxfp8(tokens, w, offs)[:R][is_pad[:R]],
                           out[:R][is_pad[:R]])


# (device, case, N, impl, ranks): both forward implementations on the interpreter; on CUDA the
# GPU tiles (bf16 tensor-core dots) and torch._grouped_mm's backward at model sizes
GRADIENT_CASES = ([pytest.param("cpu", CASES[1], 56, impl, (0,), id=f"cpu-{impl}") for impl in ("dequant", "fused")]
                  + [pytest.param("cuda", Case(2, 16, K, 300, 32, ("skewed", "empty_experts"), (300, 257), seed=K + N),
                                  N, "auto", (0, 1), marks=ON_GPU, id=f"cuda-K{K}-N{N}")
                     for K, N in [(7168, 2048), (2048, 7168), (5120, 1536), (96, 40)]])


@pytest.mark.parametrize("device,case,N,impl,ranks", GRADIENT_CASES)
def test_gradients_match_torch_autograd(device, case, N, impl, ranks):
    """grad_weight and the straight-through grad of the tokens against autograd through the
    reference math (dequantize, per-group fp32 matmul), for both forward implementations."""
    for rank in ranks:
        _check_gradients(case, rank, N, impl, device)


def _check_gradients(case, rank, N, impl, device):
    tokens, offs, is_pad = layout_for(case, rank, device)
    cap, K = tokens.shape
    L = case.num_experts // case.world
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(L, N, K, generator=g) / K ** 0.5).bfloat16().to(device)
    dy = torch.randn(cap, N, generator=g).bfloat16().to(device)
    R = int(offs[-1])
    real = ~is_pad[:R]
    dy[R:] = float("nan")   # rows past the layout are never read

    t = tokens.detach().requires_grad_(True)
    w1 = w.clone().requires_grad_(True)
    y = mxep.grouped_mm_mxfp8(t, w1, offs, impl=impl)
    assert rel_err(y[:R][real], grouped_mm_reference(tokens.qdata, tokens.scale, w, offs)[real]) < 4e-3
    assert (y[:R][~real] == 0).all()                    # zero tokens, zero products
    y.backward(dy)

    x = dequantize_mxfp8_reference(tokens.qdata, tokens.scale, torch.float32).requires_grad_(True)
    w2 = w.float().requires_grad_(True)
    start, outs = 0, []
    for e, end in enumerate(offs.tolist()):
        outs.append(x[start:end] @ w2[e].t())
        start = end
    torch.cat(outs).backward(dy[:R].float())
    assert rel_err(w1.grad, w2.grad) < 1e-2
    assert rel_err(t.grad[:R], x.grad[:R]) < 1e-2

    # MXFP8 weights: the gradient reaches the MXFP8Tensor in bf16 (straight-through); the
    # tokens' gradient uses the dequantized weights
    wq = mxep.to_mxfp8(w).detach().requires_grad_(True)
    t2 = tokens.detach().requires_grad_(True)
    y2 = mxep.grouped_mm_mxfp8(t2, wq, offs, impl=impl)
    assert rel_err(y2[:R][real], grouped_mm_reference(tokens.qdata, tokens.scale, wq, offs)[real]) < 4e-3
    y2.backward(dy)
    assert wq.grad.dtype == torch.bfloat16 and rel_err(wq.grad, w2.grad) < 1e-2
    wd = dequantize_mxfp8_reference(wq.qdata, wq.scale, torch.float32)
    gx = torch.cat([dy[s:e].float() @ wd[i] for i, (s, e) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    assert rel_err(t2.grad[:R], gx) < 1e-2


def test_bad_inputs_raise():
    tokens, offs, _ = layout_for(CASES[0], 0)
    K = tokens.shape[1]
    L = 3
    w = torch.zeros(L, 8, K, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="MXFP8Tensor"):
        mxep.grouped_mm_mxfp8(tokens.dequantize(), w, offs)
    with pytest.raises(ValueError, match="impl"):
        mxep.grouped_mm_mxfp8(tokens, w, offs, impl="cublas")
    with pytest.raises(TypeError, match="bfloat16"):
        mxep.grouped_mm_mxfp8(tokens, w.float(), offs)
    with pytest.raises(ValueError, match="hidden size"):
        mxep.grouped_mm_mxfp8(tokens, torch.zeros(L, 8, K + 32, dtype=torch.bfloat16), offs)
    with pytest.raises(ValueError, match="int32"):
        mxep.grouped_mm_mxfp8(tokens, w, offs.long())
    with pytest.raises(ValueError, match=r"int32 \[2\]"):
        mxep.grouped_mm_mxfp8(tokens, w[:2], offs)


# ----------------------------------------------------------------------------- the expert path on gloo
def _weights(case: Case):
    L, H = case.num_experts // case.world, case.hidden
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(L, H, H, generator=g) / H ** 0.5).bfloat16() for _ in range(case.world)]


def _expert_path_body(rank, world, case):
    counts, xs = case.inputs()
    buf = mxep.Buffer(None, case.num_experts, case.hidden, case.max_tokens)
    x = xs[rank].clone().requires_grad_(True)
    w = _weights(case)[rank].clone().requires_grad_(True)
    res = buf.dispatch(x, counts[rank])
    y = buf.combine(mxep.grouped_mm_mxfp8(res.tokens, w, res.group_end_offsets), res.handle)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(rank)).bfloat16())
    return y.detach(), x.grad, w.grad


EXPERT_PATH_CASE = Case(2, 6, 96, 30, 32, ("skewed", "uniform"), (27, 19), seed=21)
worlds.register(EXPERT_PATH_CASE.world, "gemm/expert_path", _expert_path_body, EXPERT_PATH_CASE)


def test_expert_path_through_buffer_on_gloo():
    """dispatch -> grouped GEMM -> combine -> backward through the public API, 2 gloo ranks, a
    rank-local expert and a remote one per row: y[i] = q(x_i) @ W_d[e]^T for row i routed to
    expert e of rank d; x.grad[i] = dy_i @ W_d[e] (bf16, straight-through); W_d.grad[e] = sum
    of dy_i^T q(x_i) over the rows routed to it, from every source."""
    case = EXPERT_PATH_CASE
    got = worlds.results(case.world, "gemm/expert_path")   # the session's shared gloo world
    counts, xs = case.inputs()
    L = case.num_experts // case.world
    ws = [w.float() for w in _weights(case)]
    grad_w = [torch.zeros_like(w) for w in ws]
    for s in range(case.world):
        ex = torch.repeat_interleave(torch.arange(case.num_experts), counts[s])
        xq = mxep.to_mxfp8(xs[s]).dequantize().float()
        dy = torch.randn(got[s][0].shape, generator=torch.Generator().manual_seed(s)).bfloat16().float()
        y_ref = torch.stack([xq[i] @ ws[int(ex[i]) // L][int(ex[i]) % L].t() for i in range(len(ex))])
        gx_ref = torch.stack([dy[i] @ ws[int(ex[i]) // L][int(ex[i]) % L] for i in range(len(ex))])
        for i in range(len(ex)):
            d, e = divmod(int(ex[i]), L)
            grad_w[d][e] += dy[i][:, None] * xq[i][None, :]
        assert rel_err(got[s][0], y_ref) < 1e-2
        assert rel_err(got[s][1], gx_ref) < 1e-2
    for d in range(case.world):
        assert rel_err(got[d][2], grad_w[d]) < 1e-2

