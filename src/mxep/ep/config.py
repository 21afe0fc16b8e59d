"""``mxep.EPConfig``: the frozen kernel configuration of one :class:`mxep.Buffer`.

One object, passed to the Buffer and kept by it (as DeepEP passes a ``Config`` and quack a frozen
``GemmConfig``): there is no module-level tuning state and no environment variable that changes
behaviour. Sweep scripts build configs explicitly (``dataclasses.replace(default_config(...),
...)``). Every tuned constant below carries one line with the measurement that chose it; the
sweeps behind them are in docs/tuning.md, the alternatives that measurements rejected in
docs/history.md.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from mxep._utils import sm_count

__all__ = ["KernelTiles", "EPConfig", "default_config"]


@dataclass(frozen=True)
class KernelTiles:
    """Tiles of one persistent peer-memory kernel.

    Attributes:
        block_m: rows per work item (a power of two).
        block_n: columns per inner step; clamped to ``next_power_of_2(hidden)`` at launch, so
            8192 means "the whole row" for every hidden size up to 8192 (a power of two).
        warps: ``num_warps`` of the kernel (a power of two).
        programs_per_sm: persistent programs per SM on GPUs (the interpreter runs 4 programs).
    """

    block_m: int
    block_n: int
    warps: int
    programs_per_sm: int

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"KernelTiles.{f.name} must be a positive int, got {v!r}")
            if f.name != "programs_per_sm" and v & (v - 1):
                raise ValueError(f"KernelTiles.{f.name} must be a power of two, got {v}")


@dataclass(frozen=True)
class EPConfig:
    """Kernel configuration of the symmetric-memory transport (the collective one ignores the
    tiles). Frozen: a Buffer's behaviour cannot change between calls.

    Attributes:
        dispatch: the fused quantize + peer-store push. Whole rows (1 x 8192), 8 warps, 32
            programs per SM: zero-copy dispatch 537.3 us, 4 x H200, config (a) (H 7168, 32768
            rows per rank), world 4 (docs/tuning.md).
        combine: the owners' push of rows back into the sources' combine regions. 1 x 8192, 8
            warps, 16/SM: 736 us, 2 x H200, config (a), world 2 (docs/tuning.md).
        copy: the local copy-out kernels. 8 x 1024, 8 warps, 16/SM: 204 us, 2 x H200, config
            (a), world 2 (docs/tuning.md).
        pull: the sources' read of the zero-copy combine input over NVLink. 2 x 4096, 4 warps,
            32/SM: 798 us, 2 x H200, config (a), world 2 (docs/tuning.md).
        spread_parts: the peer kernels walk their rows (grouped by peer) cut into this many
            equal parts, interleaved, so that every rank talks to all its peers at once in
            proportion to the rows. 16: combine push 1195 us against 1693 walking from row 0,
            4 x H200, config (a), world 4 (docs/tuning.md).
        hw_cast: round to e4m3 with the GPU's ``cvt.rn.satfinite`` (bit-identical to the
            integer rounding, tests check both on GPUs); the interpreter always uses integers.
            Quantize 347 us against 589, one H200, 32768 x 7168 (docs/tuning.md).
        poison_outputs: fill every output tensor with byte 0xA5 before the kernels write it,
            so that a row nobody wrote cannot pass for data (tests; costs one memset a call).
        wait_polls: polls of one flag before a device-side wait gives up (its status flag is
            raised, ``Buffer.check()`` / ``debug=True`` turn it into an exception): 2**25
            polls, some 20-30 s on an H200 at ~0.5-1 us a poll, well under a minute; warm
            up (compile) every rank before timing-sensitive work.
        barrier_timeout_ms: timeout of the symmetric-memory barriers (PyTorch traps the kernel
            after it: the CUDA context is then lost, with PyTorch's message).
    """

    dispatch: KernelTiles = field(default_factory=lambda: KernelTiles(1, 8192, 8, 32))
    combine: KernelTiles = field(default_factory=lambda: KernelTiles(1, 8192, 8, 16))
    copy: KernelTiles = field(default_factory=lambda: KernelTiles(8, 1024, 8, 16))
    pull: KernelTiles = field(default_factory=lambda: KernelTiles(2, 4096, 4, 32))
    spread_parts: int = 16
    hw_cast: bool = True
    poison_outputs: bool = False
    wait_polls: int = 1 << 25
    barrier_timeout_ms: int = 30_000

    def __post_init__(self):
        for name in ("dispatch", "combine", "copy", "pull"):
            if not isinstance(getattr(self, name), KernelTiles):
                raise TypeError(f"EPConfig.{name} must be a KernelTiles, got {type(getattr(self, name)).__name__}")
        for name in ("spread_parts", "wait_polls", "barrier_timeout_ms"):
            v = getattr(self, name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"EPConfig.{name} must be a positive int, got {v!r}")
        for name in ("hw_cast", "poison_outputs"):
            if type(getattr(self, name)) is not bool:
                raise TypeError(f"EPConfig.{name} must be a bool, got {getattr(self, name)!r}")

    def num_programs(self, tiles: KernelTiles, device: torch.device) -> int:
        """Programs of a persistent grid: ``tiles.programs_per_sm`` per SM on GPUs; 4 under the
        CPU interpreter, which runs programs one after another (more only add overhead)."""
        if device.type == "cuda":
            return sm_count(device) * tiles.programs_per_sm
        return 4

    def polls(self, device: torch.device) -> int:
        """Polls before a wait gives up on ``device``: the interpreter's simulated world runs
        the phases in order, so a flag is there on the first poll unless a test withholds it."""
        return self.wait_polls if device.type == "cuda" else 16

    def replace(self, **changes) -> "EPConfig":
        """A copy with ``changes`` (e.g. ``cfg.replace(poison_outputs=True)``)."""
        return replace(self, **changes)


def default_config(device: torch.device | str | None = None, hidden: int | None = None) -> EPConfig:
    """The measured defaults for ``device`` and ``hidden``. The tiles above were measured on
    H200s at H = 5120 and 7168; whole-row tiles clamp to the hidden size, so one config serves
    every shape measured so far (config (b), H = 5120, showed no difference between 1 x 8192,
    4 x 1024 and 2 x 1024 combine tiles at world 2, docs/history.md #13). Other devices get the
    same values until measured."""
    del device, hidden   # one measured point so far: the arguments keep the signature stable
    return EPConfig()
