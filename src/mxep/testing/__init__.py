"""Helpers shared by the tests, benchmarks, scripts and examples: synthetic MoE routing and
inputs, and the error measures that compare a result with its reference (here), plus, for the
benchmarks and scripts, the submodules

* :mod:`mxep.testing.cases`: the benchmark configurations and their synthetic inputs;
* :mod:`mxep.testing.overrides`: ``--ep-config`` (EPConfig field overrides as JSON);
* :mod:`mxep.testing.timing`: timing with CUDA events, the environment of a result;
* :mod:`mxep.testing.launch`: the visible GPUs and a free port, for the launchers.

Not on any hot path: these read values back to the host (``float(...)``).

Everything here is deterministic given a ``torch.Generator`` (a CPU generator; results are
generated on the CPU and moved to ``device`` afterwards, so the same seed gives the same
routing on every machine and every rank).

The routing is described the way the EP dispatch consumes it: ``counts[g]`` = how many of this
rank's rows go to global expert ``g``; the rows themselves are sorted by expert id (rows
``[sum(counts[:g]), sum(counts[:g+1]))`` belong to expert ``g``). With top-k routing a token
appears k times (once per chosen expert); that expansion happens before dispatch.

Example::

    >>> g = torch.Generator().manual_seed(0)
    >>> counts = make_routing(100, 8, "skewed", g, fraction=0.5)
    >>> int(counts.sum()), int(counts.max()) >= 50
    (100, True)
    >>> x = make_inputs(counts, 256, torch.bfloat16, g)   # [100, 256] bf16
"""
from __future__ import annotations

import math

from typing import Iterable, Optional

import torch

__all__ = ["ROUTING_KINDS", "make_routing", "make_inputs", "rel_err", "sqnr_db"]

ROUTING_KINDS = ("uniform", "skewed", "one_expert", "empty_experts", "none")


def _randint(high: int, generator: torch.Generator) -> int:
    return int(torch.randint(high, (1,), generator=generator))


def _spread(num_rows: int, experts: list[int], num_experts: int, generator: torch.Generator) -> torch.Tensor:
    """Each of ``num_rows`` rows picks one of ``experts`` uniformly at random -> counts int64 [E]."""
    counts = torch.zeros(num_experts, dtype=torch.int64)
    if num_rows == 0:
        return counts
    if not experts:
        raise ValueError(f"cannot route {num_rows} rows: no expert is allowed to receive any")
    picks = torch.multinomial(torch.ones(len(experts)), num_rows, replacement=True, generator=generator)
    counts[torch.tensor(experts, dtype=torch.int64)] += torch.bincount(picks, minlength=len(experts))
    return counts


