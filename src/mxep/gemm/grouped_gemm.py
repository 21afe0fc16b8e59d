"""Grouped GEMM over the dispatch layout: ``out[r] = dequant(tokens[r]) @ W[e(r)]^T``.

The tokens are the dispatch's output as it lands: MXFP8 rows ``[cap, K]`` (e4m3 bytes) with
e8m0 scales ``[cap, K/32]``, expert-major, group ends in ``group_end_offsets`` (int32 ``[L]``,
on the device). Hopper has no MX block-scaled MMA (the MXFP8 reference notes), so each tile is
dequantized in registers (exact: an e4m3 value times a power of two) and fed to bf16 tensor
cores with fp32 accumulation, which reproduces MX GEMM numerics. Every program rebuilds the
per-expert tile list from the group ends on the device (tiles never straddle two experts; a
group's last tile is partial), so there is no host sync and no permute, and any group padding
works.

Forward, two implementations of the same math (MX numerics on bf16 tensor cores, fp32
accumulation): ``"dequant"`` (default) dequantizes the rows up to the last group end in one
Triton pass (:mod:`mxep.format.dequantize`) and runs ``torch._grouped_mm``; ``"fused"`` is the
Triton kernel of this module, which dequantizes each tile in registers (no bf16 copy of the
tokens). Backward, in bf16 like the dispatch's (``torch._grouped_mm`` with the same device-side
group ends: no host sync): ``grad_tokens = dy @ W[e]`` per group (straight-through for the
tokens' quantization, as ``MXFP8Tensor.dequantize``) and ``grad_W[e] = dy[group]^T @
dequant(tokens[group])``. Only rows below ``group_end_offsets[-1]`` are read; pad rows hold
zeros, so they add nothing. The pure-torch reference is :mod:`mxep.gemm.naive`.

``"torchao"`` (optional, :mod:`mxep.integrations.torchao`): torchao's MXFP8 grouped GEMM on the
same tokens, on the MX tensor cores of sm_100+ (emulated elsewhere), with torchao's backward
recipe (MXFP8 input gradient, bf16 weight gradient) instead of the bf16 one above.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from mxep._utils import call_op, cdiv, has_mx_tensor_cores, next_power_of_2, require_triton
from mxep.format.dequantize import _dequantize_mxfp8_impl, dequantize_mxfp8_op
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.tile import fp32_to_bf16_bits, mxfp8_tile_to_bf16

__all__ = ["grouped_mm_mxfp8", "grouped_mm_layer", "resolve_impl", "GroupedMXFP8MatmulFunction",
           "expert_gemm_forward", "expert_gemm_backward", "weight_for_backward", "grouped_mm_mxfp8_forward", "GemmTiles", "GPU_TILES",
           "GPU_TILE_CANDIDATES", "INTERPRETER_TILES", "DECODES", "IMPLS"]


class GemmTiles(NamedTuple):
    """One launch configuration of the grouped GEMM.

    ``decode`` says how an MXFP8 tile becomes a tensor-core operand:
      * ``"int"``: integer bit decoding to fp32, times the scale, rounded to bf16 (the CPU
        interpreter's path: Triton 3.6's interpreter has no reliable fp8 casts or bf16 dots);
      * ``"cvt"``: the hardware e4m3 -> bf16 conversion, times the e8m0 scale as a bf16 power of
        two (exact: at most 4 significant bits), bf16 dot;
      * ``"dot_scaled"``: ``tl.dot_scaled`` (Triton lowers it on sm_90 to the same upcast + bf16
        MMA).
    ``group_m``: M tiles walked together before moving along N, so the tokens of a group of M
    tiles stay in L2 while the weight tiles stream (the classic swizzled grid)."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    group_m: int
    decode: str


