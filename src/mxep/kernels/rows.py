"""Row-movement kernels over peer memory (symmetric memory on GPUs, or a simulated world).

Addressing peers: every kernel gets a *local* base pointer (a kernel argument, so Triton knows it
is 16-byte aligned) and an int64 table ``delta[W]`` = (peer base address - local base address) in
elements. The row of rank ``r`` lives at ``base + delta[r] + row * stride``. Because every region
starts 256-byte aligned and rows are multiples of 16 bytes, ``delta + row * stride`` is a multiple
of 16 elements-bytes, which we tell the compiler (``tl.multiple_of``) so stores stay 16 bytes wide
even though the destination differs per row. The same code runs on one process holding several
"ranks'" buffers (the simulated world used by tests) and on real NVLink peers.

Kernels are persistent (grid = a fixed number of programs looping over row blocks) and read
their row bound from device memory where the host does not know it: no host sync, CUDA-graph safe.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from mxep.kernels._host import cdiv, next_power_of_2

from mxep.kernels.plan import route_rows
from mxep.kernels.signals import (CDONE_FLAG, CFREE_FLAG, PUSH_FLAG, TIMEOUT_COMBINE_DONE, TIMEOUT_COMBINE_FREE,
                                  TIMEOUT_PUSH, cseq_word, finish_program, max_spin, seq_word, wait_flags)

_PUSH_FLAG, _CFREE_FLAG, _CDONE_FLAG = tl.constexpr(PUSH_FLAG), tl.constexpr(CFREE_FLAG), tl.constexpr(CDONE_FLAG)
_TIMEOUT_PUSH = tl.constexpr(TIMEOUT_PUSH)
_TIMEOUT_COMBINE_FREE, _TIMEOUT_COMBINE_DONE = tl.constexpr(TIMEOUT_COMBINE_FREE), tl.constexpr(TIMEOUT_COMBINE_DONE)

__all__ = ["combine_push", "combine_pull", "combine_copy_out", "copy_out", "put_counts", "num_persistent_programs", "TUNING"]


# Persistent-grid knobs for the peer-store kernels; overridable for tuning (scripts/tune_dispatch.py).
# A block size of 8192 columns means "the whole row" (clamped to next_power_of_2(H)).
# Measured with scripts/tune_dispatch.py, config (a) (H=7168, 32768 rows/rank, uniform top-8 of
# 256), 2026-11-27 (single calls from the host, so each time includes ~100 us of launch):
#   MXFP8 push, 2 x H200: whole row (1 x 8192), 16/SM x 4 warps      441 us (276 GB/s per rank);
#       1 x 2048 at 16/SM x 8 warps (the earlier default) 530 us; prefetching the next row's load
#       in the loop: no gain (501 us whole-row, 522-582 us at 1 x 2048).
#   combine push (owner-row walk), 2 x H200: 1 x 8192, 16/SM x 8 warps   736 us (321 GB/s);
#       2 x 2048 at 8/SM: 729 us; 4 x 1024: 762 us (all within noise).
#   copy-out, 2 x H200: 8 x 1024, 16/SM x 8 warps   204 us (4 warps: 256 us).
#   pull combine kernel, 2 x H200: 2 x 4096, 32/SM x 4 warps   798 us (296 GB/s);
#       1 x 8192 at 16/SM x 8 warps: 912 us.
#   (4 x H200, earlier: 16/SM beat 4/SM by 1.3-1.4x on every kernel.)
TUNING = {
    "programs_per_sm": 16,
    # The dispatch push alone: more programs, more rows (bytes) in flight per SM. 4 x H200,
    # config (a) uniform, zero-copy dispatch (the push alone) with programs_per_sm 8 / 16 / 32
    # for all kernels, same machine (scripts/sweep_tuning.py, 2026-11-27): 589.0 / 559.9 /
    # 548.7 us; NCCL same bytes 606 us in each launch.
    "dispatch_programs_per_sm": 32,
    # 8 warps per whole-row program (32 columns per thread instead of 64): 4 x H200, config (a)
    # uniform, same machine (scripts/sweep_tuning.py, 2026-11-27, sync counts_flags): zero-copy
    # dispatch 546.6 -> 537.9 us (332 -> 338 GB/s per rank), regular 642.8 -> 634.3 us;
    # dispatch_programs_per_sm 64 instead: 540.8 / 636.8 us (docs/sweeps/dispatch-knobs.md).
    "dispatch_block_m": 1, "dispatch_block_k": 8192, "dispatch_warps": 8,
    "combine_block_m": 1, "combine_block_n": 8192, "combine_warps": 8,
    "copy_block_m": 8, "copy_block_n": 1024, "copy_warps": 8,
    "pull_block_m": 2, "pull_block_n": 4096, "pull_warps": 4, "pull_programs_per_sm": 32,
    # combine of a regular expert_out: "push" (owners store into the sources' combine regions,
    # sources copy out) or "pull" (owners stage into their own region, sources read over NVLink
    # straight into the output). The zero-copy input (Buffer.combine_input) always pulls.
    "combine_mode": "push",
    # Order in which the peer kernels (dispatch push, combine push, pull) walk their rows, which
    # are grouped by peer (docs/performance-notes.md #15-17). 4 x H200, config (a) uniform, same
    # runs: dispatch natural 896 / staggered 674 / spread 662 us; combine push 1693 / 1522 /
    # 1195 us; zero-copy pull 1550 / 1078 / 1103 us.
    #   "natural":   row 0 first: every rank starts on peer 0 (W - 1 senders into one receiver);
    #   "staggered": start at peer rank + 1 and wrap around: the peers form a permutation;
    #   "spread":    the row list cut into "spread_parts" equal parts, walked interleaved, so
    #                every rank talks to all its peers at once, in proportion to the rows.
    "peer_order": "spread",
    # Parts of the "spread" order: a window of P consecutive work items touches P / 16 rows in
    # each sixteenth of the list (at most 15 work items are skipped). 16 was chosen, not swept.
    "spread_parts": 16,
    # How the forward dispatch and the push combine order their phases across ranks
    # (kernels/signals.py):
    #   "barrier": dispatch = put_counts, barrier, plan, push, barrier, copy-out (6 launches);
    #              combine = barrier, push, barrier, copy-out (4);
    #   "flags":   dispatch = plan (exchanges the counts itself), push (its last program raises
    #              a flag on every owner), copy-out (waits for the flags): 3 launches; combine =
    #              push (waits for the sources' free flags), copy-out: 2. No barrier.
    #   "counts_flags": the dispatch's counts travel as in "flags" (the plan kernel exchanges
    #              them and waits for every rank's row: one launch instead of put_counts,
    #              barrier, plan); the push is followed by a barrier as in "barrier" (no
    #              grid-wide ticket, no polls): plan, push, barrier, copy-out (4 launches);
    #              combine as "barrier".
    # "flags" passes every CPU and GPU test but measured no faster: 4 x H200, same run, (a)
    # dispatch 638.6 vs 647.1 us, combine 1194.6 vs 1195.3; (c) under graph replay dispatch
    # 51.6 vs 42.3 us, combine 60.4 vs 51.3 (docs/performance-notes.md, fifth round).
    # "counts_flags" (the default) keeps what was cheap in "flags" and drops the rest: 4 x H200,
    # same run (barrier / counts_flags), (c) dispatch eager 52.2 / 48.5 us, graph 42.1 / 41.0;
    # world 2: 51.0 / 46.7, 42.1 / 39.6; (a) within noise (647.0 / 645.1, graph 653.2 / 638.2).
    "sync": "counts_flags",
}

PEER_ORDERS = ("natural", "staggered", "spread")
SYNC_MODES = ("barrier", "flags", "counts_flags")
# The modes whose plan kernel exchanges the counts itself (every plan must then be dispatched).
COUNTS_BY_FLAGS = ("flags", "counts_flags")


def order_flags() -> tuple[bool, int]:
    """``(STAGGER, SPREAD)`` constexprs of ``TUNING["peer_order"]`` / ``["spread_parts"]``."""
    order = TUNING["peer_order"]
    return order == "staggered", TUNING["spread_parts"] if order == "spread" else 1


@triton.jit
def work_item(u, total, rot, SPREAD: tl.constexpr):
    """Item of the ``u``-th step of a walk over items ``[0, total)`` (``total``: past the end,
    for the at most SPREAD - 1 steps of the spread order that have no item). SPREAD = 1: item
    ``u + rot`` wrapped around (rot = 0: natural order); else the transposed order
    ``(u % SPREAD) * ceil(total / SPREAD) + u // SPREAD``. Steps run ``u < steps(total)``."""
    if SPREAD > 1:
        m = tl.cdiv(total, SPREAD)
        q = u // SPREAD
        t = (u - q * SPREAD) * m + q
        t = tl.where(t < total, t, total)
    else:
        t = u + rot
        t = tl.where(t >= total, t - total, t)
    return t


