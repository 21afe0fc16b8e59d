"""Pure-torch MXFP8 quantization: the ground truth the Triton kernels are tested against.

Implements, step by step and without any Triton code, the bit-level rules written in the
docstring of :mod:`mxep.format.mxfp8` (OCP Microscaling v1.0 e4m3 elements + e8m0 block
scales, see also ``shared/reference/mxfp8.md``). It runs on any device torch supports
(CPU and CUDA) and never synchronizes with the host.

Element rounding is done by torch's ``float32 -> float8_e4m3fn`` cast, which is
round-to-nearest-even (subnormals included) on CPU and CUDA. (Triton's CPU interpreter gets
this cast wrong when rounding carries into the exponent; the kernels therefore round with
integer arithmetic and this reference deliberately does not share that code.)
"""
from __future__ import annotations

import torch

__all__ = ["to_mxfp8_reference", "dequantize_mxfp8_reference"]

_BLOCK = 32
_E4M3_MAX = 448.0
_EXP_MASK = 0x7F800000  # fp32 exponent field; |x| bits >= this <=> Inf or NaN
_ABS_MASK = 0x7FFFFFFF
_E4M3_NAN_BYTE = 0x7F
_E8M0_NAN_BYTE = 0xFF


def _biased_exponent(bits: torch.Tensor) -> torch.Tensor:
    """Biased fp32 exponent field of non-negative int32 bit patterns."""
    return (bits >> 23) & 0xFF


def to_mxfp8_reference(x: torch.Tensor, scale_mode: str = "rceil") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (bf16/fp32 ``[..., K]``, ``K % 32 == 0``) to MXFP8.

    Returns ``(qdata float8_e4m3fn [..., K], scale float8_e8m0fnu [..., K // 32])``.
    Validation of dtype / shape is the caller's job (:func:`mxep.to_mxfp8`); this function
    still raises on the two things it cannot compute with.
    """
    if scale_mode not in ("rceil", "floor"):
        raise ValueError(f"scale_mode must be 'rceil' or 'floor', got {scale_mode!r}")
    if x.shape[-1] % _BLOCK != 0:
        raise ValueError(f"last dim must be a multiple of {_BLOCK}, got {x.shape[-1]}")

    lead, k = x.shape[:-1], x.shape[-1]
    xf = x.float().reshape(*lead, k // _BLOCK, _BLOCK)  # bf16 -> fp32 is exact
    bits = xf.view(torch.int32)
    abs_bits = bits & _ABS_MASK

    # amax on the integer view of |x|: for non-negative floats the int order is the float order,
    # and NaN/Inf (exponent field all ones) compare above every finite value, so one max both
    # finds amax and flags non-finite blocks.
    amax_bits = abs_bits.amax(dim=-1)  # int32 [..., nblocks]
    nonfinite = amax_bits >= _EXP_MASK

    if scale_mode == "rceil":
        # d = amax * fp32(1/448), an fp32 multiply (the constant itself is rounded to fp32).
        amax = amax_bits.view(torch.float32)
        inv448 = torch.tensor(1.0 / _E4M3_MAX, dtype=torch.float32, device=x.device)
        d_bits = (amax * inv448).view(torch.int32)
        d_exp = _biased_exponent(d_bits)
        d_man = d_bits & 0x7FFFFF
        # Normal d: round the exponent up when d is not a power of two.
        # Subnormal d (exponent field 0): d <= 2^-127 (mantissa <= 0x400000) fits byte 0,
        # anything larger needs byte 1 (2^-126).
        byte = torch.where(
            d_exp > 0,
            d_exp + (d_man != 0).to(torch.int32),
            (d_man > 0x400000).to(torch.int32),
        )
    else:  # floor: b = max(E(amax) - 8, 0), E = biased exponent (0 for zero / subnormal)
        byte = torch.clamp(_biased_exponent(amax_bits) - 8, min=0)
    byte = torch.where(nonfinite, torch.full_like(byte, _E8M0_NAN_BYTE), byte)

    # v = x * 2^(127 - b). The power of two is built from its bit pattern (biased exponent
    # 254 - b), which is exact on every device; finite blocks have b <= 247, so the factor is a
    # normal fp32 in [2^-120, 2^127]. Non-finite blocks get a dummy factor 1 (overwritten below).
    safe_byte = torch.where(nonfinite, torch.full_like(byte, 127), byte)
    factor = ((254 - safe_byte) << 23).view(torch.float32)
    v = xf * factor.unsqueeze(-1)  # exact power-of-two scaling (sign of zero kept)
    v = torch.clamp(v, -_E4M3_MAX, _E4M3_MAX)  # saturate (the cast would give NaN above 464)
    q_bytes = v.to(torch.float8_e4m3fn).view(torch.uint8)
    q_bytes = torch.where(
        nonfinite.unsqueeze(-1), torch.full_like(q_bytes, _E4M3_NAN_BYTE), q_bytes
    )

    qdata = q_bytes.reshape(*lead, k).view(torch.float8_e4m3fn)
    scale = byte.to(torch.uint8).view(torch.float8_e8m0fnu)
    return qdata, scale


def dequantize_mxfp8_reference(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The pure-torch decode: ``qdata`` float8_e4m3fn ``[..., K]`` and ``scale`` float8_e8m0fnu ``[..., K // 32]`` -> ``dtype [..., K]``.

    Scale byte 0xFF decodes to NaN (torch's e8m0 conversion), so non-finite blocks come back NaN.
    """
    k = qdata.shape[-1]
    blocks = qdata.float().reshape(*qdata.shape[:-1], k // _BLOCK, _BLOCK)
    out = blocks * scale.float().unsqueeze(-1)
    return out.reshape(qdata.shape).to(dtype)