def make_routing(
    num_rows: int,
    num_experts: int,
    kind: str,
    generator: torch.Generator,
    *,
    fraction: float = 0.3,
    expert: Optional[int] = None,
    num_empty: Optional[int] = None,
    zero_experts: Iterable[int] = (),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Per-expert row counts ``int64 [num_experts]`` summing to ``num_rows``.

    Args:
        num_rows: rows this rank sends (already expanded for top-k).
        num_experts: global expert count E.
        kind: one of :data:`ROUTING_KINDS`:

            * ``"uniform"``: every row picks an expert uniformly at random (multinomial).
            * ``"skewed"``: one hot expert (``expert``, random if None) takes
              ``round(fraction * num_rows)`` rows; the rest are uniform over the other experts.
            * ``"one_expert"``: all rows go to ``expert`` (random if None).
            * ``"empty_experts"``: ``num_empty`` experts (default ``max(1, E // 4)``, random
              subset) get nothing; the rows are uniform over the others.
            * ``"none"``: nothing is sent; ``num_rows`` must be 0.
        generator: CPU ``torch.Generator``; the only source of randomness.
        fraction: hot expert share for ``"skewed"`` (0..1).
        expert: the hot / single expert for ``"skewed"`` / ``"one_expert"``.
        num_empty: number of empty experts for ``"empty_experts"`` (< E unless num_rows == 0).
        zero_experts: experts forced to receive nothing (``"uniform"`` and ``"skewed"``; for
            ``"skewed"`` the hot expert must not be among them).
        device: where the returned tensor lives.
    """
    if kind not in ROUTING_KINDS:
        raise ValueError(f"kind must be one of {ROUTING_KINDS}, got {kind!r}")
    if num_rows < 0 or num_experts <= 0:
        raise ValueError(f"need num_rows >= 0 and num_experts > 0, got {num_rows}, {num_experts}")
    zero = sorted({int(z) for z in zero_experts})
    if any(not 0 <= z < num_experts for z in zero):
        raise ValueError(f"zero_experts {zero} out of range for {num_experts} experts")
    if zero and kind not in ("uniform", "skewed"):
        raise ValueError(f"zero_experts is only supported for 'uniform' and 'skewed', not {kind!r}")
    allowed = [g for g in range(num_experts) if g not in zero]

    if kind == "none":
        if num_rows != 0:
            raise ValueError(f"kind='none' sends nothing: num_rows must be 0, got {num_rows}")
        counts = torch.zeros(num_experts, dtype=torch.int64)
    elif kind == "uniform":
        counts = _spread(num_rows, allowed, num_experts, generator)
    elif kind == "skewed":
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        hot = allowed[_randint(len(allowed), generator)] if expert is None else int(expert)
        if hot not in allowed:
            raise ValueError(f"hot expert {hot} is out of range or listed in zero_experts")
        others = [g for g in allowed if g != hot]
        n_hot = num_rows if not others else int(round(fraction * num_rows))
        counts = _spread(num_rows - n_hot, others, num_experts, generator)
        counts[hot] += n_hot
    elif kind == "one_expert":
        g = _randint(num_experts, generator) if expert is None else int(expert)
        if not 0 <= g < num_experts:
            raise ValueError(f"expert {g} out of range for {num_experts} experts")
        counts = torch.zeros(num_experts, dtype=torch.int64)
        counts[g] = num_rows
    else:  # empty_experts
        k = max(1, num_experts // 4) if num_empty is None else int(num_empty)
        if not 0 <= k <= num_experts or (k == num_experts and num_rows > 0):
            raise ValueError(f"num_empty={k} impossible with {num_experts} experts and {num_rows} rows")
        empty = set(torch.randperm(num_experts, generator=generator)[:k].tolist())   # construction-only: a CPU routing generator (tests, benchmarks)
        counts = _spread(num_rows, [g for g in range(num_experts) if g not in empty], num_experts, generator)
    return counts.to(device)


def make_inputs(
    counts: torch.Tensor,
    hidden: int,
    dtype: torch.dtype = torch.bfloat16,
    generator: Optional[torch.Generator] = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Random activations ``x [sum(counts), hidden]`` in ``dtype`` with a realistic spread.

    Rows are ``randn`` times a per-row magnitude ``2**U(-6, 4)`` and a per-(row, 32-block)
    factor ``2**U(-2, 2)`` (so MXFP8 block scales vary inside a row), plus rare outliers
    (about 1 element in 1000, 30x larger) like real MoE activations. No zeros, no non-finite
    values. ``device`` defaults to ``counts.device``.
    """
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D [E], got shape {tuple(counts.shape)}")
    n = int(counts.sum())  # host read of a (test/benchmark) count vector
    device = counts.device if device is None else device
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    nblk = (hidden + 31) // 32
    x = torch.randn(n, hidden, generator=generator)
    row_mag = torch.exp2(torch.rand(n, 1, generator=generator) * 10 - 6)
    blk_mag = torch.exp2(torch.rand(n, nblk, generator=generator) * 4 - 2)
    blk_mag = blk_mag.repeat_interleave(32, dim=1)[:, :hidden]
    outlier = torch.rand(n, hidden, generator=generator) < 1e-3
    x = x * row_mag * blk_mag * torch.where(outlier, 30.0, 1.0)
    return x.to(dtype).to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp32 (``b`` the reference; detached; a host read)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))   # debug-only: host read (tests, benchmarks)


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``x`` against ``ref`` in dB, fp64 (``inf`` when equal)."""
    ref64 = ref.detach().double()
    noise = float((x.detach().double() - ref64).pow(2).sum())   # debug-only: host read
    if noise == 0:
        return float("inf")
    return 10 * math.log10(max(float(ref64.pow(2).sum()), 1e-300) / noise)   # debug-only: host read