@triton.jit
def work_steps(total, SPREAD: tl.constexpr):
    if SPREAD > 1:
        return tl.cdiv(total, SPREAD) * SPREAD
    else:
        return total


def _apply_env_tuning(env: str | None) -> None:
    """``MXEP_TUNING='{"combine_block_n": 1024}'`` overrides knobs for a whole process (and the
    torchrun workers it starts): for sweeps on a machine without editing code. Unknown keys and
    wrong types raise at import, so a typo cannot silently measure the defaults."""
    if not env:
        return
    import json

    over = json.loads(env)
    if not isinstance(over, dict):
        raise ValueError(f"MXEP_TUNING must be a JSON object, got {env!r}")
    for k, v in over.items():
        if k not in TUNING:
            raise ValueError(f"MXEP_TUNING: unknown knob {k!r} (known: {sorted(TUNING)})")
        if type(v) is not type(TUNING[k]):
            raise ValueError(f"MXEP_TUNING: {k} must be {type(TUNING[k]).__name__}, got {v!r}")
        if k == "combine_mode" and v not in ("push", "pull"):
            raise ValueError(f"MXEP_TUNING: combine_mode must be 'push' or 'pull', got {v!r}")
        if k == "sync" and v not in SYNC_MODES:
            raise ValueError(f"MXEP_TUNING: sync must be one of {SYNC_MODES}, got {v!r}")
        if k == "peer_order" and v not in PEER_ORDERS:
            raise ValueError(f"MXEP_TUNING: peer_order must be one of {PEER_ORDERS}, got {v!r}")
        if isinstance(v, int) and not isinstance(v, bool) and (v <= 0 or (k.endswith(("_block_m", "_block_n", "_block_k", "_warps")) and v & (v - 1))):
            raise ValueError(f"MXEP_TUNING: {k} must be a positive power of two, got {v}")
    TUNING.update(over)


