"""MXFP8 quantization: Triton kernel vs pure-torch reference (bit for bit), the reference vs an
independent slow oracle and hand-computed bytes, input validation, and MXFP8Tensor basics.

CPU runs use Triton's interpreter (``TRITON_INTERPRET=1``, as ``make test`` sets it); the
``gpu``-marked variants run the compiled kernel on CUDA (``make test-gpu``).
"""
from __future__ import annotations

import math
import os
import struct

import pytest
import torch

import mxep
from mxep._utils import triton_available_for
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.naive import to_mxfp8_reference
from mxep.format.quantize import to_mxfp8_rows
from mxep.format.naive import dequantize_mxfp8_reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

needs_kernel_cpu = pytest.mark.skipif(
    not triton_available_for(torch.empty(0)), reason="CPU kernel tests need TRITON_INTERPRET=1"
)
DEVICES = [
    pytest.param("cpu", marks=needs_kernel_cpu),
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not HAS_CUDA or INTERPRET,
                                                   reason="needs CUDA (and no interpreter)")]),
]
MODES = ["rceil", "floor"]
DTYPES = [torch.bfloat16, torch.float32]
# (M, K): small M for big K keeps the interpreter fast.
SHAPES = [(1, 32), (3, 32), (17, 32), (64, 32), (1, 64), (3, 64), (17, 64), (64, 64),
          (1, 2048), (3, 2048), (17, 2048), (64, 2048), (1, 5120), (3, 5120), (17, 5120),
          (1, 7168), (3, 7168)]
NAN, INF = float("nan"), float("inf")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8).cpu()


def assert_bitexact(got, want, what: str) -> None:
    g, w = u8(got), u8(want)
    assert g.shape == w.shape, f"{what}: shape {tuple(g.shape)} != {tuple(w.shape)}"
    bad = (g != w).nonzero()
    if bad.numel():
        idx = tuple(bad[0].tolist())
        raise AssertionError(f"{what}: {bad.shape[0]} byte(s) differ, first at {idx}: "
                             f"got 0x{int(g[idx]):02X} want 0x{int(w[idx]):02X}")


def run_kernel(x, mode, tiles=None, hw_cast=True):
    bm, bk = tiles if tiles else (None, None)
    return to_mxfp8_rows(x, mode, block_m=bm, block_k=bk, hw_cast=hw_cast)


def check_against_reference(x, mode, tiles=None):
    q, s = run_kernel(x, mode, tiles)
    qr, sr = to_mxfp8_reference(x, mode)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (x.shape[0], x.shape[1] // 32)
    assert_bitexact(s, sr, f"scale ({mode}, {x.dtype}, {tuple(x.shape)}, tiles={tiles})")
    assert_bitexact(q, qr, f"qdata ({mode}, {x.dtype}, {tuple(x.shape)}, tiles={tiles})")
    if x.is_cuda:   # the integer rounding (hw_cast=False) gives the hardware conversion's bytes
        q2, s2 = run_kernel(x, mode, tiles, hw_cast=False)
        assert_bitexact(s2, sr, f"scale, hw_cast=False ({mode}, {x.dtype}, {tuple(x.shape)})")
        assert_bitexact(q2, qr, f"qdata, hw_cast=False ({mode}, {x.dtype}, {tuple(x.shape)})")
    return q, s


def wide_range(m, k, dtype, device, seed):
    """randn per block times 2^[-40, 40) per block, times 2^[-12, 0] per element (so many
    elements land in e4m3's subnormal range or flush to zero)."""
    g = torch.Generator().manual_seed(seed)
    nb = k // 32
    x = torch.randn(m, nb, 32, generator=g)
    x = x * torch.pow(2.0, torch.randint(-40, 40, (m, nb, 1), generator=g).float())
    x = x * torch.pow(2.0, torch.randint(-12, 1, (m, nb, 32), generator=g).float())
    return x.reshape(m, k).to(dtype).to(device)


def with_specials(x):
    """Overwrite a few blocks with all-zero / negative-zero / NaN / +-Inf / carry-prone data."""
    x = x.clone()
    m, k = x.shape
    nb = k // 32
    blk = lambda r, b: (r, slice(32 * b, 32 * b + 32))  # noqa: E731
    specials = [
        lambda v: v.zero_(),
        lambda v: v.fill_(-0.0),
        lambda v: v.__setitem__(5, NAN),
        lambda v: v.__setitem__(31, INF),
        lambda v: v.__setitem__(0, -INF),
        # carries into the exponent once scaled: -31.13 (rceil: -249.04 -> -256), 15.5 * 2^k
        lambda v: v.copy_(torch.tensor([-31.13, 15.5, 31.5, 0.0157, 7.75, -3.875, 1.9375, 0.96875] * 4)),
    ]
    for r in range(m):
        for i, f in enumerate(specials):
            b = (r * 3 + i * 5) % nb
            if nb > 1 or r % len(specials) == i:
                f(x[blk(r, b)])
    return x


# ---------------------------------------------------------------------------------------------
# independent oracle (Python floats, no torch casts, no bit tricks shared with the code)
# ---------------------------------------------------------------------------------------------
def _e4m3_value(code: int) -> float:
    e, m = code >> 3, code & 7
    return (m / 8) * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)


