"""Single-process oracle of the EP dispatch/combine layout contract (docs/layout.md).

No collectives, no devices: given every rank's per-expert counts (and rows), compute what
every destination rank must end up holding. Plain python loops on purpose; this is the
specification in executable form, not a fast path. Tests and the fused kernels' checks
compare against it bit for bit.

Vocabulary (see docs/layout.md):
    W ranks, E global experts, L = E // W local experts per rank; global expert g lives on rank
    g // L as local expert g % L. ``counts_per_rank[s][g]`` = rows source rank s sends to g;
    source rows are sorted by expert id.

Example (the worked example of docs/layout.md)::

    >>> layouts = simulate_dispatch_layout([torch.tensor([3, 0, 2, 1]),
    ...                                     torch.tensor([1, 0, 5, 0])], align=4)
    >>> layouts[1].group_end_offsets.tolist(), layouts[1].tokens_per_expert.tolist()
    ([8, 12], [7, 1])
    >>> layouts[1].src_rank.tolist()
    [0, 0, 1, 1, 1, 1, 1, -1, 0, -1, -1, -1]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

__all__ = [
    "DestLayout",
    "SimulatedDispatch",
    "count_matrix",
    "padded_group_size",
    "simulate_dispatch_layout",
    "destination_of_rows",
    "simulate_dispatch_rows",
    "simulate_dispatch_mxfp8",
    "simulate_combine",
]


@dataclass
class DestLayout:
    """What one destination rank holds after dispatch, row by row.

    Attributes:
        src_rank: int64 [R]; source rank of each row, -1 for pad rows.
        src_row: int64 [R]; row index inside that source rank's ``x``, -1 for pad rows.
        group_end_offsets: int32 [L]; cumulative padded group ends (``torch._grouped_mm`` offs).
        tokens_per_expert: int32 [L]; unpadded received rows per local expert.
    """

    src_rank: torch.Tensor
    src_row: torch.Tensor
    group_end_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor

    @property
    def num_rows(self) -> int:
        """R: total padded rows on this rank (== group_end_offsets[-1])."""
        return int(self.src_row.numel())

    @property
    def is_pad(self) -> torch.Tensor:
        return self.src_row < 0


class SimulatedDispatch(NamedTuple):
    """Expected MXFP8 dispatch output on one destination rank."""

    qdata: torch.Tensor  # float8_e4m3fn [R, H]
    scale: torch.Tensor  # float8_e8m0fnu [R, H // 32]
    group_end_offsets: torch.Tensor  # int32 [L]
    tokens_per_expert: torch.Tensor  # int32 [L]


def count_matrix(counts_per_rank: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack and validate per-rank counts -> the int64 [W, E] count matrix (on the CPU)."""
    if len(counts_per_rank) == 0:
        raise ValueError("counts_per_rank must hold one count vector per rank (world size >= 1)")
    rows = []
    for s, c in enumerate(counts_per_rank):
        c = torch.as_tensor(c)
        if c.dim() != 1 or c.is_floating_point() or c.is_complex():
            raise ValueError(f"counts of rank {s} must be a 1-D integer tensor [E], got {c.dtype} {tuple(c.shape)}")
        rows.append(c.detach().to("cpu", torch.int64))
    if len({r.numel() for r in rows}) != 1:
        raise ValueError(f"all ranks must give counts for the same number of experts, got {[r.numel() for r in rows]}")
    m = torch.stack(rows)
    w, e = m.shape
    if e == 0 or e % w != 0:
        raise ValueError(f"number of experts ({e}) must be a positive multiple of the world size ({w})")
    if (m < 0).any():
        raise ValueError("counts must be non-negative")
    return m


