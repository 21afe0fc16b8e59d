"""One rank's communication memory: the regions of its one allocation (the phases that act on
them are :class:`~mxep.ep.transport.symm_mem.SymmMemTransport`'s methods).

One allocation per rank (symmetric memory on GPUs; a plain tensor per simulated rank in tests),
allocated once for the true worst case and cut into regions (byte offsets, 256-byte aligned)::

    counts     int32 [W, E + W]          row s = source s's num_tokens_per_expert, then the tokens
                                         it sends each rank (token-level dispatch; else zeros)
    signals    int32 [W + 2]             counts flags, call number, status (sync.py); zero at creation
    dispatch   uint8 [cap+1, H]          MXFP8 data    } the forward dispatch writes these
               uint8 [cap+1, H/32]       e8m0 scales   }
               bf16  [cap+1, H]          (aliases the above) combine-backward writes bf16 here
    combine    bf16  [N+1, H]            combine / dispatch-backward rows back to their source

Row-level: ``cap = W * N + L * align`` rows (every row routed to one rank) plus one scratch row.
Token-level (``top_k``): the dispatch region holds ``W * T`` token slots instead, the combine
region ``W * T`` returned partials, and three ``[W * T, k]`` slot tables follow
(:class:`RegionLayout`).
The MXFP8 and bf16 dispatch views alias: every phase copies its result out into a regular tensor
before the next phase can write again (the barriers order that), so they never live together.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mxep.ep.transport.symm_mem.sync import num_signal_words


__all__ = ["POISON", "RegionLayout", "region_view"]

_ALIGN = 256

POISON = 0xA5   # the byte EPConfig.poison_outputs fills outputs with (and fresh regions get)


def _up(n: int, a: int = _ALIGN) -> int:
    return (n + a - 1) // a * a


@dataclass(frozen=True)
class RegionLayout:
    """Byte offsets of one rank's regions (identical on every rank).

    ``top_k == 0`` (row-level Buffer): ``max_tokens_per_rank`` counts rows; the receive region
    holds the dispatch layout itself (``capacity + 1`` rows) and the combine region ``N + 1``
    rows. ``top_k > 0`` (token-level Buffer): ``max_tokens_per_rank`` = ``T`` counts tokens; the
    receive region holds ``W * T`` token slots (source s's tokens at slots ``[s*T, (s+1)*T)``),
    the combine region ``W * T`` returned partials (owner d's at ``[d*T, (d+1)*T)``), and three
    ``[W * T, top_k]`` tables: the slots' layout rows (int32), their gate weights (fp32) and the
    weight gradients coming back (fp32).
    """

    world_size: int
    num_experts: int
    hidden: int
    max_tokens_per_rank: int
    capacity: int
    top_k: int = 0
    expert_cap: int = 2**31 - 1   # rows one expert keeps (capacity_factor); the rest drop
    # "row_major" or "blocked" (mxep/format/blocked.py): how the dispatch layout's scales are
    # written, in the receive region (row level) and in the outputs; a blocked layout has
    # capacity % 128 == 0, so its capacity rows' scales fill the same bytes as row-major ones
    scale_layout: str = "row_major"

    @property
    def rows(self) -> int:
        """Rows of the receive region: the layout plus the scratch row that masked scatters aim
        at (row-level), or the token slots (token-level)."""
        if self.top_k:
            return self.world_size * self.max_tokens_per_rank
        return self.capacity + 1

    @property
    def combine_rows(self) -> int:
        if self.top_k:
            return self.world_size * self.max_tokens_per_rank
        return self.max_tokens_per_rank + 1

    @property
    def counts_offset(self) -> int:   # int32 [W, E + W] count matrix
        return 0

    @property
    def signal_offset(self) -> int:
        return _up(self.world_size * (self.num_experts + self.world_size) * 4)

    @property
    def signal_bytes(self) -> int:
        return _up(num_signal_words(self.world_size) * 4)

    @property
    def dispatch_offset(self) -> int:
        return self.signal_offset + self.signal_bytes

    @property
    def scale_offset(self) -> int:
        return self.dispatch_offset + _up(self.rows * self.hidden)

    @property
    def dispatch_bytes(self) -> int:
        mxfp8 = _up(self.rows * self.hidden) + _up(self.rows * self.hidden // 32)
        return max(mxfp8, _up(self.rows * self.hidden * 2))

    @property
    def combine_offset(self) -> int:
        return self.dispatch_offset + self.dispatch_bytes

    @property
    def table_offset(self) -> int:   # token-level: the three [W * T, top_k] tables, 4 bytes each
        return self.combine_offset + _up(self.combine_rows * self.hidden * 2)

    @property
    def table_bytes(self) -> int:
        return _up(self.world_size * self.max_tokens_per_rank * self.top_k * 4)

    @property
    def total_bytes(self) -> int:
        return self.table_offset + 3 * self.table_bytes


def region_view(mem: torch.Tensor, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    nbytes = 1
    for s in shape:
        nbytes *= s
    nbytes *= torch.empty((), dtype=dtype).element_size()
    return mem[offset:offset + nbytes].view(dtype).view(shape)