_apply_env_tuning(os.environ.get("MXEP_TUNING"))


def num_persistent_programs(device: torch.device, per_sm: int | None = None) -> int:
    """Programs of a persistent grid: a few per SM on GPUs; a handful under the CPU interpreter
    (which runs programs one after another, so more programs only add overhead)."""
    if device.type == "cuda":
        per_sm = per_sm or TUNING["programs_per_sm"]
        return torch.cuda.get_device_properties(device).multi_processor_count * per_sm
    return 4


@triton.jit
def _combine_push_kernel(
    src_ptr, H, rank, N, capacity,
    row_base_ptr, src_end_ptr, E,
    dst_base_ptr, dst_delta_ptr, out_ptr, sig_ptr, sig_delta_ptr,
    W: tl.constexpr, W_P: tl.constexpr, L: tl.constexpr, E_P: tl.constexpr, STAGGER: tl.constexpr,
    SPREAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPROG: tl.constexpr,
    FLAGS: tl.constexpr, MAX_SPIN: tl.constexpr,
):
    # The owner walks the rows it received, source by source: source s sent it its rows
    # [lo[s], hi[s]) (its rows for this owner's experts, contiguous since sources sort by
    # expert). Work item k is row lo[s] + (k - start[s]) of source s, whose position in this
    # owner's dispatch layout is the dispatch's own route (route_rows); its row there is read
    # and stored back at row i of the source's combine region. Pad rows are never read.
    # Order (TUNING["peer_order"]): STAGGER lists the sources as rank + 1, rank + 2, ... (own
    # tokens last) so that the owners store into distinct sources at every moment; SPREAD walks
    # the list interleaved (work_item) so that every owner stores into all sources at once.
    pid = tl.program_id(0)
    if FLAGS:  # the "flags" sync (kernels/signals.py): every source has copied out the previous combine
        c = tl.load(sig_ptr + cseq_word(W)) + 1
        wait_flags(sig_ptr, _CFREE_FLAG, c - 1, rank, _TIMEOUT_COMBINE_FREE, W, MAX_SPIN)
    s_idx = tl.arange(0, W_P)
    sm = s_idx < W
    hi = tl.load(src_end_ptr + s_idx * E + (rank + 1) * L - 1, mask=sm, other=0)
    lo = tl.load(src_end_ptr + s_idx * E + rank * L - 1, mask=sm & (rank > 0), other=0)
    cnt = tl.where(sm, tl.minimum(tl.maximum(hi - lo, 0), N), 0)   # clamped: bogus counts stay bounded
    if STAGGER:
        key = (s_idx + W - 1 - rank) % W
    else:
        key = s_idx
    key = tl.where(sm, key, W_P + s_idx)
    start = tl.sum(tl.where(key[None, :] < key[:, None], cnt[None, :], 0), axis=1)   # [W_P]
    stop = start + cnt
    total = tl.sum(cnt, axis=0)
    num_blocks = tl.cdiv(total, BLOCK_M)
    u = pid
    while u < work_steps(num_blocks, SPREAD):
        blk = work_item(u, num_blocks, 0, SPREAD)
        k = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        live = k < total
        hit = (start[None, :] <= k[:, None]) & (k[:, None] < stop[None, :]) & sm[None, :]
        src = tl.sum(tl.where(hit, s_idx[None, :], 0), axis=1)
        i = k + tl.sum(tl.where(hit, (lo - start)[None, :], 0), axis=1)       # the source's row
        g, prow = route_rows(row_base_ptr, src_end_ptr, src, i, live, E, E_P)
        # inconsistent counts: never read or write outside
        ok = live & (g < E) & ((g // L) == rank) & (prow >= 0) & (prow < capacity) & (i >= 0) & (i < N)
        # Rows of this rank's own tokens go straight into its output (the copy-out skips them).
        own = src == rank
        # src is in [0, W): no mask (a masked load here trips Triton 3.6's layout pass at
        # BLOCK_M = 1, "mask type matches ptr type"; caught by tests/test_sm90_compile.py).
        delta = tl.load(dst_delta_ptr + src)
        dst_off = tl.multiple_of(delta + i.to(tl.int64) * H, 16)
        own_off = tl.multiple_of(i.to(tl.int64) * H, 16)
        src_off = prow.to(tl.int64) * H
        c0 = 0
        while c0 < H:
            cols = c0 + tl.arange(0, BLOCK_N)
            cm = (cols < H)[None, :]
            v = tl.load(src_ptr + src_off[:, None] + cols[None, :], mask=ok[:, None] & cm,
                        eviction_policy="evict_first")
            tl.store(dst_base_ptr + dst_off[:, None] + cols[None, :], v, mask=(ok & ~own)[:, None] & cm)
            tl.store(out_ptr + own_off[:, None] + cols[None, :], v, mask=(ok & own)[:, None] & cm)
            c0 += BLOCK_N
        u += NPROG
    if FLAGS:  # the last program to finish tells every source its rows are there
        finish_program(sig_ptr, sig_delta_ptr, rank, _CDONE_FLAG, c, W, W_P, NPROG, False)


def combine_push(src: torch.Tensor, plan, rank: int, max_tokens_per_rank: int, capacity: int,
                 dst_base: torch.Tensor, dst_delta: torch.Tensor, out: torch.Tensor,
                 signals: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Owner side of the combine: every row of this rank's dispatch layout ``src [cap, H]`` that
    holds a real token goes back to row ``i`` of its source's ``dst_base [N + 1, H]`` region
    (rank r's at ``dst_base + dst_delta[r]`` elements), or, for this rank's own tokens, straight
    into row ``i`` of ``out [n, H]`` (this rank's combine output). Pad rows are never read; the
    work is the rows this rank received (bound read on the device), not ``W * N``.

    ``signals`` (the "flags" sync, :mod:`mxep.kernels.signals`): ``(words, delta_i32)``; wait
    until every source has copied out the previous combine, and raise this rank's completion
    flag on every source at the end. None: the caller orders the phases with barriers."""
    H = src.shape[1]
    W, E = plan.src_end.shape
    L = E // W
    if (max_tokens_per_rank == 0 or capacity == 0) and signals is None:
        return
    block_m, block_n = TUNING["combine_block_m"], TUNING["combine_block_n"]
    nprog = min(num_persistent_programs(src.device), cdiv(capacity, block_m))
    src_arg = src.view(torch.int16) if src.dtype == torch.bfloat16 else src
    dst_arg = dst_base.view(torch.int16) if dst_base.dtype == torch.bfloat16 else dst_base
    out_arg = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    stagger, spread = order_flags()
    _combine_push_kernel[(nprog,)](
        src_arg, H, rank, max_tokens_per_rank, capacity, plan.row_base, plan.src_end, E,
        dst_arg, dst_delta, out_arg, *(signals if signals is not None else (plan.recv, dst_delta)),
        W=W, W_P=max(next_power_of_2(W), 2), L=L, E_P=max(next_power_of_2(E), 2),
        STAGGER=stagger, SPREAD=spread,
        BLOCK_M=block_m, BLOCK_N=min(block_n, next_power_of_2(H)), NPROG=nprog,
        FLAGS=signals is not None, MAX_SPIN=max_spin(src.device.type),
        num_warps=TUNING["combine_warps"],
    )


@triton.jit
def _combine_gather_kernel(
    src_base_ptr, src_delta_ptr, out_ptr, n_rows, H, rank, capacity,
    row_base_ptr, src_end_ptr, E, sig_ptr, sig_delta_ptr,
    FROM_OWNERS: tl.constexpr, STAGGER: tl.constexpr, SPREAD: tl.constexpr, L: tl.constexpr, E_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NPROG: tl.constexpr,
    FLAGS: tl.constexpr, W: tl.constexpr, W_P: tl.constexpr, MAX_SPIN: tl.constexpr,
):
    # The source side of the combine, writing out[i] for this rank's rows i. Row i went to
    # expert g on owner g // L, at row row_base[rank, g] + i of the owner's dispatch layout (the
    # dispatch's own routing, read backwards).
    # FROM_OWNERS (pull combine): read that row in the owner's region over NVLink.
    # else (after the push combine): read row i of the local combine region, for rows that came
    #   from other owners; rows of this rank's own experts were written into out by the push.
    # Rows with an invalid route (inconsistent counts) read nothing and come out zero.
    # FLAGS (after a "flags" push combine, kernels/signals.py): wait for every owner's completion
    # flag first; the last program to finish frees this rank's combine region for the next one.
    # Order (pull; TUNING["peer_order"]): STAGGER starts at the first row owned by rank + 1,
    # wrapping around, so that the sources read from distinct owners at every moment; SPREAD
    # interleaves the walk (work_item) so that every source reads from all owners at once.
    pid = tl.program_id(0)
    if FLAGS:
        c = tl.load(sig_ptr + cseq_word(W)) + 1
        wait_flags(sig_ptr, _CDONE_FLAG, c, rank, _TIMEOUT_COMBINE_DONE, W, MAX_SPIN)
    num_blocks = tl.cdiv(n_rows, BLOCK_M)
    rot = 0
    if STAGGER:
        rot = tl.load(src_end_ptr + rank * E + (rank + 1) * L - 1) // BLOCK_M
    u = pid
    while u < work_steps(num_blocks, SPREAD):
        b = work_item(u, num_blocks, rot, SPREAD)
        rows = b * BLOCK_M + tl.arange(0, BLOCK_M)
        in_range = rows < n_rows
        src = tl.zeros([BLOCK_M], tl.int32) + rank
        g, prow = route_rows(row_base_ptr, src_end_ptr, src, rows, in_range, E, E_P)
        ok = in_range & (g < E) & (prow >= 0) & (prow < capacity)   # never read outside
        out_off = rows.to(tl.int64) * H
        if FROM_OWNERS:
            delta = tl.load(src_delta_ptr + g // L, mask=ok, other=0)
            src_off = tl.multiple_of(delta + prow.to(tl.int64) * H, 16)
            write = in_range
        else:
            src_off = out_off
            own = ok & ((g // L) == rank)
            ok = ok & ~own
            write = in_range & ~own
        c0 = 0
        while c0 < H:
            cols = c0 + tl.arange(0, BLOCK_N)
            cm = (cols < H)[None, :]
            v = tl.load(src_base_ptr + src_off[:, None] + cols[None, :], mask=ok[:, None] & cm, other=0,
                        eviction_policy="evict_first")
            tl.store(out_ptr + out_off[:, None] + cols[None, :], v, mask=write[:, None] & cm)
            c0 += BLOCK_N
        u += NPROG
    if FLAGS:
        finish_program(sig_ptr, sig_delta_ptr, rank, _CFREE_FLAG, c, W, W_P, NPROG, True)


def _combine_gather(src_base, src_delta, plan, rank, out, capacity, from_owners, knobs, signals=None):
    n, H = out.shape
    W, E = plan.src_end.shape
    if n == 0 and signals is None:
        return out
    block_m, block_n, warps, per_sm = (TUNING[k] for k in knobs)
    stagger, spread = order_flags()
    # with signals, even a rank with no rows launches: its free flags must go up
    nprog = max(1, min(num_persistent_programs(out.device, per_sm), cdiv(n, block_m)))
    _combine_gather_kernel[(nprog,)](
        src_base.view(torch.int16), src_delta, out.view(torch.int16), n, H, rank, capacity,
        plan.row_base, plan.src_end, E, *(signals if signals is not None else (plan.recv, src_delta)),
        FROM_OWNERS=from_owners,
        STAGGER=from_owners and stagger, SPREAD=spread if from_owners else 1, L=E // W,
        E_P=max(next_power_of_2(E), 2), BLOCK_M=block_m, BLOCK_N=min(block_n, next_power_of_2(H)),
        NPROG=nprog, FLAGS=signals is not None, W=W, W_P=max(next_power_of_2(W), 2),
        MAX_SPIN=max_spin(out.device.type), num_warps=warps,
    )
    return out


def combine_pull(src_base: torch.Tensor, src_delta: torch.Tensor, plan, rank: int, out: torch.Tensor,
                 capacity: int) -> torch.Tensor:
    """Source side of the pull combine: read this rank's ``n`` rows back from their owners'
    dispatch-layout regions (bf16 ``[cap, H]`` at ``src_base + src_delta[owner]`` elements)
    into ``out`` (regular bf16 ``[n, H]``), original row order."""
    return _combine_gather(src_base, src_delta, plan, rank, out, capacity, True,
                           ("pull_block_m", "pull_block_n", "pull_warps", "pull_programs_per_sm"))


def combine_copy_out(region: torch.Tensor, plan, rank: int, out: torch.Tensor, capacity: int,
                     signals: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Source side of the push combine, after its barrier: copy the rows that other owners
    stored in this rank's combine region ``region [>= n, H]`` into ``out [n, H]``; rows of this
    rank's own experts are already there (written by :func:`combine_push`). ``signals``
    (``(words, delta_i32)``, the "flags" sync): instead of a barrier before, wait for every
    owner's completion flag; afterwards raise this rank's free flag on every owner."""
    # (no peer addressing of rows on this path: plan.row_base only fills the unused delta argument)
    return _combine_gather(region, plan.row_base, plan, rank, out, capacity, False,
                           ("copy_block_m", "copy_block_n", "copy_warps", "programs_per_sm"), signals)


@triton.jit
def _copy_rows_masked(src_ptr, dst_ptr, rows, n_cols, data, live, BLOCK_N: tl.constexpr):
    off = rows.to(tl.int64) * n_cols
    c0 = 0
    while c0 < n_cols:
        cols = c0 + tl.arange(0, BLOCK_N)
        cm = (cols < n_cols)[None, :]
        v = tl.load(src_ptr + off[:, None] + cols[None, :], mask=data[:, None] & cm, other=0)
        tl.store(dst_ptr + off[:, None] + cols[None, :], v, mask=live[:, None] & cm)
        c0 += BLOCK_N


@triton.jit
def _copy_out_kernel(src_ptr, dst_ptr, n_cols, src2_ptr, dst2_ptr, n_cols2, capacity, group_end_ptr, recv_ptr,
                     recv_cum_ptr, rank, E, sig_ptr,
                     WAIT: tl.constexpr, W: tl.constexpr, MAX_SPIN: tl.constexpr,
                     HAS_SECOND: tl.constexpr, SKIP_OWN: tl.constexpr, PADS: tl.constexpr, ALIGN: tl.constexpr, L: tl.constexpr,
                     L_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                     NPROG: tl.constexpr):
    pid = tl.program_id(0)
    if WAIT:  # the "flags" sync: every other rank's push of this call has landed (kernels/signals.py)
        wait_flags(sig_ptr, _PUSH_FLAG, tl.load(sig_ptr + seq_word(W)), rank, _TIMEOUT_PUSH, W, MAX_SPIN)
    e = tl.arange(0, L_P)
    ends = tl.load(group_end_ptr + e, mask=e < L, other=2147483647)
    end = tl.minimum(tl.max(tl.where(e < L, ends, 0), axis=0), capacity)
    num_blocks = tl.cdiv(end, BLOCK_M)
    blk = pid
    while blk < num_blocks:
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        live = rows < end
        # local expert of each row, and whether the row is padding (past its group's tokens)
        ex = tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)
        g_end = tl.load(group_end_ptr + ex, mask=live, other=0)
        recv = tl.load(recv_ptr + ex, mask=live, other=0)
        padded = tl.maximum((recv + ALIGN - 1) // ALIGN * ALIGN, ALIGN)
        data = live & (rows < g_end - padded + recv)
        if SKIP_OWN:
            # Rows this rank sent to itself were written into dst by the push: leave them.
            g = rank * L + ex
            p = rows - (g_end - padded)
            hi = tl.load(recv_cum_ptr + rank * E + g, mask=live, other=0)
            lo = tl.load(recv_cum_ptr + (rank - 1) * E + g, mask=live & (rank > 0), other=0)
            own = (p >= lo) & (p < hi)
            data = data & ~own
            live = live & ~own
        if not PADS:  # the pad rows were zeroed elsewhere (the dispatch push) or are never read
            live = data
        _copy_rows_masked(src_ptr, dst_ptr, rows, n_cols, data, live, BLOCK_N)
        if HAS_SECOND:  # the scales of the same rows: one launch for data and scales
            _copy_rows_masked(src2_ptr, dst2_ptr, rows, n_cols2, data, live, BLOCK_N2)
        blk += NPROG


def copy_out(src: torch.Tensor, plan, rank: int, src2: torch.Tensor | None = None,
             out: torch.Tensor | None = None, out2: torch.Tensor | None = None, skip_own: bool = False,
             pads: bool = True, signals: torch.Tensor | None = None):
    """Copy rows ``[0, group_end_offsets[-1])`` of this rank's receive region ``src [cap, C]``
    (and of ``src2 [cap, C2]``, e.g. the scales, in the same launch) into new regular tensors
    (or into ``out [cap, C]`` / ``out2``), writing zeros for pad rows (``pads=False``: leave
    them); later rows are left unwritten. ``skip_own``: leave the rows this rank sent to itself
    (the push wrote them into ``out`` directly). The bound is read on the device: the cost is the rows received, not the
    capacity. ``signals``: int32 ``[2W + 3]`` this rank's signal words: first wait for every
    other rank's push flag of this dispatch (the "flags" sync, :mod:`mxep.kernels.signals`).
    Returns ``dst`` or ``(dst, dst2)``."""
    dst = torch.empty_like(src) if out is None else out
    dst2 = (torch.empty_like(src2) if out2 is None else out2) if src2 is not None else None
    R, C = src.shape
    if R == 0:
        return dst if src2 is None else (dst, dst2)
    L = plan.num_local_experts
    block_m, block_n = TUNING["copy_block_m"], TUNING["copy_block_n"]
    nprog = min(num_persistent_programs(src.device), cdiv(R, block_m))
    s_arg = src.view(torch.int16) if src.dtype == torch.bfloat16 else src
    d_arg = dst.view(torch.int16) if dst.dtype == torch.bfloat16 else dst
    C2 = src2.shape[1] if src2 is not None else 1
    _copy_out_kernel[(nprog,)](s_arg, d_arg, C, src2 if src2 is not None else s_arg,
                               dst2 if dst2 is not None else d_arg, C2, R,
                               plan.group_end_offsets(rank), plan.tokens_per_expert(rank),
                               plan.recv_cum, rank, plan.recv_cum.shape[1],
                               signals if signals is not None else plan.recv_cum,
                               WAIT=signals is not None, W=plan.recv_cum.shape[0], MAX_SPIN=max_spin(src.device.type),
                               HAS_SECOND=src2 is not None, SKIP_OWN=skip_own, PADS=pads, ALIGN=plan.align, L=L, L_P=max(next_power_of_2(L), 2),
                               BLOCK_M=block_m, BLOCK_N=min(block_n, next_power_of_2(C)),
                               BLOCK_N2=min(block_n, next_power_of_2(C2)), NPROG=nprog,
                               num_warps=TUNING["copy_warps"])
    return dst if src2 is None else (dst, dst2)


@triton.jit
def _put_counts_kernel(counts_ptr, dst_base_ptr, dst_delta_ptr, my_rank, E,
                       BLOCK_E: tl.constexpr):
    peer = tl.program_id(0)
    delta = tl.load(dst_delta_ptr + peer)
    e0 = 0
    while e0 < E:
        e = e0 + tl.arange(0, BLOCK_E)
        m = e < E
        c = tl.load(counts_ptr + e, mask=m)
        tl.store(dst_base_ptr + delta + my_rank * E + e, c, mask=m)
        e0 += BLOCK_E


def put_counts(counts: torch.Tensor, dst_base: torch.Tensor, dst_delta: torch.Tensor, my_rank: int) -> None:
    """Write this rank's ``counts`` (int32 ``[E]``) into row ``my_rank`` of every rank's count
    matrix (int32 ``[W, E]`` at ``dst_base + dst_delta[peer]``): the device-side counts exchange."""
    W = dst_delta.numel()
    E = counts.numel()
    _put_counts_kernel[(W,)](counts, dst_base, dst_delta, my_rank, E,
                             BLOCK_E=min(1024, next_power_of_2(E)))