def padded_group_size(received: int, align: int) -> int:
    """Rows reserved for a local expert that receives ``received`` rows: max(round_up(c, align), align)."""
    return max(-(-received // align) * align, align)


def _check_align(align: int) -> None:
    if not isinstance(align, int) or align < 1:
        raise ValueError(f"align must be a positive int, got {align!r}")


def simulate_dispatch_layout(counts_per_rank: Sequence[torch.Tensor], align: int) -> list[DestLayout]:
    """The layout on every destination rank, built row by row from the contract's wording.

    Local expert e's group on rank d: rows of source rank 0 for expert g = d * L + e in their
    original order, then source rank 1, ...; then zero pad rows up to
    max(round_up(received, align), align). Groups are consecutive for e = 0..L-1.
    """
    _check_align(align)
    m = count_matrix(counts_per_rank).tolist()
    world, num_experts = len(m), len(m[0])
    local = num_experts // world
    # starts[s][g]: first row of expert g in source rank s's x (rows are sorted by expert).
    starts = []
    for s in range(world):
        acc, row = 0, []
        for g in range(num_experts):
            row.append(acc)
            acc += m[s][g]
        starts.append(row)

    layouts = []
    for d in range(world):
        src_rank: list[int] = []
        src_row: list[int] = []
        ends: list[int] = []
        received_per_expert: list[int] = []
        for e in range(local):
            g = d * local + e
            received = 0
            for s in range(world):
                for i in range(m[s][g]):
                    src_rank.append(s)
                    src_row.append(starts[s][g] + i)
                received += m[s][g]
            for _ in range(padded_group_size(received, align) - received):
                src_rank.append(-1)
                src_row.append(-1)
            ends.append(len(src_rank))
            received_per_expert.append(received)
        layouts.append(DestLayout(
            src_rank=torch.tensor(src_rank, dtype=torch.int64),
            src_row=torch.tensor(src_row, dtype=torch.int64),
            group_end_offsets=torch.tensor(ends, dtype=torch.int32),
            tokens_per_expert=torch.tensor(received_per_expert, dtype=torch.int32),
        ))
    return layouts


def destination_of_rows(counts_per_rank: Sequence[torch.Tensor], align: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Closed-form destinations (the formulas of docs/layout.md), per source rank.

    Returns, for each source rank s, ``(dest_rank int64 [n_s], dest_row int64 [n_s])``. For row i
    of rank s with expert g (``start[s, g] <= i < start[s, g] + C[s, g]``)::

        d = g // L,  e = g % L
        c[d, e]    = sum_s' C[s', g]                                   (tokens_per_expert)
        P[d, e]    = max(round_up(c[d, e], align), align)              (padded group size)
        base[d, e] = sum_{e' < e} P[d, e']                             (group start)
        dest_row   = base[d, e] + sum_{s' < s} C[s', g] + (i - start[s, g])

    Must agree with :func:`simulate_dispatch_layout` (tests check it).
    """
    _check_align(align)
    c_mat = count_matrix(counts_per_rank)
    world, num_experts = c_mat.shape
    local = num_experts // world
    received = c_mat.sum(0).view(world, local)  # c[d, e]
    padded = torch.clamp((received + align - 1) // align * align, min=align)  # P[d, e]
    base = (torch.cumsum(padded, 1) - padded).flatten()  # base[d, e] indexed by g
    before = torch.cumsum(c_mat, 0) - c_mat  # sum_{s' < s} C[s', g]
    start = torch.cumsum(c_mat, 1) - c_mat  # start[s, g]
    out = []
    for s in range(world):
        n_s = int(c_mat[s].sum())
        g = torch.repeat_interleave(torch.arange(num_experts), c_mat[s], output_size=n_s)
        i = torch.arange(n_s)
        out.append((g // local, base[g] + before[s, g] + (i - start[s, g])))
    return out


def simulate_dispatch_rows(xs: Sequence[torch.Tensor], counts_per_rank: Sequence[torch.Tensor],
                           align: int) -> list[torch.Tensor]:
    """Place raw rows (any dtype, e.g. bf16 or fp8 bytes) per the contract; pad rows are zero bytes.

    ``xs[s]`` is source rank s's ``[n_s, ...]`` tensor; returns ``[R_d, ...]`` per destination rank.
    """
    layouts = simulate_dispatch_layout(counts_per_rank, align)
    _check_rows(xs, counts_per_rank)
    return [_place(xs, lay) for lay in layouts]


def _check_rows(xs: Sequence[torch.Tensor], counts_per_rank: Sequence[torch.Tensor]) -> None:
    if len(xs) != len(counts_per_rank):
        raise ValueError(f"got {len(xs)} inputs for {len(counts_per_rank)} ranks")
    trailing = {tuple(x.shape[1:]) for x in xs}
    if len(trailing) != 1 or len({x.dtype for x in xs}) != 1:
        raise ValueError("all ranks' inputs must share trailing shape and dtype")
    for s, (x, c) in enumerate(zip(xs, counts_per_rank)):
        if x.shape[0] != int(torch.as_tensor(c).sum()):
            raise ValueError(f"rank {s}: x has {x.shape[0]} rows but its counts sum to {int(torch.as_tensor(c).sum())}")


def _place(xs: Sequence[torch.Tensor], layout: DestLayout) -> torch.Tensor:
    ref = xs[0]
    one_byte = ref.element_size() == 1 and ref.dtype != torch.uint8
    # Build in uint8 for 1-byte float types (CPU indexing/zeros of fp8 is not universally supported).
    srcs = [x.cpu().view(torch.uint8) if one_byte else x.cpu() for x in xs]
    out = torch.zeros((layout.num_rows, *ref.shape[1:]), dtype=srcs[0].dtype)  # pad rows: zero bytes
    for j in range(layout.num_rows):
        s = int(layout.src_rank[j])
        if s >= 0:
            out[j] = srcs[s][int(layout.src_row[j])]
    return out.view(ref.dtype) if one_byte else out


def simulate_dispatch_mxfp8(xs: Sequence[torch.Tensor], counts_per_rank: Sequence[torch.Tensor], align: int,
                            scale_mode: str = "rceil") -> list[SimulatedDispatch]:
    """Expected MXFP8 dispatch output on every destination rank.

    Each source's ``x [n_s, H]`` is quantized with the pure-torch reference quantizer (1x32 blocks
    along H; per row, so quantize-then-move == move-then-quantize), then rows are placed per the
    layout contract. Pad rows are zero bytes in qdata and in scale.
    """
    from mxep.format.naive import to_mxfp8_reference

    _check_rows(xs, counts_per_rank)
    layouts = simulate_dispatch_layout(counts_per_rank, align)
    qs, ss = [], []
    for x in xs:
        if x.dim() != 2 or x.shape[1] % 32 != 0:
            raise ValueError(f"each x must be [n, H] with H % 32 == 0, got {tuple(x.shape)}")
        q, s = to_mxfp8_reference(x.cpu().contiguous(), scale_mode)
        qs.append(q)
        ss.append(s)
    return [
        SimulatedDispatch(_place(qs, lay), _place(ss, lay), lay.group_end_offsets, lay.tokens_per_expert)
        for lay in layouts
    ]


def simulate_combine(outs_per_rank: Sequence[torch.Tensor], layouts: Sequence[DestLayout],
                     counts_per_rank: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of dispatch: expert-major rows back to their source ranks in original order.

    ``outs_per_rank[d]`` is ``[R_d, ...]`` on destination d (its pad rows are never read);
    returns ``[n_s, ...]`` per source rank s, row i = the output row that row i was sent to.
    """
    m = count_matrix(counts_per_rank)
    if len(outs_per_rank) != len(layouts) or len(layouts) != m.shape[0]:
        raise ValueError("need one output tensor and one layout per rank")
    trailing = tuple(outs_per_rank[0].shape[1:])
    dtype = outs_per_rank[0].dtype
    results = [torch.zeros((int(m[s].sum()), *trailing), dtype=dtype) for s in range(m.shape[0])]
    written = [torch.zeros(int(m[s].sum()), dtype=torch.int64) for s in range(m.shape[0])]
    for d, (out, lay) in enumerate(zip(outs_per_rank, layouts)):
        if out.shape[0] != lay.num_rows:
            raise ValueError(f"rank {d}: output has {out.shape[0]} rows, layout has {lay.num_rows}")
        out = out.cpu()
        for j in range(lay.num_rows):
            s = int(lay.src_rank[j])
            if s < 0:
                continue  # pad row: never read
            i = int(lay.src_row[j])
            results[s][i] = out[j]
            written[s][i] += 1
    for s, w in enumerate(written):
        if w.numel() and not bool((w == 1).all()):
            raise AssertionError(f"layouts do not cover source rank {s}'s rows exactly once")
    return results
