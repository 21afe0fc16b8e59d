"""Device-side signalling between ranks: release/acquire flags in place of full barriers.

Used by the forward dispatch and the push combine when ``TUNING["sync"] == "flags"``; the
default ``"counts_flags"`` uses only the counts exchange below (the plan kernel's flags) and
orders the later phases with symmetric-memory barriers, as ``"barrier"`` orders all of them.
Signal words, int32, in every rank's allocation (``RegionLayout.signal_offset``), zero at
creation::

    [0, W)      counts_flag  slot s: number of the dispatch whose count row source s last wrote here
    [W, 2W)     push_flag    slot s: number of the dispatch whose push from source s has completed
    [2W, 3W)    cfree_flag   slot s: number of the combine that source s has copied out (its
                             combine region is free for the next one)
    [3W, 4W)    cdone_flag   slot o: number of the combine whose push from owner o has completed
    4W          seq          dispatches so far on this rank (equal on every rank between calls)
    4W + 1      cseq         combines so far ("flags" push combines only)
    4W + 2      ticket       programs of the running kernel that have finished (the last resets it)
    4W + 3      status       0, or the OR of the codes of the waits that timed out (debug mode reads it)

One forward dispatch, ``e = seq + 1`` (three launches instead of put_counts, barrier, plan,
push, barrier, copy-out):

* plan kernel (one program): store this rank's count row into every rank's count matrix,
  ``bar.sync``, release-store ``e`` into ``counts_flag[rank]`` of every rank, spin (acquire)
  until ``counts_flag[s] >= e`` for every s, compute the plan, ``seq = e``.
* push kernel: rows as before; each program at its end: ``bar.sync``, ``ticket += 1``
  (acq_rel); the last one resets the ticket and release-stores ``e`` into ``push_flag[rank]``
  of every other rank.
* copy-out kernel: every program spins (acquire) until ``push_flag[s] >= e`` for every other
  s, then copies.

One push combine, ``c = cseq + 1`` (two launches instead of barrier, push, barrier, copy-out):

* push kernel: every program first waits until ``cfree_flag[s] >= c - 1`` for every other
  source s (their copy-out of the previous combine is done); rows as before; the last program
  raises ``cdone_flag[rank] = c`` on every other rank.
* copy-out kernel (even with no rows): every program waits until ``cdone_flag[o] >= c`` for
  every other owner o, copies; the last program sets ``cseq = c`` and raises
  ``cfree_flag[rank] = c`` on every other rank.

Why no barrier is needed:

* Data before flag: a release after ``bar.sync`` orders the stores of every thread of the
  program before the flag; through the ticket's acq_rel chain, those of every program of the
  kernel. The waiter's acquire (then ``bar.sync``) orders its loads after the flag. A free
  flag orders the copy-out's loads before the next push's stores the same way.
* Dispatch reuse (write after read): rank p writes its count row of call e only after
  everything it queued before (stream order): its copy-out of call e - 1, its pull of the
  previous combine. A rank pushes only once it holds all W count rows of call e, so no row of
  call e lands in a region before its owner, and every source pulling from it, are done with
  it. Count rows: a rank in call e has seen every push flag of call e - 1, raised after the
  sender's plan of e - 1 had read its count matrix.
* Combine reuse: only combine pushes write a combine region and only its owner's combine
  copy-out reads it; the free flags order each copy-out before the next push into that region.
  A barrier-ordered combine's copy-out raises no free flag, so the transport puts one barrier
  before the first flags combine that follows it.
* Call numbers: every rank runs the same calls, so ``seq`` and ``cseq`` agree across ranks; a
  flag is compared as ``flag - value >= 0`` (int32, wrapping), so a peer already one call ahead
  never blocks a waiter. The host enforces the pairing the dispatch argument needs: in this
  mode every plan is followed by its one MXFP8 dispatch before the next plan
  (``SymmMemTransport``).

A wait that spins ``MAX_SPIN`` times gives up: it ORs its code into ``status`` and lets the
kernel finish (the outputs are then garbage) instead of hanging the GPU; ``Buffer(debug=True)``
raises on a non-zero status after every dispatch and combine.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["wait_for_pushes", "num_signal_words", "max_spin", "describe_status", "COUNTS_FLAG", "PUSH_FLAG", "CFREE_FLAG",
           "CDONE_FLAG", "TIMEOUT_COUNTS", "TIMEOUT_PUSH", "TIMEOUT_COMBINE_FREE", "TIMEOUT_COMBINE_DONE"]

# Flag blocks: block b holds words [b * W, (b + 1) * W).
COUNTS_FLAG, PUSH_FLAG, CFREE_FLAG, CDONE_FLAG = 0, 1, 2, 3
# Status codes (OR-ed).
TIMEOUT_COUNTS = 1          # the plan waited too long for a peer's count row
TIMEOUT_PUSH = 2            # the dispatch copy-out waited too long for a peer's push
TIMEOUT_COMBINE_FREE = 4    # the combine push waited too long for a source's previous copy-out
TIMEOUT_COMBINE_DONE = 8    # the combine copy-out waited too long for an owner's push


def num_signal_words(world_size: int) -> int:
    return 4 * world_size + 4


def word_index(world_size: int, name: str) -> int:
    """Host-side index of the named single word: ``seq``, ``cseq``, ``ticket`` or ``status``."""
    return 4 * world_size + ("seq", "cseq", "ticket", "status").index(name)


def max_spin(device_type: str) -> int:
    """Polls before a wait gives up. GPU: 2**30 polls of a local L2 word, some ten minutes at
    ~0.5-1 µs per poll, like NCCL's watchdog: a give-up means a rank is gone, never a slow one
    (a peer compiling Triton kernels on a cold cache can take a minute, and a give-up leaves
    garbage outputs that only debug mode reports). CPU interpreter: its simulated world runs
    the phases in order, so a flag is there on the first poll unless a test withholds it.
    ``MXEP_MAX_SPIN`` overrides the GPU value, so that a test run turns a lost flag into a
    failure within seconds instead of a hang (the GPU tests set 2**25, some 30 s)."""
    if device_type != "cuda":
        return 16
    env = os.environ.get("MXEP_MAX_SPIN")
    return int(env) if env else 1 << 30


def describe_status(status: int) -> str:
    what = []
    if status & TIMEOUT_COUNTS:
        what.append("the dispatch plan waited too long for a peer's counts (a rank did not call dispatch)")
    if status & TIMEOUT_PUSH:
        what.append("the dispatch copy-out waited too long for a peer's push to complete")
    if status & TIMEOUT_COMBINE_FREE:
        what.append("the combine push waited too long for a source to free its combine region")
    if status & TIMEOUT_COMBINE_DONE:
        what.append("the combine copy-out waited too long for an owner's push to complete")
    if status & ~(TIMEOUT_COUNTS | TIMEOUT_PUSH | TIMEOUT_COMBINE_FREE | TIMEOUT_COMBINE_DONE):
        what.append(f"unknown status bits in {status}")
    return "; ".join(what)


# Words after the flag blocks (jit-side twins of word_index).
@triton.jit
def seq_word(W: tl.constexpr):
    return 4 * W


@triton.jit
def cseq_word(W: tl.constexpr):
    return 4 * W + 1


@triton.jit
def _ticket_word(W: tl.constexpr):
    return 4 * W + 2


@triton.jit
def _status_word(W: tl.constexpr):
    return 4 * W + 3


@triton.jit
def signal_ranks(sig_ptr, delta_ptr, slot, value, skip, W: tl.constexpr, W_P: tl.constexpr):
    """Release-store ``value`` into word ``slot`` of the signal words of every rank but ``skip``
    (``-1``: all), after a ``bar.sync``: every prior store of this program is visible first."""
    p = tl.arange(0, W_P)
    m = (p < W) & (p != skip)
    delta = tl.load(delta_ptr + p, mask=m, other=0)
    tl.debug_barrier()
    tl.atomic_xchg(sig_ptr + delta + slot, tl.zeros([W_P], tl.int32) + value, mask=m, sem="release", scope="sys")


@triton.jit
def wait_flags(sig_ptr, block, value, skip, code, W: tl.constexpr, MAX_SPIN: tl.constexpr):
    """Spin until the local words ``block * W + s`` reach ``value`` (int32, wrapping) for every
    rank s but ``skip`` (acquire loads), then ``bar.sync``. After ``MAX_SPIN`` polls of one word,
    OR ``code`` into the status word and go on.

    One scalar atomic per poll, flag after flag: Triton broadcasts a scalar atomic's result to
    every thread, but did not always do so for a tensor atomic's (triton-lang/triton#7402),
    and every thread must leave the loop together. (Triton turns ``atomic_add(p, 0)`` with
    acquire semantics into ``ld.global.sys.acquire``.)"""
    for s in tl.static_range(W):
        if s != skip:
            seen = tl.atomic_add(sig_ptr + block * W + s, 0, sem="acquire", scope="sys")
            spins = 0
            while ((seen - value) < 0) & (spins < MAX_SPIN):
                seen = tl.atomic_add(sig_ptr + block * W + s, 0, sem="acquire", scope="sys")
                spins += 1
            if (seen - value) < 0:
                tl.atomic_or(sig_ptr + _status_word(W), code, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def finish_program(sig_ptr, delta_ptr, rank, block, value, W: tl.constexpr, W_P: tl.constexpr,
                   NPROG: tl.constexpr, SET_CSEQ: tl.constexpr):
    """End of one program of a signalling kernel: count it in the ticket; the last program
    resets the ticket (``SET_CSEQ``: and sets ``cseq = value``) and raises word
    ``block * W + rank`` to ``value`` on every other rank."""
    tl.debug_barrier()   # every thread's stores (and loads) of this program come before its ticket
    done = tl.atomic_add(sig_ptr + _ticket_word(W), 1, sem="acq_rel", scope="sys")
    if done == NPROG - 1:
        tl.atomic_xchg(sig_ptr + _ticket_word(W), 0, sem="relaxed", scope="gpu")
        if SET_CSEQ:
            tl.store(sig_ptr + cseq_word(W), value)
        signal_ranks(sig_ptr, delta_ptr, block * W + rank, value, rank, W, W_P)


_PUSH_FLAG = tl.constexpr(PUSH_FLAG)
_TIMEOUT_PUSH = tl.constexpr(TIMEOUT_PUSH)


@triton.jit
def _wait_pushes_kernel(sig_ptr, rank, W: tl.constexpr, MAX_SPIN: tl.constexpr):
    wait_flags(sig_ptr, _PUSH_FLAG, tl.load(sig_ptr + seq_word(W)), rank, _TIMEOUT_PUSH, W, MAX_SPIN)



def wait_for_pushes(signals: torch.Tensor, rank: int, world_size: int) -> None:
    """One program that waits until every other rank's push flag of the current dispatch is up
    (the zero-copy dispatch of the "flags" sync, whose rows stay where the pushes put them: the
    kernels queued after this one read them)."""
    _wait_pushes_kernel[(1,)](signals, rank, W=world_size, MAX_SPIN=max_spin(signals.device.type), num_warps=1)
