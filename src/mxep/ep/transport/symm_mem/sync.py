"""The device-side counts exchange and the status word of the symmetric-memory transport.

The one protocol (docs/design.md): the plan kernel stores this rank's count row into every
rank's count matrix and raises a release flag there, waits (acquire) for every rank's flag of
this call, then computes the plan; the later phases (push, copy-out, combine) are ordered by
symmetric-memory barriers. Signal words, int32, in every rank's allocation
(``RegionLayout.signal_offset``), zero at creation::

    [0, W)   counts_flag  slot s: number of the dispatch whose count row source s last wrote here
    W        seq          dispatches so far on this rank (equal on every rank between calls)
    W + 1    status       0, or the OR of the codes below (``Buffer.check()`` reads it)

Why the count rows need no barrier of their own: rank p writes its count row of call e only
after its push of call e - 1 and the barrier after it (stream order), which every rank passes
only once every rank's plan of call e - 1 has read its count matrix. The host enforces the
pairing this needs: every plan is followed by its dispatch before the next plan
(``SymmMemTransport``).

Call numbers: every rank runs the same calls, so ``seq`` agrees across ranks. While a rank waits
in call e, every peer's flag can only be e - 1 (not there yet) or e: a peer cannot start call
e + 1 before this rank has pushed call e. A flag past e, or one that never comes, means the
ranks disagree on the call sequence (a rank skipped or repeated a call): the wait records
``SEQUENCE_MISMATCH`` or ``TIMEOUT_COUNTS`` instead of silently pairing rank 0's step 1 with
rank 1's step 2.

A wait that polls ``wait_polls`` times (``EPConfig``) gives up: it ORs its code into ``status``
and lets the kernel finish (the outputs are then invalid) instead of hanging the GPU.
"""
from __future__ import annotations

import triton
import triton.language as tl

from mxep.ep.transport.base import BAD_COUNTS, SEQUENCE_MISMATCH, TIMEOUT_COUNTS, describe_status

_TIMEOUT_COUNTS, _SEQUENCE_MISMATCH = tl.constexpr(TIMEOUT_COUNTS), tl.constexpr(SEQUENCE_MISMATCH)
_BAD_COUNTS = tl.constexpr(BAD_COUNTS)

__all__ = ["num_signal_words", "word_index", "describe_status", "TIMEOUT_COUNTS", "SEQUENCE_MISMATCH",
           "BAD_COUNTS", "seq_word", "status_word", "signal_ranks", "wait_flags", "raise_status"]

def num_signal_words(world_size: int) -> int:
    return world_size + 2


def word_index(world_size: int, name: str) -> int:
    """Host-side index of the named single word: ``seq`` or ``status``."""
    return world_size + ("seq", "status").index(name)


@triton.jit
def seq_word(W: tl.constexpr):
    return W


@triton.jit
def status_word(W: tl.constexpr):
    return W + 1


@triton.jit
def signal_ranks(sig_ptr, delta_ptr, slot, value, W: tl.constexpr, W_P: tl.constexpr):
    """Release-store ``value`` into word ``slot`` of the signal words of every rank, after a
    ``bar.sync``: every prior store of this program is visible first."""
    p = tl.arange(0, W_P)
    m = p < W
    delta = tl.load(delta_ptr + p, mask=m, other=0)
    tl.debug_barrier()
    tl.atomic_xchg(sig_ptr + delta + slot, tl.zeros([W_P], tl.int32) + value, mask=m, sem="release", scope="sys")


@triton.jit
def raise_status(sig_ptr, code, W: tl.constexpr):
    """OR ``code`` into this rank's status word."""
    tl.atomic_or(sig_ptr + status_word(W), code, sem="relaxed", scope="gpu")


@triton.jit
def wait_flags(sig_ptr, value, W: tl.constexpr, MAX_POLLS: tl.constexpr):
    """Spin until the local words ``[0, W)`` reach ``value`` (int32, wrapping) (acquire loads),
    then ``bar.sync``. After ``MAX_POLLS`` polls of one word, OR ``TIMEOUT_COUNTS`` into the
    status word and go on; a word past ``value`` ORs ``SEQUENCE_MISMATCH``.

    One scalar atomic per poll, flag after flag: Triton broadcasts a scalar atomic's result to
    every thread, but did not always do so for a tensor atomic's (triton-lang/triton#7402),
    and every thread must leave the loop together. (Triton turns ``atomic_add(p, 0)`` with
    acquire semantics into ``ld.global.sys.acquire``.)"""
    for s in tl.static_range(W):
        seen = tl.atomic_add(sig_ptr + s, 0, sem="acquire", scope="sys")
        polls = 0
        while ((seen - value) < 0) & (polls < MAX_POLLS):
            seen = tl.atomic_add(sig_ptr + s, 0, sem="acquire", scope="sys")
            polls += 1
        if (seen - value) < 0:
            tl.atomic_or(sig_ptr + status_word(W), _TIMEOUT_COUNTS, sem="relaxed", scope="gpu")
        if (seen - value) > 0:
            tl.atomic_or(sig_ptr + status_word(W), _SEQUENCE_MISMATCH, sem="relaxed", scope="gpu")
    tl.debug_barrier()
