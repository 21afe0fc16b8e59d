"""The one-pass MXFP8 -> bf16 kernel (mxep.format.dequantize) against the torch expression
(mxep.format.spec.dequantize_mxfp8), bit for bit: every e4m3 byte (NaN codes included) under
every e8m0 scale (0 = 2^-127, 255 = NaN), odd row counts, K not a multiple of the tile, and a
device-side row end past which the (poisoned) output must stay untouched."""
import pytest
import torch

from mxep.format.dequantize import dequantize_mxfp8_rows
from mxep.format.naive import dequantize_mxfp8_reference

POISON_BITS = 0x5A5A   # a normal bf16 (about 1.5e16) that no input here decodes to
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                            reason="needs a CUDA GPU")])]


def bits(t: torch.Tensor) -> torch.Tensor:
    """bf16 -> int16 bit patterns, every NaN folded to one pattern (payloads may differ)."""
    b = t.view(torch.int16).clone()
    b[t.isnan()] = 0x7FC0
    return b


def all_codes(R: int, K: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e4m3 bytes and e8m0 scales, with every byte value of each present."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (R, K), generator=g, dtype=torch.uint8)
    s = torch.randint(0, 256, (R, K // 32), generator=g, dtype=torch.uint8)
    q.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[: q.numel()]
    s.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[: s.numel()]
    return q.view(torch.float8_e4m3fn), s.view(torch.float8_e8m0fnu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("R,K", [(1, 32), (37, 96), (300, 1056), (9, 7168)])
def test_matches_reference_bit_exact(R, K, device):
    if device == "cuda":
        pytest.importorskip("triton")
    q, s = all_codes(R, K, seed=R * K)
    q, s = q.to(device), s.to(device)
    ref = dequantize_mxfp8_reference(q, s, torch.bfloat16)
    out = torch.full((R, K), 0, dtype=torch.int16, device=device).fill_(POISON_BITS).view(torch.bfloat16)
    dequantize_mxfp8_rows(q, s, out=out)
    assert torch.equal(bits(out), bits(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("end", [0, 1, 23, 64])
def test_row_end_leaves_later_rows_unwritten(end, device):
    R, K = 64, 160
    q, s = all_codes(R, K, seed=end)
    q, s = q.to(device), s.to(device)
    out = torch.zeros(R, K, dtype=torch.int16, device=device).fill_(POISON_BITS).view(torch.bfloat16)
    dequantize_mxfp8_rows(q, s, torch.tensor([end], dtype=torch.int32, device=device), out=out)
    assert torch.equal(bits(out[:end]), bits(dequantize_mxfp8_reference(q[:end], s[:end], torch.bfloat16)))
    assert (out[end:].view(torch.int16) == POISON_BITS).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_mxfp8_tensor_dequantize_uses_the_kernel_bit_exact():
    """``MXFP8Tensor.dequantize()`` on CUDA (bf16) runs the kernel: same bits as the torch
    expression, any leading shape, gradient straight through."""
    import mxep

    x = (torch.randn(3, 37, 224, device="cuda") * 100).bfloat16()
    t = mxep.to_mxfp8(x).detach().requires_grad_(True)
    y = t.dequantize()
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    assert torch.equal(bits(y.detach()), bits(dequantize_mxfp8_reference(t.qdata, t.scale, torch.bfloat16)))
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(t.grad, g)


def test_registered_op():
    """``torch.ops.mxep.dequantize_mxfp8`` passes torch.library's op checks (fake
    implementation, autograd registration) and gives the reference's bits, with and without a
    row end."""
    import mxep.format.dequantize  # noqa: F401  (registers the op)

    q, s = all_codes(13, 96, seed=5)
    # ("test_schema" cannot run here: its checker multiplies the fp8 inputs, which CPU torch lacks)
    torch.library.opcheck(torch.ops.mxep.dequantize_mxfp8.default, (q, s),
                          test_utils=("test_faketensor", "test_autograd_registration"))
    assert torch.equal(bits(torch.ops.mxep.dequantize_mxfp8(q, s)), bits(dequantize_mxfp8_reference(q, s, torch.bfloat16)))
    head = torch.ops.mxep.dequantize_mxfp8(q, s, torch.tensor([5], dtype=torch.int32))[:5]
    assert torch.equal(bits(head), bits(dequantize_mxfp8_reference(q[:5], s[:5], torch.bfloat16)))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        f = torch.ops.mxep.dequantize_mxfp8(torch.empty(2, 7, 64, dtype=torch.float8_e4m3fn),
                                            torch.empty(2, 7, 2, dtype=torch.float8_e8m0fnu))
        assert f.shape == (2, 7, 64) and f.dtype == torch.bfloat16