E4M3_TABLE = [_e4m3_value(c) for c in range(0x7F)]  # finite non-negative codes 0x00..0x7E


def _round_e4m3(v: float) -> int:
    """Nearest e4m3 code to |v| (ties to the even code), saturated to 0x7E, sign bit from v."""
    a = abs(v)
    if a >= E4M3_TABLE[-1]:
        code = 0x7E
    else:
        hi = next(c for c, t in enumerate(E4M3_TABLE) if t >= a)
        lo = max(hi - 1, 0)
        dl, dh = a - E4M3_TABLE[lo], E4M3_TABLE[hi] - a
        code = lo if dl < dh else hi if dh < dl else (lo if lo % 2 == 0 else hi)
    return code | (0x80 if math.copysign(1.0, v) < 0 else 0)


def _f32(v: float) -> float:
    return struct.unpack("<f", struct.pack("<f", v))[0]


def oracle_block(vals, mode):
    """vals: 32 Python floats (exact fp32 values). Returns (element bytes, scale byte)."""
    if any(not math.isfinite(v) for v in vals):
        return [0x7F] * 32, 0xFF
    amax = max(abs(v) for v in vals)
    if amax == 0:
        b = 0
    elif mode == "rceil":
        d = _f32(amax * _f32(1 / 448))  # the fp32 product (exact in double, then rounded)
        mant, exp = math.frexp(d)  # d = mant * 2^exp, mant in [0.5, 1)
        ceil_log2 = exp - 1 if mant == 0.5 else exp
        b = max(ceil_log2 + 127, 0)
    else:
        floor_log2 = math.frexp(amax)[1] - 1
        b = max(floor_log2 - 8 + 127, 0)
    return [_round_e4m3(v * 2.0 ** (127 - b)) for v in vals], b


