"""GPU tests of the fused dispatch / combine (`make test-gpu`; skipped without CUDA).

* one GPU: the quantize kernel at model sizes (the peer-store kernels in a simulated world on
  one GPU are the cuda cases of tests/ep/test_simulated_world.py);
* every visible GPU (2 and 4 ranks where possible): real symmetric memory over NVLink through the
  public Buffer API: bit-exact layout, exact backward, reuse safety, 200 calls with changing
  routing, sync-debug mode "error", and a captured CUDA graph replayed with new inputs.

Every Buffer here poisons its outputs, and its device-side waits give up after 2**25 polls (some
30 s: a lost flag fails the test instead of hanging it).
"""
import os

import pytest
import torch

from support.dist import run_distributed
from support.fused_cases import Case, check_dispatch, expected_grad_x, gpu_cases, run_buffer_case

import mxep
from mxep.testing.timing import capture_graph
from mxep.ep.config import EPConfig

NGPU = torch.cuda.device_count() if torch.cuda.is_available() else 0
MULTI = [w for w in (2, 4) if w <= NGPU]
CONFIG = EPConfig(poison_outputs=True, wait_polls=1 << 25)

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")


@pytest.mark.gpu
@pytest.mark.skipif(NGPU < 1, reason="needs a CUDA GPU")
def test_quantize_kernel_matches_reference_on_gpu():
    from mxep.format.naive import to_mxfp8_reference

    g = torch.Generator().manual_seed(0)
    for shape in [(1, 32), (333, 7168), (4096, 5120)]:
        block_exp = torch.randint(-30, 30, (shape[0], shape[1] // 32, 1), generator=g).float()
        x = (torch.randn(*shape, generator=g) * (2.0 ** block_exp).expand(-1, -1, 32).reshape(shape)).bfloat16().cuda()
        for mode in ("rceil", "floor"):
            t = mxep.to_mxfp8(x, mode)
            q, s = to_mxfp8_reference(x.cpu(), mode)
            assert torch.equal(t.qdata.cpu().view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(t.scale.cpu().view(torch.uint8), s.view(torch.uint8))


# ----------------------------------------------------------------------------- real NVLink peers
def _symm_body(rank, world, cases):
    dev = torch.device("cuda", torch.cuda.current_device())
    for case in cases:
        buf = mxep.Buffer(None, num_experts=case.num_experts, hidden=case.hidden,
                          max_tokens_per_rank=case.max_tokens, align=case.align, scale_mode=case.scale_mode,
                          config=CONFIG)
        assert buf.transport_name == "symm_mem", repr(buf)
        # poison the receive regions so stale or unwritten rows show (the signal words keep
        # their values: they count the calls)
        buf.transport.data_regions().fill_(0xA5)
        torch.distributed.barrier()
        run_buffer_case(buf, case, rank, dev)
        del buf
    return True


@pytest.mark.multigpu
@pytest.mark.parametrize("world", MULTI)
def test_symm_mem_buffer(world):
    assert all(run_distributed(_symm_body, world, gpu_cases(world), backend="nccl", timeout=600))


def _many_calls_body(rank, world, calls):
    dev = torch.device("cuda", torch.cuda.current_device())
    E, H, N = 4 * world, 256, 96
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N, align=32, config=CONFIG)
    kinds = ("uniform", "skewed", "one_expert", "empty_experts", "none")
    pending = []
    for it in range(calls):
        routing = tuple(kinds[(it + r) % 5] for r in range(world))
        rows = tuple(0 if k == "none" else 1 + (it * 7 + r * 13) % N for r, k in enumerate(routing))
        case = Case(world, E, H, N, 32, routing, rows, seed=1000 + it)
        counts, xs = case.inputs(dev)
        res = buf.dispatch(xs[rank], counts[rank])
        pending.append((case, res, counts, xs))
        if len(pending) == 4 or it == calls - 1:  # check in batches: results must survive later calls
            for c, r_, cnt, x_ in pending:
                check_dispatch(c, rank, r_.tokens, r_.group_end_offsets, r_.tokens_per_expert, cnt, x_)
            pending.clear()
    # the signal words count the calls: every rank's counts flag and seq name the last one
    peer = buf.transport
    sig = peer.signals.tolist()
    assert [peer.signal_word(w) for w in ("seq", "status")] == [calls, 0], sig
    assert sig == [calls] * world + [calls, 0], sig
    buf.check()
    return True


@pytest.mark.multigpu
@pytest.mark.parametrize("world", MULTI)
def test_symm_mem_200_calls(world):
    assert all(run_distributed(_many_calls_body, world, 200, backend="nccl", timeout=600))


def _sync_free_body(rank, world):
    dev = torch.device("cuda", torch.cuda.current_device())
    case = Case(world, 8 * world, 2048, 256, 32, ("skewed",) * world, (250,) * world, seed=3)
    counts, xs = case.inputs(dev)
    grads, outs, gys = case.upstream(0, dev)
    buf = mxep.Buffer(None, case.num_experts, case.hidden, case.max_tokens, config=CONFIG)
    x = xs[rank].clone().requires_grad_(True)
    for mode in ("warn", "error"):   # warm-up (allocator, Triton compile) outside "error"
        torch.cuda.set_sync_debug_mode(mode)
        try:
            res = buf.dispatch(x, counts[rank])
            y = buf.combine(res.tokens.dequantize(), res.handle)
            torch.autograd.backward([y], [gys[rank]])
            with torch.no_grad():   # zero-copy pull combine
                res2 = buf.dispatch(x, counts[rank])
                zin = buf.combine_input()
                torch.mul(res2.tokens.dequantize(), 3, out=zin)
                y_zero_copy = buf.combine(zin, res2.handle)
                resz = buf.dispatch(x, counts[rank], zero_copy=True)   # tokens stay in the region
                y_zero_copy_dispatch = buf.combine(resz.tokens.dequantize() * 5, resz.handle)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    # combine(dispatch(x)) is the MXFP8 round trip of x; its grad is the bf16 gys (straight-through)
    assert torch.equal(y.detach(), mxep.to_mxfp8(xs[rank]).dequantize())
    assert torch.equal(y_zero_copy, mxep.to_mxfp8(xs[rank]).dequantize() * 3)
    assert torch.equal(y_zero_copy_dispatch, mxep.to_mxfp8(xs[rank]).dequantize() * 5)
    return True


@pytest.mark.multigpu
@pytest.mark.parametrize("world", MULTI)
def test_symm_mem_no_host_sync(world):
    assert all(run_distributed(_sync_free_body, world, backend="nccl", timeout=300))


def _graph_body(rank, world):
    dev = torch.device("cuda", torch.cuda.current_device())
    E, H, N = 4 * world, 512, 128
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=N, config=CONFIG)
    static_x = torch.zeros(N, H, dtype=torch.bfloat16, device=dev, requires_grad=True)
    static_counts = torch.zeros(E, dtype=torch.int64, device=dev)
    static_g = torch.zeros(buf.capacity, H, dtype=torch.bfloat16, device=dev)

    def step():
        res = buf.dispatch(static_x, static_counts)
        y = buf.combine(res.tokens.dequantize() * 2, res.handle)
        (gx,) = torch.autograd.grad([res.tokens.dequantize()], [static_x], [static_g])
        with torch.no_grad():   # zero-copy combine: the "experts" write into the Buffer's region
            zin = buf.combine_input()
            torch.mul(res.tokens.dequantize(), 3, out=zin)
            y3 = buf.combine(zin, res.handle)
            resz = buf.dispatch(static_x, static_counts, zero_copy=True)   # tokens in the region
            y5 = buf.combine(resz.tokens.dequantize() * 5, resz.handle)
        return res, y, gx, y3, y5

    captured = []   # capture_graph's last call of step is the captured one: its outputs are the static ones
    graph = capture_graph(lambda: captured.append(step()))
    res, y, gx, y3, y5 = captured[-1]
    for it in range(3):  # replay with new routing and data (n = N rows: the graph's static shape)
        kinds = ("uniform", "skewed", "one_expert", "empty_experts")
        case = Case(world, E, H, N, 32, tuple(kinds[(it + r) % 4] for r in range(world)), (N,) * world, seed=50 + it)
        counts, xs = case.inputs(dev)
        grads, _, _ = case.upstream(buf.capacity, dev)
        with torch.no_grad():
            static_x.copy_(xs[rank])
            static_counts.copy_(counts[rank])
            static_g.copy_(grads[rank])
        graph.replay()
        torch.cuda.synchronize()
        check_dispatch(case, rank, res.tokens, res.group_end_offsets, res.tokens_per_expert, counts, xs)
        assert torch.equal(y.cpu(), (mxep.to_mxfp8(xs[rank]).dequantize() * 2).cpu())
        assert torch.equal(y3.cpu(), (mxep.to_mxfp8(xs[rank]).dequantize() * 3).cpu())
        assert torch.equal(y5.cpu(), (mxep.to_mxfp8(xs[rank]).dequantize() * 5).cpu())
        exp = expected_grad_x(case, [gg.cpu() for gg in grads], counts)[rank]
        assert torch.equal(gx.cpu(), exp)
    return True


@pytest.mark.multigpu
@pytest.mark.parametrize("world", MULTI)
def test_symm_mem_cuda_graph(world):
    assert all(run_distributed(_graph_body, world, backend="nccl", timeout=300))
