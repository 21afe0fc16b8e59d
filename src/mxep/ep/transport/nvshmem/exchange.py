"""The one exchange of the NVSHMEM transport, and its stand-ins.

An exchange moves rows of uint8 ``[S, R]`` buffers between the ranks of the group, with the
split sizes on the device::

    exchange(send, counts, recv)
        send    uint8 [S, R]   this rank's rows for rank d at [off[d], off[d] + counts[d]),
                               off = the exclusive running sum of counts (rank order)
        counts  int32 [W]      on the device (never read on the host by the real exchange)
        recv    uint8 [S', R]  filled with every source's rows for this rank, packed in
                               source order; rows past them are left as they are

Every other part of the transport (routing, plan, pack, unpack, reduce, autograd) is shared by
all three implementations, so the CPU suite and one GPU test all of it:

* :class:`NvshmemExchange`: ``torch.ops.symm_mem.all_to_all_vdev`` on PyTorch's NVSHMEM
  symmetric memory (no host sync; NVLink inside a node, the network across nodes). Needs a
  group of two or more GPUs (torch's NVSHMEM backend refuses a one-rank group).
* :class:`CollectiveExchange`: the stand-in over ``torch.distributed`` collectives (gloo on the
  CPU): the split sizes go through one small all-to-all and are read on the host (CPU tensors:
  no device sync), then one ``all_to_all_single`` with those sizes. Tests only the protocol.
* :class:`LocalExchange`: one rank (a copy of the send buffer): one GPU runs the transport's
  kernels with it, sync-free and capturable.

Buffers come from the exchange (:meth:`alloc`): symmetric memory for NVSHMEM, plain tensors else.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["CollectiveExchange", "LocalExchange", "NvshmemExchange", "exchange_ranks", "make_exchange",
           "nvshmem_available"]


def nvshmem_available() -> bool:
    """PyTorch was built with NVSHMEM and can load it (the NVSHMEM symmetric-memory backend)."""
    try:
        import torch.distributed._symmetric_memory as symm_mem
    except ImportError:
        return False
    probe = getattr(symm_mem, "is_nvshmem_available", None)
    return bool(probe()) if probe is not None and torch.cuda.is_available() else False


class LocalExchange:
    """One rank: its rows for itself are all there is to move."""

    name = "local copy (one rank)"

    def __init__(self, device: torch.device):
        self.device = device

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def __call__(self, send: torch.Tensor, counts: torch.Tensor, recv: torch.Tensor) -> None:
        # every row (the count is on the device): the copy is one launch, no read of counts
        n = min(send.shape[0], recv.shape[0])
        recv[:n].copy_(send[:n])


class CollectiveExchange:
    """The stand-in exchange over ``torch.distributed`` collectives of ``group`` (gloo on the CPU).
    Reads the split sizes on the host: for the CPU suite, not for CUDA tensors (use
    :class:`NvshmemExchange` there)."""

    name = "collective stand-in (all_to_all_single, split sizes read on the host)"

    def __init__(self, group, device: torch.device):
        if device.type == "cuda":
            raise ValueError("CollectiveExchange reads split sizes on the host: CPU tensors only (CUDA groups use "
                             "NvshmemExchange)")
        self.group, self.device = group, device

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def __call__(self, send: torch.Tensor, counts: torch.Tensor, recv: torch.Tensor) -> None:
        ins = counts.to(torch.int64)
        outs = torch.empty_like(ins)
        dist.all_to_all_single(outs, ins, group=self.group)
        n_in, n_out = ins.tolist(), outs.tolist()   # debug-only: the CPU stand-in reads CPU tensors (no device sync)
        dist.all_to_all_single(recv[:sum(n_out)], send[:sum(n_in)], output_split_sizes=n_out,
                               input_split_sizes=n_in, group=self.group)


class NvshmemExchange:
    """``torch.ops.symm_mem.all_to_all_vdev`` on the NVSHMEM backend of PyTorch's symmetric memory.

    Selects that backend (it must be chosen before the process's first symmetric allocation:
    a clear error says what to do when it is too late). The split tensors are symmetric too
    (int64 ``[W]`` in, ``[2, W]`` out), two sets used in turn: a peer still reading one call's
    splits never sees the next call's."""

    name = "NVSHMEM all_to_all_vdev"

    def __init__(self, group, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem

        if not nvshmem_available():
            raise RuntimeError("mxep: transport='nvshmem' needs PyTorch's NVSHMEM symmetric-memory backend "
                               "(torch.distributed._symmetric_memory.is_nvshmem_available() is False here); use "
                               "transport='symm_mem' inside one node or 'collective'")
        current = getattr(symm_mem, "get_backend", lambda d: None)(device)
        if current != "NVSHMEM":
            try:
                symm_mem.set_backend("NVSHMEM")
            except Exception as e:   # torch refuses once a symmetric allocation exists
                raise RuntimeError(
                    "mxep: transport='nvshmem' must select PyTorch's NVSHMEM symmetric-memory backend before the "
                    "process's first symmetric allocation, and this process already made one (a symm_mem Buffer, or "
                    "other symmetric memory). Build the nvshmem Buffer first, or call "
                    "torch.distributed._symmetric_memory.set_backend('NVSHMEM') at start-up; one process cannot mix "
                    f"it with transport='symm_mem' ({e})") from e
        self.symm_mem, self.group, self.device = symm_mem, group, device
        self.group_name = group.group_name
        W = dist.get_world_size(group)
        self._splits_in = [self._symm(W, torch.int64) for _ in range(2)]
        self._splits_out = [self._symm(2 * W, torch.int64).view(2, W) for _ in range(2)]
        self._turn = 0

    def _symm(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        t = self.symm_mem.empty(n, dtype=dtype, device=self.device)
        self.symm_mem.rendezvous(t, self.group)
        return t

    def alloc(self, nbytes: int) -> torch.Tensor:
        return self._symm(nbytes, torch.uint8)

    def __call__(self, send: torch.Tensor, counts: torch.Tensor, recv: torch.Tensor) -> None:
        ins, outs = self._splits_in[self._turn], self._splits_out[self._turn]
        self._turn ^= 1
        ins.copy_(counts)
        torch.ops.symm_mem.all_to_all_vdev(send, recv, ins, outs, self.group_name)


def make_exchange(group, device: torch.device, world_size: int):
    """The exchange of a Buffer: one rank -> :class:`LocalExchange`; CUDA -> :class:`NvshmemExchange`;
    CPU -> :class:`CollectiveExchange` (the stand-in)."""
    if world_size == 1:
        return LocalExchange(device)
    if device.type == "cuda":
        return NvshmemExchange(group, device)
    return CollectiveExchange(group, device)


def exchange_ranks(sends, counts, recvs) -> None:
    """The exchange of several ranks of one process at once (the simulated world): ``sends[s]``,
    ``counts[s]`` int32 ``[W]`` and ``recvs[d]`` as in the module docstring. Reads the counts on
    the host (a test tool, not a hot path)."""
    W = len(sends)
    cnt = [c.tolist() for c in counts]   # debug-only: the simulated world's host-side exchange
    for d in range(W):
        u = 0
        for s in range(W):
            start = sum(cnt[s][:d])
            n = cnt[s][d]
            recvs[d][u:u + n].copy_(sends[s][start:start + n])
            u += n
