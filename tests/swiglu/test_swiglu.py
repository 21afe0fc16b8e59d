"""SwiGLU + MXFP8 quantization on the layout (mxep.swiglu) against the torch reference
(mxep.swiglu.naive): the layout's rows only (rows past its end never written: poison
stays), quantized bytes compared after dequantization (silu's exp may differ in the last fp32
bit between Triton and torch, which can move a value across a bf16 rounding boundary), pad
rows exactly zero, and the bf16 backward by relative error."""
import pytest
import torch

from mxep.swiglu import swiglu_mxfp8
from mxep.swiglu.naive import swiglu_mxfp8_reference
from mxep.format.naive import dequantize_mxfp8_reference
from mxep.testing import rel_err


ON_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
# (device, cap, F, group ends, scale mode): small shapes for the interpreter, in both scale
# modes; on CUDA the GPU tile and the hardware e4m3 conversion at model sizes
CASES = ([("cpu", cap, F, ends, mode) for mode in ("rceil", "floor")
          for cap, F, ends in [(96, 32, [32, 32, 96]), (160, 96, [64, 128]), (48, 160, [16, 48])]]
         + [pytest.param("cuda", 700, F, [96, 96, 448, 640], "rceil", marks=ON_GPU) for F in (2048, 1536, 96)])


@pytest.mark.parametrize("device,cap,F,ends,scale_mode", CASES,
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else None)
def test_forward_and_backward_match_reference(device, cap, F, ends, scale_mode):
    g = torch.Generator().manual_seed(cap + F)
    h = (torch.randn(cap, 2 * F, generator=g) * 3).bfloat16()
    R = ends[-1]
    h[R - 5:R] = 0                                  # pad-like rows: zero in, zero out
    h = h.to(device)
    offs = torch.tensor(ends, dtype=torch.int32, device=device)
    hr = h.clone().requires_grad_(True)
    a = swiglu_mxfp8(hr, offs, scale_mode)
    ref_h = h.clone().requires_grad_(True)
    ref = swiglu_mxfp8_reference(ref_h, R, scale_mode)
    got = dequantize_mxfp8_reference(a.qdata[:R], a.scale[:R], torch.float32)
    exp = dequantize_mxfp8_reference(ref.qdata, ref.scale, torch.float32)
    assert rel_err(got, exp) < 1e-3
    same = (a.qdata[:R].view(torch.uint8) == ref.qdata.view(torch.uint8)).float().mean()
    assert same > 0.999                               # all but a rare boundary case, bit for bit
    assert torch.equal(a.qdata[R - 5:R].view(torch.uint8), ref.qdata[R - 5:R].view(torch.uint8))
    assert torch.equal(a.scale[R - 5:R].view(torch.uint8), ref.scale[R - 5:R].view(torch.uint8))
    da = torch.randn(cap, F, generator=g).bfloat16().to(device)
    a.dequantize().backward(da)
    ref.dequantize().backward(da[:R])
    assert rel_err(hr.grad[:R], ref_h.grad[:R]) < 1e-2


def test_rows_past_the_end_are_never_written():
    from mxep.swiglu.swiglu import swiglu_backward, swiglu_quantize_forward

    h = torch.randn(64, 64).bfloat16()
    offs = torch.tensor([16, 32], dtype=torch.int32)
    q, s = swiglu_quantize_forward(h, offs, "rceil")
    dh = swiglu_backward(h, torch.ones(64, 32).bfloat16(), offs)
    # torch.empty outputs: rows >= 32 hold whatever was there; write poison and run again
    q.view(torch.uint8)[32:] = 0xA5
    dh[32:] = 7.0
    q2, _ = swiglu_quantize_forward(h, offs, "rceil")
    assert torch.equal(q2.view(torch.uint8)[:32], q.view(torch.uint8)[:32])
    out = torch.full((64, 64), 7.0, dtype=torch.bfloat16)
    from mxep.swiglu import swiglu as k

    k._swiglu_backward_kernel[(4, 1)](h.view(torch.int16), torch.ones(64, 32).bfloat16().view(torch.int16),
                                      out.view(torch.int16), offs, 2, 32, L_P=2, BLOCK_M=16, BLOCK_F=64)
    assert (out[32:] == 7.0).all() and torch.equal(out[:32], dh[:32])


def test_bad_inputs_raise():
    offs = torch.tensor([32], dtype=torch.int32)
    with pytest.raises(ValueError, match="bf16"):
        swiglu_mxfp8(torch.zeros(32, 64), offs)
    with pytest.raises(ValueError, match="multiple of 32"):
        swiglu_mxfp8(torch.zeros(32, 48, dtype=torch.bfloat16), offs)
    with pytest.raises(ValueError, match="int32"):
        swiglu_mxfp8(torch.zeros(32, 64, dtype=torch.bfloat16), offs.long())

