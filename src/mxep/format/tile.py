"""Register-level MXFP8 quantization of one tile, shared by the standalone quantize kernel and
the fused dispatch kernel; and the reverse, e4m3 bytes + e8m0 scales -> bf16, shared by the
dequantize kernel and the grouped GEMM.

The rules are those of :mod:`mxep.format.spec` (bit-exact with
:func:`mxep.format.naive.to_mxfp8_reference`). Element rounding to e4m3 is done with integer
arithmetic on the fp32 bit pattern instead of ``.to(tl.float8e4nv)``: Triton's CPU interpreter
rounds that cast wrongly when rounding carries into the exponent (-31.13 -> -16 instead of -32,
see ``shared/reference/mxfp8.md``), and the integer path behaves identically on GPU and in the
interpreter.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["quantize_tile", "bf16_bits_to_fp32", "mxfp8_tile_to_bf16", "fp32_to_bf16_bits"]


@triton.jit
def bf16_bits_to_fp32(raw):
    """bf16 bit patterns (loaded as ``tl.int16``) -> the exactly equal fp32 values.

    Use this instead of ``bf16_tensor.to(tl.float32)``: Triton 3.6's CPU interpreter converts
    bf16 *subnormals* wrongly (e.g. 1.5*2^-127 -> 2^-127, 2^-130 -> 0); widening the bits is
    exact everywhere and as cheap on GPU. (int16 -> int32 sign-extends, the << 16 drops those
    extension bits again.)"""
    return (raw.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _rne_shift_right(m, s):
    """Round-to-nearest-even of ``m / 2**s`` for int32 ``m`` in [0, 2**24) and ``1 <= s <= 25``."""
    q = m >> s
    round_bit = (m >> (s - 1)) & 1
    sticky = (m - ((m >> (s - 1)) << (s - 1))) != 0  # any bit below the round bit
    round_up = (round_bit == 1) & (sticky | ((q & 1) == 1))
    return q + round_up.to(tl.int32)


@triton.jit
def quantize_tile(x, BLOCK_K: tl.constexpr, FLOOR: tl.constexpr, HW_CAST: tl.constexpr = False):
    """x: fp32 tile [BLOCK_M, BLOCK_K] (BLOCK_K multiple of 32). Returns (q_bits, s_bits):
    q_bits tl.uint8 [BLOCK_M, BLOCK_K] (e4m3 bit patterns), s_bits tl.uint8 [BLOCK_M, BLOCK_K // 32] (e8m0 bytes).

    ``HW_CAST``: round the (exactly scaled, clamped) elements with the GPU's fp32 -> e4m3
    conversion (``cvt.rn.satfinite``, one instruction per two elements) instead of the integer
    rounding below. Same bits (the GPU tests check it against the reference); the integer path
    exists for the CPU interpreter, whose fp8 cast rounds wrongly, and costs ALU time on GPU
    (docs/tuning.md, ``EPConfig.hw_cast``)."""
    NB: tl.constexpr = BLOCK_K // 32
    BLOCK_M: tl.constexpr = x.shape[0]

    xb = tl.reshape(x, [BLOCK_M, NB, 32])
    bits = xb.to(tl.int32, bitcast=True)
    abs_bits = bits & 0x7FFFFFFF

    # amax over the integer view of |x|: int order == float order for non-negative floats, and
    # Inf/NaN (exponent all ones) sort above every finite value -> no NaN trouble in max.
    amax_bits = tl.max(abs_bits, axis=2)  # [BLOCK_M, NB] int32
    nonfinite = amax_bits >= 0x7F800000

    if FLOOR:
        # b = max(E(amax) - 8, 0) (OCP reference conversion, emax(e4m3) = 8).
        byte = tl.maximum((amax_bits >> 23) - 8, 0)
    else:
        # RCEIL: d = amax * fp32(1/448) (fp32 multiply; the constant is the fp32 value
        # 0x3B124925 = RN(1/448)), then round d up to a power of two.
        inv448 = tl.full([BLOCK_M, NB], 0x3B124925, tl.int32).to(tl.float32, bitcast=True)
        d = amax_bits.to(tl.float32, bitcast=True) * inv448
        d_bits = d.to(tl.int32, bitcast=True)  # d >= 0 (or NaN for non-finite; overwritten)
        d_exp = (d_bits >> 23) & 0xFF
        d_man = d_bits & 0x7FFFFF
        byte = tl.where(d_exp > 0,
                        d_exp + (d_man != 0).to(tl.int32),
                        (d_man > 0x400000).to(tl.int32))
    # Finite blocks have byte <= 247; clamp so the factor below stays a valid normal float.
    byte = tl.minimum(byte, 253)

    # v = x * 2^(127 - byte): exact power-of-two scaling (factor built from its bit pattern).
    factor = ((254 - byte) << 23).to(tl.float32, bitcast=True)
    v = xb * factor[:, :, None]
    if HW_CAST:
        v_sat = tl.minimum(tl.maximum(v, -448.0), 448.0)
        code_hw = v_sat.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        code_hw = tl.where(nonfinite[:, :, None], 0x7F, code_hw.to(tl.int32))
        byte_hw = tl.where(nonfinite, 0xFF, byte)
        return tl.reshape(code_hw, [BLOCK_M, BLOCK_K]).to(tl.uint8), byte_hw.to(tl.uint8)
    vb = v.to(tl.int32, bitcast=True)
    sign = (vb >> 31) & 1
    a = vb & 0x7FFFFFFF
    e = a >> 23  # biased fp32 exponent of |v|

    # |v| >= 2^-6 (e >= 121): e4m3 normal. RNE drops the low 20 mantissa bits (23 -> 3); a carry
    # out of the mantissa correctly bumps the exponent. Rebias 127 -> 7 (subtract 120 << 3),
    # then saturate to 0x7E (= 448, max normal; 0x7F is NaN in e4m3fn).
    r = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    code_normal = tl.minimum(r - (120 << 3), 0x7E)

    # |v| < 2^-6: e4m3 subnormal, code = RNE(|v| / 2^-9) = RNE(M >> (141 - e)) with
    # M = 1.mantissa * 2^23 (fp32 subnormal v: way below 2^-10, so it rounds to 0 either way).
    # Shifts >= 25 always round to 0 (M < 2^24 <= half), so clamp the shift to stay < 32.
    # k == 8 is exactly the min-normal code 0x08.
    m_full = tl.where(e > 0, (a & 0x7FFFFF) | 0x800000, 0)
    s = tl.minimum(tl.maximum(141 - e, 21), 25)
    code_sub = _rne_shift_right(m_full, s)

    code = tl.where(e >= 121, code_normal, code_sub) | (sign << 7)  # -0 -> 0x80
    # Non-finite block: every element is e4m3 NaN (0x7F), the scale is e8m0 NaN (0xFF).
    code = tl.where(nonfinite[:, :, None], 0x7F, code)
    byte = tl.where(nonfinite, 0xFF, byte)

    q_bits = tl.reshape(code, [BLOCK_M, BLOCK_K]).to(tl.uint8)
    s_bits = byte.to(tl.uint8)
    return q_bits, s_bits


@triton.jit
def e4m3_bytes_to_fp32(b):
    """e4m3 bytes (int32 0..255) -> fp32, exactly: sign, 4-bit exponent (bias 7), 3-bit mantissa;
    0x7F / 0xFF are NaN (no infinities in e4m3)."""
    e = (b >> 3) & 15
    m = b & 7
    normal = ((e + 120) << 23) | (m << 20)                      # (1 + m/8) * 2^(e - 7) as fp32 bits
    sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)   # subnormal: m * 2^-9
    mag = tl.where(e == 0, sub, normal)
    mag = tl.where((e == 15) & (m == 7), 0x7FC00000, mag)      # NaN
    # the sign as a bit, not by negation: Triton's -x is 0 - x, which turns -0.0 into +0.0
    return (mag | ((b >> 7) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def e8m0_bytes_to_fp32(s):
    """e8m0 scale bytes (int32 0..255) -> 2^(s - 127) as fp32 (0 -> 2^-127, a subnormal; 255 -> NaN)."""
    bits = tl.where(s == 0, 0x400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def fp32_to_bf16_bits(x):
    """fp32 -> bf16 bit patterns (int16), round to nearest even, NaN kept NaN. Written out
    because the CPU interpreter's fp32 -> bf16 cast truncates; on GPUs it is the same as
    ``cvt.rn.bf16.f32``."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.int16)


@triton.jit
def mxfp8_tile_to_bf16(q, sc, DECODE: tl.constexpr):
    """An e4m3 tile (uint8) and its e8m0 scales gathered to the same shape (uint8) -> bf16 values
    ``e4m3 * 2^(scale - 127)`` (exact)."""
    if DECODE == "int":
        return fp32_to_bf16_bits(e4m3_bytes_to_fp32(q.to(tl.int32)) *
                                 e8m0_bytes_to_fp32(sc.to(tl.int32))).to(tl.bfloat16, bitcast=True)
    else:
        v = q.to(tl.float8e4nv, bitcast=True).to(tl.bfloat16)
        s16 = sc.to(tl.int16)
        bits = tl.where(s16 == 0, 0x40, s16 << 7)          # 2^-127 is a bf16 subnormal
        bits = tl.where(s16 == 255, 0x7FC0, bits)          # e8m0 NaN
        return v * bits.to(tl.bfloat16, bitcast=True)
