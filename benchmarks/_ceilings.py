"""Transfer ceilings: the same bytes, peer to peer, with nothing else to do.

* ``ceil_ce``: the copy engines. For every peer, ``.copy_()`` of this rank's bytes for that peer
  into the peer's symmetric-memory buffer (``hdl.get_buffer(peer, ...)``), one copy per peer on
  its own stream (all peers at once), then a symmetric-memory barrier.
* ``ceil_triton``: a trivial persistent Triton kernel storing 16-byte words into the peers'
  symmetric buffers through their addresses (``hdl.buffer_ptrs``), then the barrier.
* ``ceil_nccl``: ``all_to_all_single`` of raw uint8 with equal splits carrying the average number
  of off-rank bytes (the routing's imbalance is not modelled: NCCL's best case).
* ``ceil_nccl_pairs``: ``all_to_all_single`` of raw uint8 with the routing's real per-pair splits
  (the same pair matrix as the other two movers): under skewed routing the hot rank's ingress
  bounds it as it bounds every mover, so this is the like-for-like NCCL number.

Bytes per pair come from the routing of the case (``_common.pattern_pair_bytes``), rounded up to
16 bytes per pair.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

__all__ = ["peer_store", "PeerCeilings", "nccl_ceiling", "nccl_pairs_ceiling", "simulated_peer_store_check", "round16"]

_WORD = 4  # the kernel moves int32 words; 4 words = one 16-byte vector


def round16(n: int) -> int:
    return (int(n) + 15) // 16 * 16


@triton.jit
def _peer_store_kernel(src_ptr, dst_ptr, delta_ptr, src_off_ptr, dst_off_ptr, len_ptr,
                       BLOCK: tl.constexpr, NPROG: tl.constexpr):
    # grid (NPROG, W): program (pid, peer) stores blocks pid, pid + NPROG, ... of that peer's
    # slice. Offsets and lengths are in int32 words and multiples of 4 (16 bytes).
    pid = tl.program_id(0)
    peer = tl.program_id(1)
    n = tl.multiple_of(tl.load(len_ptr + peer), 4)
    s0 = tl.multiple_of(tl.load(src_off_ptr + peer), 4)
    d0 = tl.multiple_of(tl.load(dst_off_ptr + peer) + tl.load(delta_ptr + peer), 4)
    nblk = tl.cdiv(n, BLOCK)
    blk = pid
    while blk < nblk:
        start = blk.to(tl.int64) * BLOCK
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= n:
            v = tl.load(src_ptr + s0 + offs)
            tl.store(dst_ptr + d0 + offs, v)
        else:
            m = offs < n
            v = tl.load(src_ptr + s0 + offs, mask=m)
            tl.store(dst_ptr + d0 + offs, v, mask=m)
        blk += NPROG


def peer_store(src_words: torch.Tensor, dst_local_words: torch.Tensor, delta_words: torch.Tensor,
               src_off: torch.Tensor, dst_off: torch.Tensor, lengths: torch.Tensor, nprog: int,
               block: int = 2048) -> None:
    """Store ``src_words[src_off[p] : src_off[p] + lengths[p]]`` at word ``dst_off[p]`` of peer
    ``p``'s buffer, which lives at ``dst_local_words + delta_words[p]`` (all int64 ``[W]``, in
    int32 words, multiples of 4). ``lengths[p] = 0`` skips peer ``p``."""
    W = lengths.numel()
    _peer_store_kernel[(nprog, W)](src_words, dst_local_words, delta_words, src_off, dst_off, lengths,
                                   BLOCK=block, NPROG=nprog, num_warps=4)


def _offsets(B: list[list[int]], me: int) -> tuple[list[int], list[int], list[int]]:
    """Padded lengths, source offsets (this rank's send buffer) and receive offsets (in the peer's
    buffer, sources stacked in rank order) of this rank's slices, in bytes."""
    W = len(B)
    Bp = [[round16(B[s][d]) for d in range(W)] for s in range(W)]
    lens = Bp[me]
    soff = [sum(lens[:d]) for d in range(W)]
    roff = [sum(Bp[s][d] for s in range(me)) for d in range(W)]
    return lens, soff, roff


def recv_bytes_needed(B: list[list[int]]) -> int:
    W = len(B)
    return max(sum(round16(B[s][d]) for s in range(W)) for d in range(W))


