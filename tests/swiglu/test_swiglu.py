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

    vals = torch.full((64, 32), 7.0, dtype=torch.bfloat16)
    k._swiglu_backward_kernel[(4, 1)](h, torch.ones(64, 32).bfloat16(), out, vals, offs, 2, 32, L_P=2, BLOCK_M=16,
                                      BLOCK_F=64, GRAD=True, VALUES=True, FLOOR=False, HW_CAST=False, DECODE="int")
    assert (out[32:] == 7.0).all() and torch.equal(out[:32], dh[:32])
    assert (vals[32:] == 7.0).all() and not (vals[:32] == 7.0).all()


VALUE_CASES = ([("cpu", cap, F, ends, mode) for mode in ("rceil", "floor")
                for cap, F, ends in [(80, 64, [16, 16, 45]), (48, 160, [3, 33])]]
               + [pytest.param("cuda", 700, F, [96, 96, 448, 637], "rceil", marks=ON_GPU) for F in (2048, 96)])


@pytest.mark.parametrize("device,cap,F,ends,scale_mode", VALUE_CASES,
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else None)
def test_values_are_the_dequantized_bytes(device, cap, F, ends, scale_mode):
    """swiglu_values_forward: bit for bit the dequantize kernel's decoding of the bytes
    swiglu_quantize_forward writes (the one-node layer's GEMM 2 multiplies them instead of a
    second pass), below the layout's end, with blocks of tiny values (scales near e8m0's floor),
    large ones, an Inf and a NaN among them; rows past the end stay as they were."""
    from mxep.format.dequantize import dequantize_mxfp8_rows
    from mxep.swiglu import swiglu as k

    g = torch.Generator().manual_seed(cap * 7 + F)
    h = (torch.randn(cap, 2 * F, generator=g) * 3).bfloat16()
    h[1, :F] = 1e-36                                  # silu(g) * u underflows towards bf16's floor
    h[2, F:] = 3e4                                    # large products
    h[3, :F] = 1e-36
    h[3, 0] = 10.0                                    # tiny values beside a large one: quantized to 0
    h[4, 5] = float("inf")
    h[5, F + 7] = float("nan")
    h = h.to(device)
    offs = torch.tensor(ends, dtype=torch.int32, device=device)
    R, hw = ends[-1], device == "cuda"
    q, s = k.swiglu_quantize_forward(h, offs, scale_mode, hw_cast=hw, raw=True)
    v = k.swiglu_values_forward(h, offs, scale_mode, hw_cast=hw)
    assert q.dtype == s.dtype == torch.uint8 and v.dtype == torch.bfloat16 and v.shape == (cap, F)
    ref = dequantize_mxfp8_rows(q, s, offs[-1:])
    assert torch.equal(v[:R].view(torch.int16), ref[:R].view(torch.int16))
    assert v[:R].isnan().any() and (v[:R] == 0).any() and (v[:R].abs() > 1e4).any()
    # rows past the end: the kernel on poisoned outputs leaves them; bytes and values in one
    # pass are the two passes' bytes and values
    bm, bf = k._tile(h)
    qo, so = torch.full_like(q, 0xA5), torch.full_like(s, 0x5A)
    vo = torch.full((cap, F), 7.0, dtype=torch.bfloat16, device=device)
    k._swiglu_quantize_kernel[(-(-cap // bm), -(-F // bf))](
        h, qo, so, vo, offs, len(ends), F, L_P=max(triton_pow2(len(ends)), 2), BLOCK_M=bm, BLOCK_F=bf,
        FLOOR=scale_mode == "floor", HW_CAST=hw, BYTES=True, VALUES=True, DECODE="cvt" if hw else "int")
    assert torch.equal(vo[:R].view(torch.int16), v[:R].view(torch.int16))
    assert torch.equal(qo[:R], q[:R]) and torch.equal(so[:R], s[:R])
    assert (vo[R:] == 7.0).all() and (qo[R:] == 0xA5).all() and (so[R:] == 0x5A).all()
    # the backward makes the same values again from h (the forward's bytes need not be saved),
    # with and without the gradient, which is the plain backward's
    da = torch.randn(cap, F, generator=g).bfloat16().to(device)
    dh, v2 = k.swiglu_backward(h, da, offs, values_scale_mode=scale_mode, hw_cast=hw)
    none, v3 = k.swiglu_backward(h, None, offs, values_scale_mode=scale_mode, hw_cast=hw)
    assert none is None
    for vb in (v2, v3):
        assert torch.equal(vb[:R].view(torch.int16), v[:R].view(torch.int16))
    assert torch.equal(dh[:R].view(torch.int16), k.swiglu_backward(h, da, offs)[:R].view(torch.int16))


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_bad_inputs_raise():
    offs = torch.tensor([32], dtype=torch.int32)
    with pytest.raises(ValueError, match="bf16"):
        swiglu_mxfp8(torch.zeros(32, 64), offs)
    with pytest.raises(ValueError, match="multiple of 32"):
        swiglu_mxfp8(torch.zeros(32, 48, dtype=torch.bfloat16), offs)
    with pytest.raises(ValueError, match="int32"):
        swiglu_mxfp8(torch.zeros(32, 64, dtype=torch.bfloat16), offs.long())