def oracle(x, mode):
    xs = x.float().reshape(-1, 32).tolist()
    qs, ss = zip(*(oracle_block(row, mode) for row in xs))
    q = torch.tensor(qs, dtype=torch.uint8).reshape(x.shape)
    s = torch.tensor(ss, dtype=torch.uint8).reshape(*x.shape[:-1], x.shape[-1] // 32)
    return q, s


def boundary_sweep():
    """fp32 values on, just below and just above every e4m3 rounding boundary (midpoints between
    consecutive codes, incl. the ties that carry into the next binade), 31 per block, each
    block completed with 448 so that the block factor is exactly 1 in both modes."""
    vals = []
    for c in range(0x7E):
        mid = (E4M3_TABLE[c] + E4M3_TABLE[c + 1]) / 2
        mid32 = torch.tensor(mid, dtype=torch.float32)
        vals += [mid, torch.nextafter(mid32, torch.tensor(0.0)).item(),
                 torch.nextafter(mid32, torch.tensor(1e9)).item(), E4M3_TABLE[c]]
    vals += [2.0 ** -10 * 0.5, 2.0 ** -12, 1e-30, 440.0, 447.9, 448.0]
    vals += [-v for v in vals]
    n = math.ceil(len(vals) / 62) * 62  # an even number of blocks -> rows of 64
    vals += [0.0] * (n - len(vals))
    x = torch.tensor(vals, dtype=torch.float32).reshape(-1, 31)
    x = torch.cat([x, torch.full((x.shape[0], 1), 448.0)], dim=1)
    return x.reshape(-1, 64)


# ---------------------------------------------------------------------------------------------
# kernel vs reference, bit for bit
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{k}" for m, k in SHAPES])
def test_kernel_matches_reference(device, mode, dtype, shape):
    m, k = shape
    x = with_specials(wide_range(m, k, dtype, device, seed=m * 7919 + k))
    check_against_reference(x, mode)
    if device == "cpu":  # also the GPU default tiling (8 x 512) and a tiny one, in the interpreter
        check_against_reference(x, mode, tiles=(8, 512))
        if m * k <= 64 * 64:
            check_against_reference(x, mode, tiles=(2, 32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_kernel_boundaries_and_edge_values(device, mode):
    # rounding boundaries / ties / carries, with several per-row power-of-two offsets
    sweep = boundary_sweep()
    rows = [sweep * 2.0 ** p for p in (0, -20, 37, -100, 90)]
    check_against_reference(torch.cat(rows).to(device), mode)
    # fp32 subnormal inputs, tiny normal amax (subnormal d under rceil), fp32 max
    tiny = torch.tensor([2.0 ** -149, 3 * 2.0 ** -149, 2.0 ** -130, -(2.0 ** -127), 2.0 ** -126,
                         1.5 * 2.0 ** -126, 2.0 ** -120, 2.0 ** -118, 1.75 * 2.0 ** -119,
                         225 * 2.0 ** -126, 224 * 2.0 ** -126, 3.4028234e38, -3.0e38, 1.0, 0.0, -0.0])
    g = torch.Generator().manual_seed(1)
    blocks = [tiny[i] * (1 + torch.rand(32, generator=g)) ** torch.randint(0, 3, (32,), generator=g)
              for i in range(len(tiny))]
    blocks += [torch.full((32,), float(v)) for v in tiny]
    x = torch.stack(blocks).reshape(-1, 64).to(device)
    check_against_reference(x, mode)
    check_against_reference(x.to(torch.bfloat16), mode)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # numpy on signalling NaNs
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_all_bf16_bit_patterns(device, mode):
    """Every bf16 value (incl. subnormals, +-0, +-Inf, NaNs), shuffled into blocks, and again
    sorted so blocks hold values of similar magnitude."""
    allbits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    perm = torch.randperm(allbits.numel(), generator=torch.Generator().manual_seed(0))
    check_against_reference(allbits[perm].reshape(-1, 2048).to(device), mode)
    finite = allbits[torch.isfinite(allbits.float())]
    finite = finite[: finite.numel() // 1024 * 1024]
    check_against_reference(finite.reshape(-1, 1024).contiguous().to(device), mode)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_blocks_isolated(device, mode):
    x = wide_range(4, 256, torch.bfloat16, device, seed=3)
    x[0, 33] = NAN
    x[1, 0] = INF
    x[2, 255] = -INF
    x[3, 64:96] = NAN
    q, s = check_against_reference(x, mode)
    nonfinite = {(0, 1), (1, 0), (2, 7), (3, 2)}
    qb, sb = u8(q).reshape(4, 8, 32), u8(s)
    clean_q, clean_s = to_mxfp8_reference(torch.nan_to_num(x, 0.0, 0.0, 0.0), mode)
    for r in range(4):
        for b in range(8):
            if (r, b) in nonfinite:
                assert int(sb[r, b]) == 0xFF and bool((qb[r, b] == 0x7F).all())
            else:  # other blocks of the same row are unaffected
                assert int(sb[r, b]) == int(u8(clean_s)[r, b])
                assert torch.equal(qb[r, b], u8(clean_q).reshape(4, 8, 32)[r, b])
    deq = dequantize_mxfp8_reference(q, s, torch.float32).reshape(4, 8, 32).cpu()
    for r, b in nonfinite:
        assert bool(deq[r, b].isnan().all())
    assert int(deq.isnan().sum()) == 32 * len(nonfinite)


@pytest.mark.parametrize("device", DEVICES)
def test_m_zero(device):
    for k in (0, 64):
        q, s = to_mxfp8_rows(torch.empty(0, k, dtype=torch.bfloat16, device=device), "rceil")
        assert q.shape == (0, k) and s.shape == (0, k // 32)
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    t = mxep.to_mxfp8(torch.empty(2, 0, 64, device=device))
    assert t.qdata.shape == (2, 0, 64) and t.scale.shape == (2, 0, 2)
    t = mxep.to_mxfp8(torch.empty(3, 0, device=device))
    assert t.qdata.shape == (3, 0) and t.scale.shape == (3, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_to_mxfp8_front_door(device, mode, monkeypatch):
    x = with_specials(wide_range(6, 128, torch.bfloat16, device, seed=11)).reshape(2, 3, 128)
    t = mxep.to_mxfp8(x, mode)
    assert isinstance(t, MXFP8Tensor) and t.shape == x.shape and t.dtype == torch.bfloat16
    assert t.qdata.shape == (2, 3, 128) and t.scale.shape == (2, 3, 4)
    qr, sr = to_mxfp8_reference(x, mode)
    assert_bitexact(t.qdata, qr, "to_mxfp8 qdata")
    assert_bitexact(t.scale, sr, "to_mxfp8 scale")
    if device == "cpu":  # no fallback on a plain CPU: a clear error says how to run the kernel
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert not triton_available_for(x)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mxep.to_mxfp8(x, mode)


# ---------------------------------------------------------------------------------------------
# the reference itself
# ---------------------------------------------------------------------------------------------
def _block(*head, fill=0.0):
    return torch.tensor(list(head) + [fill] * (32 - len(head)), dtype=torch.float32)


# (block values, mode, expected scale byte, expected leading element bytes), derived by hand:
HAND_CASES = [
    # fp32(1/448) = 0x3B124925 = (8/7)(1 + 0.375*2^-23)*2^-9, so 448*fp32(1/448) =
    # 1 + 0.375*2^-23 rounds to exactly 1.0 -> b = 127 (factor 1). 448 = 1.75*2^8 -> exp field
    # 8+7=15, mantissa 6 -> 0x7E; 1.0 -> exp 7 -> 0x38; -0.0 keeps its sign -> 0x80.
    ((448.0, 1.0, -0.0), "rceil", 0x7F, [0x7E, 0x38, 0x80]),
    # floor: E(448) = 135 -> b = 135 - 8 = 127.
    ((448.0, 1.0, -0.0), "floor", 0x7F, [0x7E, 0x38, 0x80]),
    # -31.13: d = 31.13/448 = 0.0695 in [2^-4, 2^-3), not a power of two -> b = 123 + 1 = 124,
    # v = -31.13 * 8 = -249.04, in [128, 256) e4m3 step 16: 256 is nearer than 240 -> the
    # rounding carries into the exponent: 2^8 -> (8+7) << 3 = 0x78, negative -> 0xF8.
    ((-31.13,), "rceil", 124, [0xF8, 0x00]),
    # floor: E(31.13) = 127 + 4 -> b = 123, v = -498.08 -> saturated to -448 -> 0xFE.
    ((-31.13,), "floor", 123, [0xFE]),
    # amax 1.0: d = fp32(1/448) = 1.14*2^-9, mantissa != 0 -> b = 118 + 1 = 119, factor 2^8:
    # 1.0 -> 256 -> 0x78; 15.5/256 * 256 = 15.5, tie between 15 (0x57, odd) and 16 (0x58) ->
    # even -> 0x58 (carry); 2^-17 * 256 = 2^-9 = min subnormal 0x01; 2^-18 -> 2^-10, a tie
    # between 0 and 2^-9 -> 0x00; 3*2^-18 -> 1.5 units of 2^-9 -> tie -> 2 -> 0x02;
    # 15*2^-18 -> 7.5 units -> tie -> 8 = min normal 0x08.
    ((1.0, 15.5 / 256, 2.0 ** -17, 2.0 ** -18, 3 * 2.0 ** -18, 15 * 2.0 ** -18), "rceil", 119,
     [0x78, 0x58, 0x01, 0x00, 0x02, 0x08]),
    # floor: E(1.0) = 127 -> b = 119, same factor 2^8 -> same bytes.
    ((1.0, 15.5 / 256, 2.0 ** -17, 2.0 ** -18, 3 * 2.0 ** -18, 15 * 2.0 ** -18), "floor", 119,
     [0x78, 0x58, 0x01, 0x00, 0x02, 0x08]),
    # floor with block max 1.875 (mantissa > 1.75): b = 119, v = 480 -> saturated 448 = 0x7E.
    ((1.875,), "floor", 119, [0x7E]),
    # rceil: d = 1.875 * 1.14*2^-9 = 2.14*2^-9 -> b = 119 + 1 = 120, v = 240 = 1.875*2^7 -> 0x77.
    ((1.875,), "rceil", 120, [0x77]),
    # all zero: b = 0 in both modes, elements 0x00 (and -0 -> 0x80).
    ((0.0, -0.0), "rceil", 0x00, [0x00, 0x80]),
    ((0.0, -0.0), "floor", 0x00, [0x00, 0x80]),
    # rceil, subnormal d: amax 2^-118 -> d = 1.14*2^-127, as a subnormal its mantissa is
    # 1.14*2^22 > 0x400000 -> b = 1 (2^-126 >= d), v = 2^-118 * 2^126 = 256 -> 0x78.
    ((2.0 ** -118,), "rceil", 1, [0x78]),
    # amax 2^-120 -> d = 1.14*2^-129, subnormal mantissa 1.14*2^20 <= 0x400000 -> b = 0,
    # v = 2^-120 * 2^127 = 128 -> 0x70.
    ((2.0 ** -120,), "rceil", 0, [0x70]),
    # floor: E(2^-120) = 7 -> b = max(7 - 8, 0) = 0 -> same.
    ((2.0 ** -120,), "floor", 0, [0x70]),
    # NaN / Inf anywhere: scale 0xFF, all elements 0x7F.
    ((1.0, NAN), "rceil", 0xFF, [0x7F, 0x7F, 0x7F]),
    ((-INF, 1.0), "floor", 0xFF, [0x7F, 0x7F, 0x7F]),
]


@pytest.mark.parametrize("vals,mode,sbyte,qbytes", HAND_CASES)
def test_reference_hand_computed(vals, mode, sbyte, qbytes):
    x = _block(*vals)
    q, s = to_mxfp8_reference(x, mode)
    assert int(u8(s)[0]) == sbyte
    assert u8(q)[: len(qbytes)].tolist() == qbytes
    oq, os_ = oracle(x, mode)  # and the oracle agrees with the hand derivation
    assert int(os_[0]) == sbyte and oq[: len(qbytes)].tolist() == qbytes


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_oracle(mode):
    x = torch.cat([
        with_specials(wide_range(8, 256, torch.float32, "cpu", seed=5)).reshape(-1, 64),
        boundary_sweep().reshape(-1, 64) * 2.0 ** -30,
        torch.tensor([2.0 ** -149, 2.0 ** -118, 224 * 2.0 ** -126, 3.4028234e38] * 16).reshape(-1, 64),
    ])
    q, s = to_mxfp8_reference(x, mode)
    oq, os_ = oracle(x, mode)
    assert_bitexact(s, os_, "reference scale vs oracle")
    assert_bitexact(q, oq, "reference qdata vs oracle")


def _normal_range_blocks(seed):
    """Blocks whose dynamic range is < 2^8, so that every scaled element is an e4m3 normal."""
    g = torch.Generator().manual_seed(seed)
    mag = (1 + torch.rand(64, 32, generator=g)) * torch.pow(2.0, torch.randint(0, 8, (64, 32), generator=g).float())
    sign = torch.where(torch.rand(64, 32, generator=g) < 0.5, -1.0, 1.0)
    blockscale = torch.pow(2.0, torch.randint(-60, 60, (64, 1), generator=g).float())
    return (mag * sign * blockscale).reshape(16, 128)


def test_reference_rceil_relative_error():
    x = _normal_range_blocks(0)
    q, s = to_mxfp8_reference(x, "rceil")
    deq = dequantize_mxfp8_reference(q, s, torch.float32)
    rel = ((deq - x).abs() / x.abs())
    assert float(rel.max()) <= 2.0 ** -4
    assert float(rel.max()) > 0  # not trivially exact


def test_reference_floor_saturates_only_above_1_75():
    x = _normal_range_blocks(1)
    q, s = to_mxfp8_reference(x, "floor")
    deq = dequantize_mxfp8_reference(q, s, torch.float32).reshape(-1, 32)
    xb = x.reshape(-1, 32)
    amax = xb.abs().amax(dim=1)
    fr_m, fr_e = torch.frexp(amax)  # amax = fr_m * 2^fr_e, fr_m in [0.5, 1)
    mant, pow2 = 2 * fr_m, torch.ldexp(torch.ones_like(amax), fr_e - 1)  # amax = mant * pow2
    i = xb.abs().argmax(dim=1)
    got = deq.gather(1, i[:, None]).squeeze(1).abs()
    over = mant > 1.75
    assert bool(over.any()) and bool((~over).any())
    # clipped to 1.75 * 2^floor(log2 amax) exactly when the mantissa exceeds 1.75...
    assert torch.equal(got[over], 1.75 * pow2[over])
    # ...otherwise the block max is only rounded (<= 2^-4 relative error)
    assert float(((got[~over] - amax[~over]) / amax[~over]).abs().max()) <= 2.0 ** -4
    # every element that fits (|x| <= 1.75 * 2^E(amax), i.e. scaled <= 448) keeps the normal
    # rounding bound; the others are clipped exactly to +-448 * scale
    fits = xb.abs() <= 1.75 * pow2[:, None]
    rel = ((deq - xb).abs() / xb.abs())
    assert float(rel[fits].max()) <= 2.0 ** -4
    clipped = (1.75 * pow2[:, None]).expand_as(xb)[~fits]
    assert torch.equal(deq.abs()[~fits], clipped)


# ---------------------------------------------------------------------------------------------
# validation (through the front door)
# ---------------------------------------------------------------------------------------------
def test_bad_inputs():
    with pytest.raises(ValueError):
        mxep.to_mxfp8(torch.randn(4, 33))
    with pytest.raises(ValueError):
        mxep.to_mxfp8(torch.randn(4, 48))
    with pytest.raises(TypeError):
        mxep.to_mxfp8(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError):
        mxep.to_mxfp8(torch.randn(4, 64).to(torch.float8_e4m3fn))
    with pytest.raises(TypeError):
        mxep.to_mxfp8(torch.randn(4, 64, dtype=torch.float16))
    with pytest.raises(ValueError):
        mxep.to_mxfp8(torch.randn(64, 64).t())
    with pytest.raises(ValueError):
        mxep.to_mxfp8(torch.randn(4, 128)[:, ::2])
    with pytest.raises(ValueError):
        mxep.to_mxfp8(torch.randn(4, 64), scale_mode="ceil")
    with pytest.raises(ValueError):
        mxep.to_mxfp8(torch.tensor(1.0))


# ---------------------------------------------------------------------------------------------
# MXFP8Tensor
# ---------------------------------------------------------------------------------------------
def test_mxfp8tensor_basics():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    t = mxep.to_mxfp8(x)
    assert t.qdata.dtype == torch.float8_e4m3fn and t.scale.dtype == torch.float8_e8m0fnu
    assert t.shape == (4, 64) and t.dtype == torch.bfloat16
    assert "MXFP8Tensor" in repr(t)
    deq = t.dequantize()
    assert deq.dtype == torch.bfloat16 and type(deq) is torch.Tensor
    assert float((deq.float() - x.float()).abs().max()) <= float(x.float().abs().max()) / 8
    d = t.detach()
    assert isinstance(d, MXFP8Tensor) and torch.equal(u8(d.qdata), u8(t.qdata))
    assert torch.equal((t + 1).float(), (deq + 1).float())  # other ops run on the dequantized value
    with pytest.raises(TypeError):
        MXFP8Tensor(t.qdata.view(torch.uint8), t.scale)
    with pytest.raises(ValueError):
        MXFP8Tensor(t.qdata, t.scale[:, :1])


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_mxfp8tensor_straight_through_grad(out_dtype):
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    x_q = mxep.to_mxfp8(x)
    x_q = MXFP8Tensor(x_q.qdata, x_q.scale, requires_grad=True)
    y = x_q.dequantize(out_dtype)
    assert y.dtype == out_dtype and y.requires_grad
    upstream = torch.randn(4, 64, dtype=torch.bfloat16).to(out_dtype)
    y.backward(upstream)
    assert x_q.grad is not None
    assert x_q.grad.dtype == torch.bfloat16
    assert torch.equal(x_q.grad, upstream.to(torch.bfloat16))


def test_quantize_is_a_registered_op():
    """torch.ops.mxep.to_mxfp8 passes torch.library's op checks (schema, fake/meta
    implementation, tracing) and matches the reference bit for bit."""
    import mxep.format.quantize  # noqa: F401  (registers the op)

    x = torch.randn(5, 96, dtype=torch.bfloat16)
    q, s = torch.ops.mxep.to_mxfp8(x, "rceil")
    qr, sr = to_mxfp8_reference(x, "rceil")
    assert torch.equal(q.view(torch.uint8), qr.view(torch.uint8)) and torch.equal(s.view(torch.uint8), sr.view(torch.uint8))
    torch.library.opcheck(torch.ops.mxep.to_mxfp8.default, (x, "floor"),
                          test_utils=("test_schema", "test_faketensor"))
    with torch._subclasses.fake_tensor.FakeTensorMode():
        fq, fs = torch.ops.mxep.to_mxfp8(torch.empty(7, 64, dtype=torch.bfloat16), "rceil")
        assert fq.shape == (7, 64) and fq.dtype == torch.float8_e4m3fn
        assert fs.shape == (7, 2) and fs.dtype == torch.float8_e8m0fnu


# ---------------------------------------------------------------------------------------------
# round trip (the MX weight cache's one-pass form): dequantize(quantize(x)) in one kernel
# ---------------------------------------------------------------------------------------------
def _folded_bits(t: torch.Tensor) -> torch.Tensor:
    b = t.view(torch.int16).clone()
    b[t.isnan()] = 0x7FC0
    return b.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 32), (17, 96), (5, 2080), (3, 7168)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_equals_quantize_then_dequantize(device, mode, dtype, shape):
    from mxep.format.quantize import mxfp8_round_trip
    m, k = shape
    x = with_specials(wide_range(m, k, dtype, "cpu", seed=m * 7 + k)).to(device)
    qr, sr = to_mxfp8_reference(x.cpu(), mode)
    want = dequantize_mxfp8_reference(qr, sr, torch.bfloat16)
    out = torch.full((m, k), 0x5A5A, dtype=torch.int16, device=device).view(torch.bfloat16)   # poison
    got = mxfp8_round_trip(x, mode, out=out)
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.bfloat16
    assert torch.equal(_folded_bits(got), _folded_bits(want))
    if device == "cuda":   # and equal to the two kernels it replaces (the weight cache's old path)
        from mxep.format.dequantize import dequantize_mxfp8_rows
        q, s = to_mxfp8_rows(x, mode)
        assert torch.equal(_folded_bits(got), _folded_bits(dequantize_mxfp8_rows(q, s)))


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_rejects_bad_input(device):
    from mxep.format.quantize import mxfp8_round_trip
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp8_round_trip(torch.randn(4, 40, device=device))
    with pytest.raises(ValueError, match="out must be"):
        mxfp8_round_trip(x, out=torch.empty(4, 64, device=device))   # fp32 out
    with pytest.raises(ValueError, match="scale_mode"):
        mxfp8_round_trip(x, "nearest")