class PeerCeilings:
    """One symmetric-memory allocation (CUDA backend) reused by every case of a launch."""

    def __init__(self, group, device: torch.device, capacity_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        if torch.device(device).type != "cuda":
            raise RuntimeError("copy-engine and Triton peer-store ceilings need CUDA symmetric memory")
        self.group, self.device = group, torch.device(device)
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.capacity = round16(max(capacity_bytes, 16))
        self.mem = symm_mem.empty(self.capacity, dtype=torch.uint8, device=self.device)
        self.hdl = symm_mem.rendezvous(self.mem, group if group is not None else dist.group.WORLD)
        ptrs = [int(p) for p in self.hdl.buffer_ptrs]
        self.base_off = self.mem.data_ptr() - ptrs[self.rank]  # 0 expected; same on every rank
        deltas = [p - ptrs[self.rank] for p in ptrs]
        if any(d % 16 for d in deltas):
            raise RuntimeError(f"peer buffers are not 16-byte aligned relative to each other: {deltas}")
        self.delta_words = torch.tensor([d // _WORD for d in deltas], dtype=torch.int64, device=self.device)
        self.mem.zero_()
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(self.world)]
        sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.nprog = max(1, sms * 4 // max(1, self.world - 1))
        self.hdl.barrier(channel=0)

    @property
    def symm_bytes(self) -> int:
        return self.capacity

    def prepare(self, B: list[list[int]]) -> dict:
        """Callables ``{"ceil_ce": fn, "ceil_triton": fn}`` moving the bytes of pair matrix ``B``."""
        me, W = self.rank, self.world
        if recv_bytes_needed(B) > self.capacity:
            raise RuntimeError(f"ceiling buffer too small: need {recv_bytes_needed(B)}, have {self.capacity}")
        lens, soff, roff = _offsets(B, me)
        src = torch.randint(0, 256, (max(16, sum(lens)),), dtype=torch.uint8, device=self.device)
        peers = [d for d in range(W) if d != me and lens[d] > 0]
        dst_views = {d: self.hdl.get_buffer(d, (lens[d],), torch.uint8, self.base_off + roff[d]) for d in peers}
        src_views = {d: src[soff[d]:soff[d] + lens[d]] for d in peers}
        fork = torch.cuda.Event()
        joins = {d: torch.cuda.Event() for d in peers}

        def ce():
            cur = torch.cuda.current_stream(self.device)
            fork.record(cur)
            for d in peers:
                s = self.streams[d]
                s.wait_event(fork)
                with torch.cuda.stream(s):
                    dst_views[d].copy_(src_views[d], non_blocking=True)
                joins[d].record(s)
            for d in peers:
                cur.wait_event(joins[d])
            self.hdl.barrier(channel=0)

        as_t = lambda v: torch.tensor([x // _WORD for x in v], dtype=torch.int64, device=self.device)  # noqa: E731
        lens_w = as_t([0 if d == me else lens[d] for d in range(W)])
        soff_w, roff_w = as_t(soff), as_t(roff)
        src_words = src.view(torch.int32)
        dst_words = self.mem.view(torch.int32)

        def tri():
            peer_store(src_words, dst_words, self.delta_words, soff_w, roff_w, lens_w, self.nprog)
            self.hdl.barrier(channel=0)

        return {"ceil_ce": ce, "ceil_triton": tri, "_keep": (src, dst_views)}


def nccl_ceiling(B: list[list[int]], group, device: torch.device):
    """``all_to_all_single`` of uint8 with equal splits carrying the average off-rank bytes.
    Returns ``(fn, bytes_sent_per_rank)``."""
    W = len(B)
    avg = sum(sum(row) for row in B) / W
    chunk = round16(-(-int(avg) // max(1, W - 1)))
    inp = torch.randint(0, 256, (W * chunk,), dtype=torch.uint8, device=device)
    out = torch.empty_like(inp)

    def fn():
        dist.all_to_all_single(out, inp, group=group)

    return fn, (W - 1) * chunk


def nccl_pairs_ceiling(B: list[list[int]], group, device: torch.device):
    """``all_to_all_single`` of uint8 with this rank's real splits: ``B[me][p]`` bytes to peer
    ``p``, ``B[p][me]`` from it (16-byte rounded, nothing to itself). Returns ``fn``."""
    me, W = dist.get_rank(group), len(B)
    send = [round16(B[me][p]) if p != me else 0 for p in range(W)]
    recv = [round16(B[p][me]) if p != me else 0 for p in range(W)]
    inp = torch.randint(0, 256, (max(1, sum(send)),), dtype=torch.uint8, device=device)[: sum(send)]
    out = torch.empty(sum(recv), dtype=torch.uint8, device=device)

    def fn():
        dist.all_to_all_single(out, inp, output_split_sizes=recv, input_split_sizes=send, group=group)

    return fn


def simulated_peer_store_check(world: int = 3, seed: int = 0) -> str:
    """Run ``peer_store`` for every rank of a simulated world (all ranks' buffers inside one
    tensor on this process, CPU under TRITON_INTERPRET=1 or one GPU) and check every byte."""
    g = torch.Generator().manual_seed(seed)
    B = [[0 if s == d else int(torch.randint(0, 5000, (1,), generator=g)) for d in range(world)] for s in range(world)]
    B[0][1] = 0  # an empty pair
    cap = round16(recv_bytes_needed(B)) + 64
    pool = torch.full((world * cap,), 0xA5, dtype=torch.uint8)
    regions = [pool[r * cap:(r + 1) * cap] for r in range(world)]
    expect = [torch.full((cap,), 0xA5, dtype=torch.uint8) for _ in range(world)]
    for me in range(world):
        lens, soff, roff = _offsets(B, me)
        src = torch.randint(0, 256, (max(16, sum(lens)),), dtype=torch.uint8, generator=g)
        deltas = [(regions[d].data_ptr() - regions[me].data_ptr()) // _WORD for d in range(world)]
        t = lambda v: torch.tensor([x // _WORD for x in v], dtype=torch.int64)  # noqa: E731
        peer_store(src.view(torch.int32), regions[me].view(torch.int32), torch.tensor(deltas, dtype=torch.int64),
                   t(soff), t(roff), t([0 if d == me else lens[d] for d in range(world)]), nprog=3, block=64)
        for d in range(world):
            if d != me and lens[d]:
                expect[d][roff[d]:roff[d] + lens[d]] = src[soff[d]:soff[d] + lens[d]]
    for r in range(world):
        if not torch.equal(regions[r], expect[r]):
            bad = (regions[r] != expect[r]).nonzero().flatten()[:5].tolist()
            return f"mismatch on simulated rank {r} at bytes {bad}"
    return "ok"
