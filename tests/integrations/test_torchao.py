"""mxep with torchao 0.18.0 (the ``torchao`` extra): MXFP8Tensor <-> MXTensor without copies,
``grouped_mm_mxfp8(impl="torchao")`` / ``MoE(gemm_impl="torchao")`` against mxep's dequantize
path and torchao's own emulated call, and torch's meta checks of the sm_100 call.

What runs where: on CPU (and on Hopper, ``-m gpu``) torchao runs EMULATED. The sm_100 path
(``KernelPreference.AUTO``: ``torch._scaled_grouped_mm`` on the MX tensor cores) cannot run on
these machines; ``test_sm100_call_passes_torch_meta_checks`` runs mxep's and torchao's code of
that path on meta tensors, with the five torchao CUDA kernels it calls replaced by their shape
contracts, so that torch's meta implementation of ``_scaled_grouped_mm`` checks every call.

Tolerances (the torchao backward is torchao's MXFP8 recipe, the reference mxep's bf16 one): the
input gradient is an MX GEMM (dy and W both quantized to e4m3): >= 25 dB SQNR against the bf16
backward (measured 31-33 dB); the weight gradient is bf16 in both (``wgrad_with_hp``): >= 60 dB
(measured: equal, inf dB, on CPU).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao", reason="torchao is not installed (pip install 'mxep[torchao]')")

import mxep  # noqa: E402
from mxep.format.mxfp8 import MXFP8Tensor, quantize_straight_through  # noqa: E402
from mxep.integrations import torchao as mxao  # noqa: E402
from mxep.testing import sqnr_db  # noqa: E402
from support.dist import single_rank_group  # noqa: E402

ta = mxao.require_torchao("tests")
MXTensor = ta.MXTensor

ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
DEVICES = [pytest.param("cpu"), pytest.param("cuda", marks=ON_GPU)]
DGRAD_DB = 25.0    # MXFP8 input gradient (torchao) vs bf16 (mxep): two e4m3 operands
WGRAD_DB = 60.0    # both bf16 (wgrad_with_hp): the same grouped GEMM on the same values


def _layout(valid_rows, K, device, seed, slack=16):
    """A dispatch-like layout: group e holds ``valid_rows[e]`` token rows, zero rows up to a
    multiple of 32 (an entry None: a zero-row group, offsets repeating); ``slack`` rows of large
    values past the last group end (never to be read). Returns (x bf16 [cap, K] leaf, offs
    int32 [L], end)."""
    g = torch.Generator().manual_seed(seed)
    ends, rows, blocks = [], 0, []
    for n in valid_rows:
        if n is None:
            ends.append(rows)
            continue
        padded = max(-(-n // 32) * 32, 32)
        blk = torch.zeros(padded, K)
        blk[:n] = torch.randn(n, K, generator=g) * (1 + 4 * torch.rand(n, 1, generator=g))
        blocks.append(blk)
        rows += padded
        ends.append(rows)
    blocks.append(torch.randn(slack, K, generator=g) * 1e4)
    x = torch.cat(blocks).bfloat16().to(device).requires_grad_()
    return x, torch.tensor(ends, dtype=torch.int32, device=device), rows


# (valid rows per expert (None: a zero-row group), K, N): empty experts, one expert, odd group
# sizes, hidden 7168 and 5120 (as K, the first GEMM, and as N, the second); few rows (interpreter).
SHAPES = [
    pytest.param([32, None, 64, 0], 64, 96, id="empty-experts"),
    pytest.param([50], 96, 64, id="one-expert"),
    pytest.param([5, 37, 1], 160, 96, id="odd-groups"),
    pytest.param([3, None, 30], 7168, 64, id="K7168"),
    pytest.param([17, 2], 5120, 32, id="K5120"),
    pytest.param([9, 0], 64, 7168, id="N7168"),
]


def _weight(L, N, K, device, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(L, N, K, generator=g) / K ** 0.5).bfloat16().to(device).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("valid_rows,K,N", SHAPES)
def test_torchao_impl_against_dequant_and_torchao(device, valid_rows, K, N):
    x, offs, end = _layout(valid_rows, K, device, seed=K + N)
    w = _weight(len(valid_rows), N, K, device, seed=N)
    dy = torch.randn(x.shape[0], N, generator=torch.Generator().manual_seed(3)).bfloat16().to(device)

    # impl="torchao", on tokens that carry gradients back to x (bf16, straight-through)
    y = mxep.grouped_mm_mxfp8(quantize_straight_through(x), w, offs, impl="torchao")
    y.backward(dy)
    # the dequantize path with the MX weight torchao's forward uses (rceil along K): same bits
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y_ref = mxep.grouped_mm_mxfp8(quantize_straight_through(x_ref), quantize_straight_through(w_ref), offs,
                                  impl="dequant")
    assert torch.equal(y[:end], y_ref[:end])
    y_ref.backward(dy)
    # torchao's own emulated call on the same inputs: the tokens' values and the bf16 weight
    a = mxep.to_mxfp8(x.detach()).dequantize().requires_grad_()
    w_ao = w.detach().clone().requires_grad_()
    y_ao = ta.grouped_mm(a, w_ao.transpose(-2, -1), offs, kernel_preference=ta.KernelPreference.EMULATED,
                         wgrad_with_hp=True)
    assert torch.equal(y[:end], y_ao[:end])
    y_ao.backward(dy)
    assert torch.equal(x.grad[:end], a.grad[:end])
    assert torch.equal(w.grad, w_ao.grad)
    # ... and the forward of torchao's call on the MXTensor of the dispatched bytes itself
    y_mx = ta.grouped_mm(mxep.to_mxfp8(x.detach()).to_torchao(), w.detach().transpose(-2, -1), offs,
                         kernel_preference=ta.KernelPreference.EMULATED, wgrad_with_hp=True)
    assert torch.equal(y[:end], y_mx[:end])
    # torchao's MXFP8 backward against mxep's bf16 one
    assert sqnr_db(x.grad[:end], x_ref.grad[:end]) >= DGRAD_DB
    assert sqnr_db(w.grad, w_ref.grad) >= WGRAD_DB


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("token_scale_mode", ["rceil", "floor"])
def test_torchao_impl_mx_weight_and_floor_tokens(device, token_scale_mode):
    """An MXFP8Tensor weight (dequantized; torchao quantizes it again along K, RCEIL) gives the
    same forward as its bf16 values, bit for bit the dequantize path with ``to_mxfp8(w)``; tokens
    quantized with either scale mode keep their values (RCEIL re-quantization is exact)."""
    x, offs, end = _layout([40, 7], 64, device, seed=5)
    w = _weight(2, 64, 64, device, seed=6).detach()
    t = mxep.to_mxfp8(x.detach(), token_scale_mode)
    ref = mxep.grouped_mm_mxfp8(t, mxep.to_mxfp8(w), offs, impl="dequant")
    assert torch.equal(mxep.grouped_mm_mxfp8(t, w, offs, impl="torchao")[:end], ref[:end])
    got_mx = mxep.grouped_mm_mxfp8(t, mxep.to_mxfp8(w), offs, impl="torchao")
    assert torch.equal(got_mx[:end], ref[:end])


def test_moe_torchao_needs_rceil():
    with single_rank_group():
        with pytest.raises(ValueError, match="rceil"):
            mxep.MoE(64, 32, 4, 2, 16, scale_mode="floor", gemm_impl="torchao")


def test_to_from_torchao_share_storage():
    x = torch.randn(64, 96).bfloat16()
    t = mxep.to_mxfp8(x)
    a = t.to_torchao()
    assert isinstance(a, MXTensor) and a.block_size == 32 and not a.is_swizzled_scales
    assert a.qdata.data_ptr() == t.qdata.data_ptr() and a.scale.data_ptr() == t.scale.data_ptr()
    assert a.orig_dtype == torch.bfloat16 and tuple(a.shape) == (64, 96)
    assert torch.equal(a.dequantize(torch.bfloat16), t.dequantize())
    back = MXFP8Tensor.from_torchao(a)
    assert isinstance(back, MXFP8Tensor)
    assert back.qdata.data_ptr() == t.qdata.data_ptr() and back.scale.data_ptr() == t.scale.data_ptr()
    # torchao's own quantization of the same values comes back as the same MXFP8 bytes (rceil)
    ao = MXTensor.to_mx(x, torch.float8_e4m3fn, 32, ta.ScaleCalculationMode.RCEIL)
    mine = MXFP8Tensor.from_torchao(ao)
    assert torch.equal(mine.qdata.view(torch.uint8), t.qdata.view(torch.uint8))
    assert torch.equal(mine.scale.view(torch.uint8), t.scale.view(torch.uint8))


def test_from_torchao_refuses_other_layouts():
    t = mxep.to_mxfp8(torch.randn(128, 128).bfloat16())
    swizzled = MXTensor.from_qdata_and_scales(t.qdata, t.scale, torch.bfloat16, is_swizzled_scales=True)
    with pytest.raises(ValueError, match="blocked"):
        MXFP8Tensor.from_torchao(swizzled)
    with pytest.raises(TypeError, match="MXTensor"):
        MXFP8Tensor.from_torchao(t.qdata)
    with pytest.raises(TypeError, match="MXFP8Tensor"):
        mxao.to_torchao(t.qdata)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("level", ["tokens", "rows"])
def test_dispatch_results_feed_torchao(device, level):
    """A real one-rank dispatch (both levels): its tokens as an MXTensor without a copy, and the
    torchao GEMM on them equal to the dequantize path; gradients reach x."""
    H, N, E, k, T = 64, 96, 4, 2, 24
    backend = "nccl" if device == "cuda" else "gloo"
    g = torch.Generator().manual_seed(7)
    x = torch.randn(T, H, generator=g).bfloat16().to(device)
    w = _weight(E, N, H, device, seed=8)
    with single_rank_group(backend):
        if level == "tokens":
            buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, device=device)
            idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(device)
            run = lambda xx: buf.dispatch_tokens(xx, idx, torch.full((T, k), 0.5, device=device))  # noqa: E731
        else:
            buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, device=device)
            counts = torch.tensor([9, 0, 13, 2], dtype=torch.int32, device=device)   # an empty expert
            run = lambda xx: buf.dispatch(xx, counts)  # noqa: E731
        xg = x.clone().requires_grad_()
        res = run(xg)
        a = res.torchao_tokens()
        assert isinstance(a, MXTensor) and a.qdata.data_ptr() == res.tokens.qdata.data_ptr()
        assert a.scale.data_ptr() == res.tokens.scale.data_ptr()
        end = int(res.group_end_offsets[-1])   # test-only host read
        y = mxep.grouped_mm_mxfp8(res.tokens, w, res.group_end_offsets, impl="torchao")
        ref = mxep.grouped_mm_mxfp8(res.tokens, mxep.to_mxfp8(w.detach()), res.group_end_offsets, impl="dequant")
        assert torch.equal(y[:end], ref[:end])
        y[:end].float().square().sum().backward()
        assert xg.grad is not None and torch.isfinite(xg.grad.float()).all() and xg.grad.abs().sum() > 0
        assert w.grad is not None and torch.isfinite(w.grad.float()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_moe_gemm_impl_torchao(device):
    """MoE(gemm_impl="torchao") against "dequant": the same forward bits (torchao quantizes the
    bf16 weights to the MX weights mx_weights gives; the SwiGLU's MXFP8 output feeds the second
    GEMM on both), gradients within the MXFP8-recipe tolerance."""
    backend = "nccl" if device == "cuda" else "gloo"
    with single_rank_group(backend):
        torch.manual_seed(0)
        kw = dict(hidden=64, ffn_hidden=32, num_experts=4, top_k=2, max_tokens_per_rank=16, device=device)
        ref = mxep.MoE(**kw, gemm_impl="dequant")
        moe = mxep.MoE(**kw, gemm_impl="torchao")
        moe.load_state_dict(ref.state_dict())
        assert moe.resolved_gemm_impl() == "torchao" and ref.resolved_gemm_impl() == "dequant"
        x = torch.randn(13, 64, device=device).bfloat16()
        xs = [x.clone().requires_grad_() for _ in range(2)]
        ys = [m(xx) for m, xx in zip((ref, moe), xs)]
        assert torch.equal(ys[0], ys[1])
        for y in ys:
            y.float().square().sum().backward()
        assert sqnr_db(xs[1].grad, xs[0].grad) >= DGRAD_DB
        assert sqnr_db(moe.w13.grad, ref.w13.grad) >= DGRAD_DB   # dy of w13 went through an MX dgrad
        assert sqnr_db(moe.w2.grad, ref.w2.grad) >= WGRAD_DB
        assert moe._w13_cache.builds == 0   # torchao quantizes the bf16 weights itself


def test_auto_resolution_and_bad_n():
    assert mxep.gemm.resolve_impl("auto", 64, 64, "cpu") == "dequant"   # unchanged off sm_100
    assert mxep.gemm.resolve_impl("torchao", 64, 64, "cpu") == "torchao"
    t = mxep.to_mxfp8(torch.randn(32, 64).bfloat16())
    with pytest.raises(ValueError, match="multiple of 32"):
        mxep.grouped_mm_mxfp8(t, torch.randn(1, 40, 64).bfloat16(), torch.tensor([32], dtype=torch.int32),
                              impl="torchao")


# ---------------------------------------------------------------- item 4: the sm_100 call, meta

def _round_up(a, b):
    return -(-a // b) * b


def _sm100_standins(monkeypatch, calls):
    """Replace the torchao CUDA kernels the sm_100 path calls (none runs without sm_100) by
    their shape contracts, from torchao 0.18.0's own code: the fake of
    ``torchao::mx_block_rearrange_2d_M_groups`` (rows + 128 per group, columns to 4), the output
    allocation of ``triton_to_mxfp8_dim0`` and ``triton_mx_block_rearrange_per_group_3d``, and
    the registered fakes of the CuTeDSL quantize ops (called as ops here, so torchao's fakes run).
    ``torch._scaled_grouped_mm`` stays torch's: on meta tensors its meta implementation runs."""
    mm = ta.mm_module
    e8 = torch.float8_e8m0fnu

    def rearrange_m_groups(scales, offs, chunks_per_tb=4):
        assert scales.ndim == 2 and offs.dtype == torch.int32
        return scales.new_empty((scales.shape[0] + offs.shape[0] * 128, _round_up(scales.shape[1], 4)), dtype=e8)

    def to_mxfp8_dim0(x, block=32, mode="rceil"):
        assert x.is_contiguous() and x.dtype == torch.bfloat16 and mode in ("rceil", "floor")
        return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
                torch.empty(*x.shape[:-1], x.shape[-1] // block, dtype=e8, device=x.device))

    def rearrange_3d(s):
        G, rows, cols = s.shape
        return s.new_empty((G, _round_up(rows, 128) * _round_up(cols, 4)))

    def quantize_2d(x, block_size=32, scaling_mode="rceil", stage_count=2, offs=None):
        return torch.ops.torchao.mxfp8_quantize_2d_1x32_cutedsl(x, block_size, scaling_mode, stage_count, offs)

    def quantize_3d(x, block_size=32, scale_block_dim1=32, scale_block_dim2=1, scaling_mode="rceil", **_):
        return torch.ops.torchao.mxfp8_quantize_3d_cutedsl(x, block_size, scale_block_dim1, scale_block_dim2,
                                                           scaling_mode, 2, True)

    def dequant_dim0(q, s, out_dtype, scale_block_size=32):
        assert s.shape == (q.shape[0], q.shape[1] // 32), "row-major scales expected"
        return torch.empty(q.shape, dtype=out_dtype, device=q.device)

    real = torch._scaled_grouped_mm

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(mm, "_SM100_KERNELS_AVAILABLE", True)
    monkeypatch.setattr(mm, "mx_block_rearrange_2d_M_groups_cuda", rearrange_m_groups)
    monkeypatch.setattr(mm, "triton_to_mxfp8_dim0", to_mxfp8_dim0)
    monkeypatch.setattr(mm, "triton_mx_block_rearrange_per_group_3d", rearrange_3d)
    monkeypatch.setattr(mm, "mxfp8_quantize_2d_1x32_cutedsl", quantize_2d)
    monkeypatch.setattr(mm, "mxfp8_quantize_cuda_3d", quantize_3d)
    monkeypatch.setattr(mm, "triton_mxfp8_dequant_dim0", dequant_dim0)
    monkeypatch.setattr(torch, "_scaled_grouped_mm", spy)
    monkeypatch.setattr(mxao, "has_mx_tensor_cores", lambda device: True)


# (experts, rows, K, N): torch's meta checks do not read the group ends (group sizes are not
# known when tracing), so the patterns vary the shapes that are checked: experts, rows (a
# multiple of 32, as mxep's layout), hidden sizes 7168 / 5120 / 2048 and N off 128.
META_CASES = [(1, 32, 7168, 2048), (4, 160, 5120, 1536), (8, 288, 2048, 7168), (16, 544, 7168, 96),
              (3, 96, 64, 5120)]


@pytest.mark.parametrize("G,M,K,N", META_CASES)
def test_sm100_call_passes_torch_meta_checks(monkeypatch, G, M, K, N):
    """The forward and the input-gradient calls of ``torch._scaled_grouped_mm`` that
    ``grouped_mm_mxfp8(impl="torchao")`` makes on sm_100 (mxep's operand, torchao's argument
    construction), through torch's meta implementation: dtypes, row / column-major, 16-byte
    strides, 2-D activation scales, blocked 3-D weight scales ``(G, round_up(K/32, 4) *
    round_up(N, 128))``, int32 offsets, bf16 out. Also the bf16 weight gradient."""
    calls = []
    _sm100_standins(monkeypatch, calls)
    d = "meta"
    tokens = MXFP8Tensor(torch.empty(M, K, dtype=torch.float8_e4m3fn, device=d),
                         torch.empty(M, K // 32, dtype=torch.float8_e8m0fnu, device=d))
    x = torch.empty(M, K, dtype=torch.bfloat16, device=d, requires_grad=True)
    tokens_g = _Wrap.apply(x, tokens)
    w = torch.empty(G, N, K, dtype=torch.bfloat16, device=d, requires_grad=True)
    offs = torch.empty(G, dtype=torch.int32, device=d)
    y = mxep.grouped_mm_mxfp8(tokens_g, w, offs, impl="torchao")
    assert y.shape == (M, N) and y.dtype == torch.bfloat16 and y.device.type == "meta"
    y.backward(torch.empty_like(y))
    assert x.grad.shape == (M, K) and w.grad.shape == (G, N, K) and w.grad.dtype == torch.bfloat16
    assert len(calls) == 2   # forward, input gradient (the weight gradient is bf16: _grouped_mm)
    (fa, fk), (ba, bk) = calls
    assert fa[0] is tokens.qdata   # the dispatched bytes themselves: no second quantization, no copy
    assert fa[0].shape == (M, K) and fa[1].shape == (G, K, N) and fa[3].shape == (G, _round_up(K // 32, 4) * _round_up(N, 128))
    assert fk["offs"] is offs and fk["out_dtype"] == torch.bfloat16
    assert ba[0].shape == (M, N) and ba[1].shape == (G, N, K) and bk["offs"] is offs


class _Wrap(torch.autograd.Function):
    """Meta tokens whose gradient reaches ``x`` (a stand-in for the dispatch's straight-through)."""

    @staticmethod
    def forward(ctx, x, tokens):
        return MXFP8Tensor(tokens.qdata, tokens.scale, torch.bfloat16)

    @staticmethod
    def backward(ctx, g):
        return g, None


@pytest.mark.parametrize("bad", ["row-major-weight-scales", "wrong-blocked-size", "uint8-scales",
                                 "1d-activation-scales"])
def test_torch_meta_refuses_wrong_scales(bad):
    """Negative control: torch's meta implementation refuses what the sm_100 path must not pass."""
    G, M, K, N = 4, 128, 7168, 2048
    d = "meta"
    a = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=d)
    b = torch.empty(G, N, K, dtype=torch.float8_e4m3fn, device=d).transpose(-2, -1)   # (G, K, N) col-major
    sa = torch.empty(M + 128 * G, K // 32, dtype=torch.float8_e8m0fnu, device=d)
    sb = torch.empty(G, _round_up(K // 32, 4) * _round_up(N, 128), dtype=torch.float8_e8m0fnu, device=d)
    offs = torch.empty(G, dtype=torch.int32, device=d)
    out = torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)   # the right call passes
    assert out.shape == (M, N)
    if bad == "row-major-weight-scales":
        sb = torch.empty(G, N, K // 32, dtype=torch.float8_e8m0fnu, device=d)
    elif bad == "wrong-blocked-size":
        sb = torch.empty(G, sb.shape[1] - 128 * 4, dtype=torch.float8_e8m0fnu, device=d)   # one block short
    elif bad == "uint8-scales":
        sa, sb = sa.view(torch.uint8), sb.view(torch.uint8)
    else:
        sa = torch.empty(M * (K // 32), dtype=torch.float8_e8m0fnu, device=d)
    with pytest.raises(RuntimeError):
        torch._scaled_grouped_mm(a, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)


def test_sm100_operand_has_blocked_scales(monkeypatch):
    """torchao 0.18.0's sm_100 forward reads an unswizzled operand's scales as ``.scales`` (a name
    MXTensor does not have: AttributeError); mxep's operand carries the scales already in the
    blocked layout (``is_swizzled_scales=True``), which that forward uses as they are."""
    calls = []
    _sm100_standins(monkeypatch, calls)
    q = torch.empty(64, 256, dtype=torch.float8_e4m3fn, device="meta")
    s = torch.empty(64, 8, dtype=torch.float8_e8m0fnu, device="meta")
    w_t = torch.empty(2, 96, 256, dtype=torch.bfloat16, device="meta").transpose(-2, -1)
    offs = torch.empty(2, dtype=torch.int32, device="meta")
    run = lambda a: ta.mm_module._compute_fwd_sm100(a, w_t, offs, 32, torch.bfloat16,  # noqa: E731
                                                    ta.ScaleCalculationMode.RCEIL)
    with pytest.raises(AttributeError, match="scales"):
        run(MXTensor.from_qdata_and_scales(q, s, torch.bfloat16))
    a = mxao.sm100_operand(q, s, offs)
    assert a.qdata is q and a.is_swizzled_scales and a.scale.shape == (64 + 2 * 128, 8)
    assert run(a).shape == (64, 96)
    assert calls[-1][0][2] is a.scale   # the blocked scales go to torch._scaled_grouped_mm as they are
