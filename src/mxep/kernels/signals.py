"""Device-side signalling between ranks: release/acquire flags in place of full barriers.

Used by the forward dispatch when ``TUNING["sync"] == "flags"`` (the default ``"barrier"``
orders its phases with symmetric-memory barriers instead). Signal words, int32, in every rank's
allocation (``RegionLayout.signal_offset``), zero at creation::

    [0, W)      counts_flag  slot s: number of the call whose count row source s last wrote here
    [W, 2W)     push_flag    slot s: number of the call whose push from source s has completed
    2W          seq          this rank's number of dispatches so far (equal on every rank between calls)
    2W + 1      ticket       programs of the running push kernel that have finished (the last resets it)
    2W + 2      status       0, or the OR of the codes of the waits that timed out (debug mode reads it)

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

Why no barrier is needed:

* Data before flag: a release after ``bar.sync`` orders the stores of every thread of the
  program before the flag; through the ticket's acq_rel chain, those of every program of the
  push. The waiter's acquire (then ``bar.sync``) orders its loads after the flag.
* Reuse (write after read): rank p writes its count row of call e only after everything it
  queued before (stream order): its copy-out of call e - 1, its pull of the previous combine.
  A rank pushes only once it holds all W count rows of call e, so no row of call e lands in a
  region before its owner, and every source pulling from it, are done with it. Count rows: a
  rank in call e has seen every push flag of call e - 1, raised after the sender's plan of
  e - 1 had read its count matrix.
* Call numbers: every rank runs the same dispatches, so ``seq`` agrees across ranks; a flag
  is compared with ``e`` as ``flag - e >= 0`` (int32, wrapping), so a peer already one call
  ahead never blocks a waiter. The host enforces the pairing the argument needs: in this mode
  every plan is followed by its one MXFP8 dispatch before the next plan
  (``SymmMemTransport``).

A wait that spins ``MAX_SPIN`` times gives up: it ORs its code into ``status`` and lets the
kernel finish (the outputs are then garbage) instead of hanging the GPU; ``Buffer(debug=True)``
raises on a non-zero status after every dispatch.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["num_signal_words", "max_spin", "TIMEOUT_COUNTS", "TIMEOUT_PUSH", "describe_status"]

TIMEOUT_COUNTS = 1   # the plan kernel waited too long for a peer's count row
TIMEOUT_PUSH = 2     # the copy-out waited too long for a peer's push


def num_signal_words(world_size: int) -> int:
    return 2 * world_size + 3


def max_spin(device_type: str) -> int:
    """Polls before a wait gives up. GPU: 2**26 polls of a local L2 word (about a minute at
    ~1 µs per poll: longer than any straggler, shorter than a silent hang). CPU interpreter:
    its simulated world runs the phases in order, so a flag is there on the first poll unless
    a test withholds it on purpose."""
    return 1 << 26 if device_type == "cuda" else 16


def describe_status(status: int) -> str:
    what = []
    if status & TIMEOUT_COUNTS:
        what.append("the plan waited too long for a peer's counts (a rank did not call dispatch)")
    if status & TIMEOUT_PUSH:
        what.append("the copy-out waited too long for a peer's push to complete")
    return "; ".join(what) or f"unknown status {status}"


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
def wait_flags(sig_ptr, first, value, skip, code, W: tl.constexpr, W_P: tl.constexpr, MAX_SPIN: tl.constexpr):
    """Spin until local words ``first + s`` reach ``value`` (int32, wrapping) for every rank s but
    ``skip`` (acquire loads), then ``bar.sync``. After ``MAX_SPIN`` polls of one word, OR
    ``code`` into the status word and go on.

    One scalar atomic per poll, flag after flag: Triton broadcasts a scalar atomic's result to
    every thread, but did not always do so for a tensor atomic's (triton-lang/triton#7402),
    and every thread must leave the loop together."""
    for s in tl.static_range(W):
        if s != skip:
            seen = tl.atomic_add(sig_ptr + first + s, 0, sem="acquire", scope="sys")
            spins = 0
            while ((seen - value) < 0) & (spins < MAX_SPIN):
                seen = tl.atomic_add(sig_ptr + first + s, 0, sem="acquire", scope="sys")
                spins += 1
            if (seen - value) < 0:
                tl.atomic_or(sig_ptr + 2 * W + 2, code, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def finish_push(sig_ptr, delta_ptr, rank, W: tl.constexpr, W_P: tl.constexpr, NPROG: tl.constexpr):
    """End of one program of the push kernel: count it in the ticket; the last program resets
    the ticket and raises ``push_flag[rank] = seq`` on every other rank."""
    tl.debug_barrier()   # every thread's stores of this program come before its ticket
    done = tl.atomic_add(sig_ptr + 2 * W + 1, 1, sem="acq_rel", scope="sys")
    if done == NPROG - 1:
        tl.atomic_xchg(sig_ptr + 2 * W + 1, 0, sem="relaxed", scope="gpu")
        e = tl.load(sig_ptr + 2 * W)
        signal_ranks(sig_ptr, delta_ptr, W + rank, e, rank, W, W_P)