DECODES = ("int", "cvt", "dot_scaled")
# Candidates measured by ``benchmarks/bench_grouped_gemm.py --sweep`` (and all checked against
# the reference by tests/gemm/test_grouped_gemm.py on a GPU), so the default is always a tested one.
# Dequantize + torch._grouped_mm beats all of them (the public op's default, impl="dequant").
GPU_TILE_CANDIDATES = (
    GemmTiles(128, 128, 64, 4, 3, 8, "cvt"),
    GemmTiles(128, 128, 64, 8, 3, 8, "cvt"),
    GemmTiles(128, 128, 64, 4, 4, 8, "cvt"),
    GemmTiles(128, 64, 64, 4, 4, 8, "cvt"),
    GemmTiles(128, 256, 64, 8, 3, 8, "cvt"),
    GemmTiles(64, 128, 64, 4, 4, 8, "cvt"),
    GemmTiles(64, 256, 64, 8, 3, 8, "cvt"),
    GemmTiles(128, 256, 64, 8, 3, 8, "dot_scaled"),
    GemmTiles(64, 128, 64, 4, 3, 8, "int"),
)
# 128x128x64, 4 warps: 4089 us, one H200, 33856 x 7168 -> 2048, 64 experts (docs/tuning.md)
GPU_TILES = GPU_TILE_CANDIDATES[0]
INTERPRETER_TILES = GemmTiles(16, 32, 32, 1, 1, 2, "int")


