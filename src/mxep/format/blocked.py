"""The blocked ("swizzled") layout of MXFP8 scales that Blackwell's block-scaled MMA reads
(``torch._scaled_grouped_mm`` on sm_100 with e8m0 scales): the cuBLAS "1D block scaling
factors layout", as torchao's ``mx_formats.utils.to_blocked`` writes it.

The row-major scales ``S [R, C]`` (``C = K // 32``, one e8m0 byte per 1x32 block of a row)
are cut into tiles of 128 rows x 4 columns (``R % 128 == 0``, ``C % 4 == 0``: the layout mxep
writes needs no padding inside a tile). Tiles are stored row-block-major, 512 bytes each, and
inside a tile the element ``(r, c)`` (``r < 128``, ``c < 4``) sits at byte
``(r % 32) * 16 + (r // 32) * 4 + c``::

    offset(row, col) = ((row // 128) * (C // 4) + col // 4) * 512
                       + (row % 32) * 16 + ((row % 128) // 32) * 4 + col % 4

Every 4 consecutive scale bytes of one row (one ``col // 4``) stay together: the permutation
moves 4-byte words, which is how the kernels write it.

For grouped tokens (groups along the rows) torchao converts each group separately
(``torchao.prototype.moe_training.kernels.mxfp8.quant.torch_to_blocked_2d_M_groups``: group
``i``'s rows padded with zero rows to a multiple of 128, converted with ``to_blocked``, placed at
the padded start of the group). When every group already holds a multiple of 128 rows and
starts on a multiple of 128 (mxep's layout with ``align % 128 == 0``), that is exactly
:func:`to_blocked_scales` of the whole matrix: the byte layout mxep's dispatch writes with
``scale_layout="blocked"``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["BLOCKED_ROWS", "BLOCKED_COLS", "SCALE_LAYOUTS", "check_scale_layout", "blocked_scale_offsets",
           "to_blocked_scales", "from_blocked_scales", "scale_offsets_jit"]

BLOCKED_ROWS = 128   # rows of one scale tile (the MMA's M tile of scale factors)
BLOCKED_COLS = 4     # scale columns of one tile (4 x 32 = 128 elements of K)
SCALE_LAYOUTS = ("row_major", "blocked")


def check_scale_layout(scale_layout: str) -> None:
    if scale_layout not in SCALE_LAYOUTS:
        raise ValueError(f"scale_layout must be one of {SCALE_LAYOUTS}, got {scale_layout!r}")


def _check_shape(rows: int, cols: int) -> None:
    if rows % BLOCKED_ROWS or cols % BLOCKED_COLS:
        raise ValueError(f"blocked scales need rows % {BLOCKED_ROWS} == 0 and scale columns % {BLOCKED_COLS} == 0 "
                         f"(hidden % 128 == 0), got [{rows}, {cols}]")


def blocked_scale_offsets(rows: torch.Tensor, cols: int) -> torch.Tensor:
    """Word offsets of the blocked layout: int64 ``rows [n]`` (scale rows) -> int64 ``[n, cols // 4]``,
    the index of each row's 4-byte words in the blocked tensor viewed as int32 (``cols`` scale
    columns per row, a multiple of 4). Word ``w`` of row ``r`` holds scale bytes
    ``[4w, 4w + 4)`` of that row."""
    nw = cols // BLOCKED_COLS
    rows = rows.to(torch.int64)[:, None]
    w = torch.arange(nw, device=rows.device, dtype=torch.int64)[None, :]
    return ((rows // BLOCKED_ROWS) * nw + w) * (BLOCKED_ROWS * BLOCKED_COLS // 4) + (rows % 32) * 4 + (rows % 128) // 32


def to_blocked_scales(scale: torch.Tensor) -> torch.Tensor:
    """Row-major scales ``[R, C]`` (any 1-byte dtype, ``R % 128 == 0``, ``C % 4 == 0``) -> the
    blocked layout, a new contiguous tensor of the same shape and dtype (the rows of the result
    mean nothing on their own: it is a byte array of ``R * C`` bytes). Equals
    ``torchao.prototype.mx_formats.utils.to_blocked(scale).view(R, C)``."""
    R, C = scale.shape
    _check_shape(R, C)
    t = scale.reshape(R // 128, 4, 32, C // 4, 4)               # [row block, r // 32, r % 32, col block, c]
    return t.permute(0, 3, 2, 1, 4).contiguous().view(R, C)    # [row block, col block, r % 32, r // 32, c]


def from_blocked_scales(blocked: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_blocked_scales`: blocked ``[R, C]`` -> row-major ``[R, C]`` (a copy)."""
    R, C = blocked.shape
    _check_shape(R, C)
    t = blocked.contiguous().view(R // 128, C // 4, 32, 4, 4)   # [row block, col block, r % 32, r // 32, c]
    return t.permute(0, 3, 2, 1, 4).contiguous().view(R, C)


@triton.jit
def scale_offsets_jit(rows, scols, n_scale_cols, BLOCKED: tl.constexpr):
    """Byte offsets of the scales ``(rows, scols)`` (int64 or int32 tensors or scalars that
    broadcast against each other, e.g. ``rows[:, None]`` and ``scols[None, :]``) in a
    ``[*, n_scale_cols]`` scale tensor: row-major (``rows * n_scale_cols + scols``) or, with
    ``BLOCKED``, the blocked layout above. Kernels that write the dispatch layout's scales address
    them through this, so the blocked bytes are written by the same store that would write the
    row-major ones: no extra pass."""
    r = rows.to(tl.int64)
    c = scols.to(tl.int64)
    if BLOCKED:
        return ((r // 128) * (n_scale_cols // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    return r * n_scale_cols + c