@triton.jit
def _k_step(acc, k0, q_rows, s_rows, w_cols, ws_cols, sw_rows, kk, ks, K, n_scale,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DECODE: tl.constexpr, BF16_DOT: tl.constexpr,
            W_MX: tl.constexpr):
    """One BLOCK_K step: ``acc += dequant(tokens[:, k0:k0+BLOCK_K]) @ W[e][:, k0:k0+BLOCK_K]^T``."""
    if EVEN_K:
        km = kk < BLOCK_K
        kms = ks < BLOCK_K // 32
    else:
        km = (k0 + kk) < K
        kms = (k0 // 32 + ks) < n_scale
    q = tl.load(q_rows + (k0 + kk)[None, :], mask=km[None, :], other=0)
    if DECODE == "dot_scaled":
        sa = tl.load(s_rows + (k0 // 32 + ks)[None, :], mask=kms[None, :], other=127)
        if W_MX:
            wq = tl.load(w_cols + (k0 + kk)[:, None], mask=km[:, None], other=0)
            sw = tl.load(sw_rows + (k0 // 32 + ks)[None, :], mask=kms[None, :], other=127)
            acc = tl.dot_scaled(q.to(tl.float8e4nv, bitcast=True), sa, "e4m3",
                                wq.to(tl.float8e4nv, bitcast=True), sw, "e4m3", acc)
        else:
            w = tl.load(w_cols + (k0 + kk)[:, None], mask=km[:, None], other=0.0)
            acc = tl.dot_scaled(q.to(tl.float8e4nv, bitcast=True), sa, "e4m3", w, None, "bf16", acc)
    else:
        sc = tl.load(s_rows + ((k0 + kk) // 32)[None, :], mask=km[None, :], other=127)
        a = mxfp8_tile_to_bf16(q, sc, DECODE)
        if W_MX:
            wq = tl.load(w_cols + (k0 + kk)[:, None], mask=km[:, None], other=0)
            wsc = tl.load(ws_cols + ((k0 + kk) // 32)[:, None], mask=km[:, None], other=127)
            w = mxfp8_tile_to_bf16(wq, wsc, DECODE)
        else:
            w = tl.load(w_cols + (k0 + kk)[:, None], mask=km[:, None], other=0.0)
        if BF16_DOT:
            acc += tl.dot(a, w)
        else:   # the CPU interpreter's bf16 dot is wrong (Triton 3.6); bf16 values are exact in fp32
            acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    return acc


@triton.jit
def _running_max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _grouped_mm_mxfp8_kernel(
    q_ptr, s_ptr, w_ptr, ws_ptr, out_ptr, group_end_ptr,
    cap, N, K, L,
    L_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    DECODE: tl.constexpr, BF16_DOT: tl.constexpr, W_MX: tl.constexpr, PIPELINE: tl.constexpr,
):
    # W_MX: the weights are MXFP8 too (e4m3 bytes [L, N, K], e8m0 scales [L, N, K/32], blocks
    # along K, as an MX GEMM wants them), dequantized in registers like the tokens; else bf16.
    # Tiles are cut per group (expert), not over the whole layout: group e's rows
    # [start_e, end_e) make cdiv(n_e, BLOCK_M) tiles, the last one partial (rows masked). So
    # BLOCK_M may exceed the layout's align (64-row wgmma tiles on align-32 layouts) with no
    # tile straddling two experts and no work wasted on another expert's rows. The tile list is
    # rebuilt by every program from the device-side group ends (an L-long cumsum): no host sync.
    pid = tl.program_id(0)
    ex = tl.arange(0, L_P)
    valid = ex < L
    # Group ends that do not describe the tokens (past their capacity, negative, decreasing:
    # never checked on the host, that needs a sync) are clamped here, as the dequantize kernel
    # clamps its row end: into [0, cap], then made monotone (a running max), so that no tile
    # reads or writes a row outside the tensors. Valid ends are left as they are.
    ends = tl.minimum(tl.maximum(tl.load(group_end_ptr + ex, mask=valid, other=0), 0), cap)
    starts = tl.minimum(tl.maximum(tl.load(group_end_ptr + ex - 1, mask=valid & (ex > 0), other=0), 0), cap)
    ends = tl.associative_scan(ends, 0, _running_max)
    starts = tl.associative_scan(starts, 0, _running_max)   # = the clamped end of the group before
    tiles_e = tl.where(valid, (ends - starts + BLOCK_M - 1) // BLOCK_M, 0)
    tiles_cum = tl.cumsum(tiles_e, axis=0)                  # inclusive
    num_m = tl.max(tiles_cum, axis=0)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.maximum(tl.minimum(num_m - first_m, GROUP_M), 1)
    tile_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    if tile_m < num_m:   # the grid is sized for the worst case; rows past the layout stay unwritten
        e = tl.sum((tiles_cum <= tile_m).to(tl.int32), axis=0)      # this tile's expert
        pick = ex == e
        row0 = tl.sum(tl.where(pick, starts + (tile_m - (tiles_cum - tiles_e)) * BLOCK_M, 0), axis=0)
        row_end = tl.sum(tl.where(pick, ends, 0), axis=0)
        rows = row0 + tl.arange(0, BLOCK_M)
        rows_in = rows < row_end
        rows = tl.where(rows_in, rows, row0)                  # clamp: loads stay in bounds, unmasked
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols_in = cols < N
        cols = tl.where(cols_in, cols, 0)
        kk = tl.arange(0, BLOCK_K)
        ks = tl.arange(0, BLOCK_K // 32)
        n_scale = K // 32
        q_rows = q_ptr + rows.to(tl.int64)[:, None] * K
        s_rows = s_ptr + rows.to(tl.int64)[:, None] * n_scale
        w_cols = w_ptr + e.to(tl.int64) * N * K + cols.to(tl.int64)[None, :] * K
        ws_cols = ws_ptr + e.to(tl.int64) * N * n_scale + cols.to(tl.int64)[None, :] * n_scale
        sw_rows = ws_ptr + e.to(tl.int64) * N * n_scale + cols.to(tl.int64)[:, None] * n_scale   # [BN, 1]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if PIPELINE:   # a counted loop: Triton software-pipelines its loads (num_stages)
            for k0 in range(0, K, BLOCK_K):
                acc = _k_step(acc, k0, q_rows, s_rows, w_cols, ws_cols, sw_rows, kk, ks, K, n_scale,
                              BLOCK_K, EVEN_K, DECODE, BF16_DOT, W_MX)
        else:          # the CPU interpreter cannot take a runtime bound in range() (Triton 3.6)
            k0 = 0
            while k0 < K:
                acc = _k_step(acc, k0, q_rows, s_rows, w_cols, ws_cols, sw_rows, kk, ks, K, n_scale,
                              BLOCK_K, EVEN_K, DECODE, BF16_DOT, W_MX)
                k0 += BLOCK_K
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :], fp32_to_bf16_bits(acc),
                 mask=rows_in[:, None] & cols_in[None, :])


def grouped_mm_mxfp8_forward(qdata: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor,
                             group_end_offsets: torch.Tensor, out: torch.Tensor | None = None,
                             tiles: GemmTiles | None = None, bf16_dot: bool | None = None,
                             weight_scale: torch.Tensor | None = None, pipeline: bool | None = None) -> torch.Tensor:
    """Launcher (shapes checked by :func:`mxep.grouped_mm_mxfp8`): ``qdata`` uint8/e4m3
    ``[cap, K]``, ``scale`` uint8/e8m0 ``[cap, K/32]``, ``weight`` bf16 ``[L, N, K]`` (or, with
    ``weight_scale`` uint8/e8m0 ``[L, N, K/32]``, uint8/e4m3 ``[L, N, K]``),
    ``group_end_offsets`` int32 ``[L]`` -> bf16 ``[cap, N]`` (rows past the last group end
    unwritten). ``tiles`` overrides the default :class:`GemmTiles` (tests and sweeps);
    ``bf16_dot`` / ``pipeline`` (default: on for CUDA tensors) let scripts/compile_sm90.py build
    the GPU code from CPU tensors."""
    cap, K = qdata.shape
    L, N, _ = weight.shape
    if out is None:
        out = torch.empty(cap, N, dtype=torch.bfloat16, device=qdata.device)
    if cap == 0 or N == 0:
        return out
    t = tiles or (GPU_TILES if qdata.is_cuda else INTERPRETER_TILES)
    if t.decode not in DECODES:
        raise ValueError(f"grouped GEMM: unknown decode {t.decode!r} (known: {DECODES})")
    bm = t.block_m
    bk = min(t.block_k, max(32, next_power_of_2(K)))
    # worst case of sum_e cdiv(n_e, bm) without reading the group ends: cap // bm + L
    grid = ((cap // bm + L) * cdiv(N, t.block_n),)
    _grouped_mm_mxfp8_kernel[grid](
        qdata.view(torch.uint8), scale.view(torch.uint8),
        weight if weight_scale is None else weight.view(torch.uint8),
        weight if weight_scale is None else weight_scale.view(torch.uint8),
        out.view(torch.int16), group_end_offsets, cap, N, K, L,
        L_P=max(next_power_of_2(L), 2), BLOCK_M=bm, BLOCK_N=t.block_n, BLOCK_K=bk,
        GROUP_M=t.group_m, EVEN_K=K % bk == 0,
        DECODE=t.decode, BF16_DOT=qdata.is_cuda if bf16_dot is None else bf16_dot,
        W_MX=weight_scale is not None, PIPELINE=qdata.is_cuda if pipeline is None else pipeline,
        num_warps=t.warps, num_stages=t.stages,
    )
    return out




IMPLS = ("auto", "dequant", "fused", "torchao")


def resolve_impl(impl: str, K: int, N: int, device: torch.device) -> str:
    """The implementation ``grouped_mm_mxfp8(..., impl)`` runs for a ``[L, N, K]`` weight on
    ``device``: ``"dequant"``, ``"fused"`` or ``"torchao"`` (host-side only;
    :class:`mxep.gemm.MXWeightCache` uses it to keep the weight in the form that implementation
    consumes). ``"auto"``: ``"torchao"`` on sm_100+ where torchao is installed and ``N`` is a
    multiple of 32 (the MX tensor cores), else ``"dequant"`` where ``torch._grouped_mm`` takes
    the shapes, else ``"fused"``."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    device = torch.device(device)
    # torchao quantizes the output gradient along N in blocks of 32: N must be a multiple of 32
    if has_mx_tensor_cores(device) and N % 32 == 0:
        from mxep.integrations.torchao import torchao_available
        if torchao_available():
            return "torchao"
    # torch._grouped_mm wants 16-byte strides (K, N multiples of 8) and, on CUDA, sm_90+.
    ok = K % 8 == 0 and N % 8 == 0
    if torch.device(device).type == "cuda":
        ok = ok and torch.cuda.get_device_capability(device) >= (9, 0)
    return "dequant" if ok else "fused"


def _resolve_impl(impl: str, tokens: MXFP8Tensor, N: int) -> str:
    if impl == "fused":
        require_triton(tokens.qdata, "grouped_mm_mxfp8(impl='fused') (impl='dequant' runs anywhere)")
    if impl == "torchao":   # fail here, with the extra's name, not deep inside the call
        from mxep.integrations.torchao import require_torchao
        require_torchao("grouped_mm_mxfp8(impl='torchao')")
        if N % 32:
            raise ValueError(f"grouped_mm_mxfp8(impl='torchao'): N={N} must be a multiple of 32 (torchao "
                             f"quantizes the output gradient in blocks of 32 along N); impl='dequant' takes it")
    return resolve_impl(impl, tokens.shape[1], N, tokens.device)


def _dequantize(qdata: torch.Tensor, scale: torch.Tensor, row_end: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 of MXFP8 rows ``[..., K]``: the one-pass kernel (stopping at ``row_end``) where Triton
    runs, else the torch expression (a CPU without the interpreter)."""
    qdata, scale = qdata.contiguous(), scale.contiguous()
    tensors = (qdata, scale) if row_end is None else (qdata, scale, row_end)
    return call_op(dequantize_mxfp8_op, _dequantize_mxfp8_impl, qdata, scale, row_end, tensors=tensors)


def _forward_dequant(qdata: torch.Tensor, scale: torch.Tensor, weight, group_end_offsets: torch.Tensor,
                     row_end: torch.Tensor) -> torch.Tensor:
    """Dequantize the layout's rows (one Triton pass, stopping at the last group end ``row_end``),
    then bf16 tensor cores through ``torch._grouped_mm`` on the same device-side offsets."""
    return expert_gemm_values(_dequantize(qdata, scale, row_end), weight, group_end_offsets)


def expert_gemm_values(x: torch.Tensor, weight, group_end_offsets: torch.Tensor) -> torch.Tensor:
    """The dequantizing forward from the tokens' MXFP8 values already decoded (bf16 ``[cap,
    K]``, e.g. by the SwiGLU kernel that quantized them): ``torch._grouped_mm`` on bf16 tensor
    cores -> bf16 ``[cap, N]``; ``weight`` bf16 ``[L, N, K]`` or an MXFP8Tensor of it."""
    if isinstance(weight, MXFP8Tensor):
        weight = _dequantize(weight.qdata, weight.scale)
    return torch._grouped_mm(x, weight.transpose(1, 2), offs=group_end_offsets)


def _fused_impl(qdata: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor,
                weight_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    return grouped_mm_mxfp8_forward(qdata, scale, weight, group_end_offsets, weight_scale=weight_scale)


# The fused kernel as a registered op (torch.compile keeps it as one opaque node).
_fused_op = torch.library.custom_op("mxep::grouped_mm_mxfp8_fused", _fused_impl, mutates_args=())


@_fused_op.register_fake
def _(qdata, scale, weight, group_end_offsets, weight_scale=None):
    return qdata.new_empty((qdata.shape[0], weight.shape[1]), dtype=torch.bfloat16)


def expert_gemm_forward(qdata: torch.Tensor, scale: torch.Tensor, weight, group_end_offsets: torch.Tensor,
                        row_end: torch.Tensor, impl: str) -> torch.Tensor:
    """The forward of one expert GEMM on a resolved ``impl`` (``"dequant"`` / ``"fused"``): MXFP8
    rows (``qdata`` e4m3 ``[cap, K]``, row-major ``scale`` e8m0 ``[cap, K / 32]``) times ``weight``
    (bf16 ``[L, N, K]`` or an MXFP8Tensor of it) -> bf16 ``[cap, N]``; ``row_end`` int32 ``[1]``
    the last group end. Outside autograd (the callers are autograd Functions)."""
    if impl == "dequant":
        return _forward_dequant(qdata, scale, weight, group_end_offsets, row_end)
    if isinstance(weight, MXFP8Tensor):
        args = (qdata, scale, weight.qdata, group_end_offsets, weight.scale)
    else:
        args = (qdata, scale, weight, group_end_offsets)
    return call_op(_fused_op, _fused_impl, *args, tensors=args)


def weight_for_backward(weight) -> tuple[torch.Tensor, ...]:
    """What :func:`expert_gemm_backward` needs of ``weight``, as tensors to save: ``(w,)`` for a
    bf16 weight, ``(qdata, scale)`` for an MXFP8Tensor (dequantized again in the backward)."""
    return (weight.qdata, weight.scale) if isinstance(weight, MXFP8Tensor) else (weight,)


def expert_gemm_backward(grad_out: torch.Tensor, qdata: torch.Tensor | None, scale: torch.Tensor | None,
                         weight: tuple, group_end_offsets: torch.Tensor, row_end: torch.Tensor, tokens_grad: bool,
                         weight_grad: bool, values: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The bf16 backward of :func:`expert_gemm_forward`: ``grad_out`` bf16 ``[cap, N]`` ->
    ``(grad_tokens bf16 [cap, K] (straight-through for the tokens' quantization) or None,
    grad_weight bf16 [L, N, K] or None)``; ``weight`` as :func:`weight_for_backward` gave it.
    ``values``: the tokens' MXFP8 values already decoded (bf16 ``[cap, K]``), which the weight
    gradient then multiplies instead of dequantizing ``qdata`` / ``scale``."""
    w = None if not tokens_grad else weight[0] if len(weight) == 1 else _dequantize(weight[0], weight[1])
    if grad_out.dtype != torch.bfloat16:   # (a no-op .to() is still a dispatched op)
        grad_out = grad_out.to(torch.bfloat16)
    grad_out = grad_out.contiguous()
    grad_tokens = grad_weight = None
    if tokens_grad:
        grad_tokens = torch._grouped_mm(grad_out, w, offs=group_end_offsets)                  # [cap, K]
    if weight_grad:
        x = values if values is not None else _dequantize(qdata, scale, row_end)
        grad_weight = torch._grouped_mm(grad_out.t(), x, offs=group_end_offsets)              # [L, N, K] bf16
    return grad_tokens, grad_weight


class GroupedMXFP8MatmulFunction(torch.autograd.Function):
    """``(tokens MXFP8Tensor [cap, K], weight [L, N, K], group_end_offsets int32 [L], impl,
    values=None, row_end=None)`` -> bf16 ``[cap, N]`` (see :func:`grouped_mm_mxfp8`).

    ``values``: what the GEMM multiplies by in place of ``weight``'s own values, in both passes
    (the MX weight cache's entry: bf16 ``[L, N, K]`` holding MXFP8 values, or an MXFP8Tensor);
    ``weight``'s gradient is then that of ``values``, straight through (the cache's entry needs
    no autograd node of its own). ``row_end``: ``group_end_offsets[-1:]`` (int32 ``[1]``) when
    the caller has it (one slice per layer instead of one per GEMM pass)."""

    @staticmethod
    def forward(ctx, tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor, impl: str,
                values: torch.Tensor | None = None, row_end: torch.Tensor | None = None):
        w = weight if values is None else values
        if row_end is None:
            row_end = group_end_offsets[-1:]
        ctx.save_for_backward(tokens.qdata, tokens.scale, group_end_offsets, row_end, *weight_for_backward(w))
        return expert_gemm_forward(tokens.qdata, tokens.scale, w, group_end_offsets, row_end, impl)

    @staticmethod
    def backward(ctx, grad_out):
        qdata, scale, offs, row_end, *w = ctx.saved_tensors
        grad_tokens, grad_weight = expert_gemm_backward(grad_out, qdata, scale, w, offs, row_end,
                                                        ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_tokens, grad_weight, None, None, None, None


def _check_operands(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor) -> None:
    if not isinstance(tokens, MXFP8Tensor):
        raise TypeError(f"tokens must be an MXFP8Tensor (DispatchResult.tokens), got {type(tokens).__name__}")
    if weight.dtype != torch.bfloat16:
        raise TypeError(f"weight must be bfloat16 (or an MXFP8Tensor of bf16), got {weight.dtype}")
    if tokens.dim() != 2 or weight.dim() != 3:
        raise ValueError(f"tokens must be [cap, K] and weight [L, N, K], got {tuple(tokens.shape)} and "
                         f"{tuple(weight.shape)}")
    K = tokens.shape[1]
    L, N, Kw = weight.shape
    if Kw != K:
        raise ValueError(f"weight's last dim {Kw} must equal the tokens' hidden size {K}")
    if group_end_offsets.dtype != torch.int32 or tuple(group_end_offsets.shape) != (L,):
        raise ValueError(f"group_end_offsets must be int32 [{L}] (one end per weight matrix), got "
                         f"{group_end_offsets.dtype} {tuple(group_end_offsets.shape)}")
    if weight.device != tokens.device or group_end_offsets.device != tokens.device:
        raise ValueError("tokens, weight and group_end_offsets must be on one device")


def grouped_mm_layer(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor, impl: str,
                     values: torch.Tensor | None = None, row_end: torch.Tensor | None = None) -> torch.Tensor:
    """The expert GEMM as :class:`mxep.MoE` runs it: :func:`grouped_mm_mxfp8` on a resolved
    ``impl`` (``"dequant"`` or ``"fused"``), optionally with the weight's cached MXFP8 form
    ``values`` (:meth:`mxep.gemm.MXWeightCache.values`: bf16 ``[L, N, K]`` holding the MXFP8
    weight's values for ``"dequant"``, an MXFP8Tensor for ``"fused"``) in place of ``weight``'s
    own values; ``weight`` (bf16 ``[L, N, K]``, or an MXFP8Tensor when ``values`` is None)
    receives the gradient, straight through. Bit for bit ``grouped_mm_mxfp8(tokens, cache(weight)
    if values given else weight, group_end_offsets, impl)``, with one autograd node fewer.
    ``row_end``: int32 ``[1]``, the last group end, when the caller has it (the layer's two GEMMs
    share one slice)."""
    _check_operands(tokens, weight, group_end_offsets)
    if impl not in ("dequant", "fused"):
        raise ValueError(f"grouped_mm_layer: impl must be 'dequant' or 'fused' (resolved), got {impl!r}")
    if values is not None and tuple(values.shape) != tuple(weight.shape):
        raise ValueError(f"values must have the weight's shape {tuple(weight.shape)}, got {tuple(values.shape)}")
    if values is None and not isinstance(weight, MXFP8Tensor):
        weight = weight.contiguous()
    if impl == "fused":
        require_triton(tokens.qdata, "grouped_mm_mxfp8(impl='fused') (impl='dequant' runs anywhere)")
    return GroupedMXFP8MatmulFunction.apply(tokens.with_row_major_scales(), weight, group_end_offsets, impl, values,
                                            row_end)


def grouped_mm_mxfp8(tokens: MXFP8Tensor, weight: torch.Tensor, group_end_offsets: torch.Tensor,
                     impl: str = "auto") -> torch.Tensor:
    """``out[r] = dequant(tokens[r]) @ weight[e]^T`` for every row ``r`` of expert ``e``'s group.

    Args:
        tokens: :class:`~mxep.MXFP8Tensor` ``[cap, K]`` in the dispatch layout (``DispatchResult.tokens``):
            e4m3 ``qdata [cap, K]``, e8m0 ``scale [cap, K / 32]``, groups in order, any padding;
            row-major or blocked scales (``tokens.scale_layout``; blocked ones are made row-major
            first, a copy of the scales).
        weight: bf16 ``[L, N, K]``, one ``[N, K]`` matrix per local expert (``L = E // world``), or an
            :class:`~mxep.MXFP8Tensor` of it (blocks of 32 along K, e.g. ``mxep.to_mxfp8(w)``): the
            MX GEMM's numerics for both operands; its gradient is returned in bf16 (straight-through).
            An MXFP8Tensor weight is dequantized at every call (with ``"dequant"``: in the forward
            and again in the backward). A weight used by many calls can be dequantized once
            instead and passed in bf16: a bf16 weight that holds MXFP8 values (``to_mxfp8(w).dequantize()``)
            is the same MX GEMM, bit for bit with ``"dequant"`` (the same ``torch._grouped_mm`` on
            the same bf16 values); :class:`mxep.gemm.MXWeightCache` keeps such a copy per weight
            version (``mxep.MoE(mx_weight_cache=True)``).
        group_end_offsets: int32 ``[L]`` on the tokens' device (``DispatchResult.group_end_offsets``);
            group ``e`` is rows ``[end[e-1], end[e])``.
        impl: ``"dequant"``: one Triton pass dequantizes the rows up to the last group end into
            a transient bf16 ``[cap, K]`` copy, then ``torch._grouped_mm`` (bf16 tensor cores);
            the fastest on H200 (docs/benchmarks.md). ``"fused"``: the Triton grouped GEMM
            dequantizes each tile in registers: no bf16 copy of the tokens (saves ``2 cap K``
            bytes of transient memory), slower. ``"auto"`` (default): ``"dequant"`` where
            ``torch._grouped_mm`` takes the shapes (K and N multiples of 8, sm_90+), else ``"fused"``;
            on sm_100+ with torchao installed, ``"torchao"``.
            ``"torchao"`` (the ``torchao`` extra): torchao's MXFP8 grouped GEMM
            (``_to_mxfp8_then_scaled_grouped_mm``) on the dispatched tokens: on sm_100+ the MX
            tensor cores (``torch._scaled_grouped_mm`` on the tokens' bytes, no second
            quantization), elsewhere torchao's emulation. torchao quantizes the weight itself,
            with RCEIL scales (torchao's and torchtitan's ``mxfp8_rceil`` recipe): pass it in
            bf16 (an MXFP8Tensor weight is dequantized first, which gives the same forward).
            Forward: bit for bit ``"dequant"`` with weight ``to_mxfp8(w)`` (emulated; tested).
            Backward: torchao's recipe, not the bf16 one above: the tokens' gradient is an MX GEMM (``dy`` quantized along its rows, ``W`` along N), the
            weight's is bf16 (``wgrad_with_hp=True``); both straight-through to the bf16 tokens
            and weight. Groups must be multiples of 32 rows (mxep's layout is), ``N`` a multiple of 32.

    Returns:
        bf16 ``[cap, N]``; rows ``[0, group_end_offsets[-1])`` hold the products (pad rows 0), later
        rows are unspecified (never computed). Differentiable w.r.t. ``tokens`` (bf16, straight-through) and
        ``weight``. No host sync (``"torchao"``: in mxep's part).

    Example::

        >>> import torch, mxep
        >>> x = torch.randn(64, 96).bfloat16()
        >>> tokens, offs = mxep.to_mxfp8(x), torch.tensor([32, 64], dtype=torch.int32)   # 2 experts
        >>> w = torch.randn(2, 40, 96).bfloat16()
        >>> mxep.grouped_mm_mxfp8(tokens, w, offs).shape
        torch.Size([64, 40])
    """
    _check_operands(tokens, weight, group_end_offsets)
    N = weight.shape[1]
    if not isinstance(weight, MXFP8Tensor):
        weight = weight.contiguous()
    # Blocked scales (a Buffer(scale_layout="blocked") dispatch, sm_100's layout): these kernels,
    # and torchao 0.18's weight gradient, index scales by row, so they get a row-major copy of the
    # scales (1/32 of the data bytes).
    tokens = tokens.with_row_major_scales()
    impl = _resolve_impl(impl, tokens, N)
    if impl == "torchao":
        from mxep.integrations.torchao import grouped_mm_torchao
        return grouped_mm_torchao(tokens, weight, group_end_offsets)
    return GroupedMXFP8MatmulFunction.apply(tokens, weight, group_end_offsets, impl)
