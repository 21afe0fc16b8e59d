"""``scale_layout="blocked"``: the dispatch writes the e8m0 scales straight into sm_100's blocked
layout (mxep/format/blocked.py), bit for bit what torchao's own torch reference
(``torch_to_blocked_2d_M_groups``) makes of the row-major scales of the same dispatch and its
group ends: both levels, both transports (simulated worlds of 1-4 ranks on the symmetric-memory
kernels, gloo worlds of 1, 2 and 4 on the collective path, one-rank Buffers of both), empty
experts, groups that end mid-tile, ranks that send nothing, ``-1`` slots, capacity_factor drops,
several kernel tilings. The row-major dispatch of the same ``align=128`` layout is checked
against the layout oracle (``mxep.ep.naive``) on the way. CUDA twins run under ``-m gpu``."""
import warnings

import pytest
import torch

from support import worlds
from support.dist import single_rank_group
from support.fused_cases import POISON, Case, cases_for_world, check_dispatch, expected_combine, run_buffer_case
from test_token_dispatch import _expansion, _inputs   # (imported at collection: it registers its worlds then)

import mxep
from mxep.ep.buffer import resolve_scale_layout
from mxep.ep.config import EPConfig, KernelTiles
from mxep.ep.naive import simulate_dispatch_mxfp8
from mxep.ep.transport.symm_mem.simulated import SimulatedWorld
from mxep.ep.transport.symm_mem.transport import SymmMemTransport
from mxep.format.blocked import blocked_scale_offsets, from_blocked_scales, to_blocked_scales

try:   # torchao is optional: without it the tests compare against mxep's to_blocked_scales only
    with warnings.catch_warnings():   # torchao warns that its CUDA extensions do not load on a CPU
        warnings.simplefilter("ignore")
        import torchao.prototype.moe_training.kernels.mxfp8.quant as torchao_quant
        import torchao.prototype.mx_formats.utils as torchao_utils
except ImportError:
    torchao_quant = torchao_utils = None
needs_torchao = pytest.mark.skipif(torchao_quant is None, reason="needs torchao (the reference of the blocked layout)")

DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]


def check_blocked(blocked, row_major, group_end_offsets) -> None:
    """``blocked`` / ``row_major``: MXFP8Tensors of the same dispatch (same inputs, ``align``
    128) in the two scale layouts. The blocked scale bytes of rows ``[0, R)``, ``R =
    group_end_offsets[-1]``, are torchao's reference of the row-major scales (given whole, as
    torchao's GEMM gets them: ``[capacity, H // 32]``) and the group ends; torchao's reference
    adds 128 zero rows per group at the end (even when the groups are multiples of 128, which
    ours are), rows that nobody reads and that mxep leaves undefined, like the data rows past
    ``R``: only those differ."""
    offs = group_end_offsets.cpu()
    R, L = int(offs[-1]), offs.numel()
    assert blocked.scale_layout == "blocked" and row_major.scale_layout == "row_major"
    assert blocked.scale.dtype == torch.float8_e8m0fnu and blocked.scale.is_contiguous()
    cap, C = blocked.scale.shape
    assert cap % 128 == 0 and C == blocked.shape[1] // 32 and R % 128 == 0
    rm = row_major.scale.view(torch.uint8).cpu()
    got = blocked.scale.view(torch.uint8)[:R].cpu()
    assert torch.equal(got, to_blocked_scales(rm[:R]))
    if torchao_quant is not None:
        ref, starts = torchao_quant.torch_to_blocked_2d_M_groups(rm, offs)
        assert ref.shape == (rm.shape[0] + 128 * L, C)          # torchao's upper bound: + 128 per group
        assert starts.tolist() == [0] + offs.tolist()          # every group starts where ours does
        assert torch.equal(got, ref[:R])
        assert not ref[R:].any()                               # the rows mxep leaves undefined: zeros there
    assert torch.equal(blocked.qdata.view(torch.uint8)[:R].cpu(), row_major.qdata.view(torch.uint8)[:R].cpu())
    assert torch.equal(from_blocked_scales(blocked.scale.view(torch.uint8))[:R].cpu(), rm[:R])
    # consumers read blocked scales right: the (straight-through) dequantize
    assert torch.equal(blocked.dequantize()[:R].cpu(), row_major.dequantize()[:R].cpu())


# ------------------------------------------------------------------------- the layout itself
@needs_torchao
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,cols", [(128, 4), (384, 8), (256, 224)])
def test_blocked_helpers_match_torchao(rows, cols, device):
    g = torch.Generator().manual_seed(rows + cols)
    s = torch.randint(0, 256, (rows, cols), generator=g, dtype=torch.uint8).to(device)
    b = to_blocked_scales(s)
    assert torch.equal(b.flatten().cpu(), torchao_utils.to_blocked(s.cpu()))
    assert torch.equal(from_blocked_scales(b), s)
    # the word offsets the collective transport scatters to
    words = torch.empty(rows * cols // 4, dtype=torch.int32, device=device)
    words[blocked_scale_offsets(torch.arange(rows, device=device), cols).flatten()] = s.view(torch.int32).flatten()
    assert torch.equal(words.view(torch.uint8).view(rows, cols), b)
    # torchao's per-group conversion on groups that are multiples of 128 = the whole matrix's
    ends = torch.arange(128, rows + 1, 128, dtype=torch.int32)
    ref, starts = torchao_quant.torch_to_blocked_2d_M_groups(s.cpu(), ends)
    assert torch.equal(ref[:rows], b.cpu()) and not ref[rows:].any()
    with pytest.raises(ValueError, match="rows % 128 == 0"):
        to_blocked_scales(s[:100])


def test_mxfp8_tensor_blocked_scales():
    x = torch.randn(256, 128).bfloat16()
    t = mxep.to_mxfp8(x)
    b = mxep.MXFP8Tensor(t.qdata, to_blocked_scales(t.scale.view(torch.uint8)).view(torch.float8_e8m0fnu),
                         scale_layout="blocked")
    assert torch.equal(b.dequantize(), t.dequantize()) and "blocked" in repr(b)
    assert torch.equal(b.detach().row_major_scale().view(torch.uint8), t.scale.view(torch.uint8))
    assert torch.equal((b + 0).float(), t.dequantize().float())      # any op: on the dequantized value
    w = torch.randn(2, 64, 128).bfloat16()
    offs = torch.tensor([128, 256], dtype=torch.int32)
    assert torch.equal(mxep.grouped_mm_mxfp8(b, w, offs), mxep.grouped_mm_mxfp8(t, w, offs))
    with pytest.raises(ValueError, match="blocked scales must be"):
        mxep.MXFP8Tensor(t.qdata[:100], t.scale[:100], scale_layout="blocked")
    with pytest.raises(ValueError, match="scale_layout"):
        mxep.MXFP8Tensor(t.qdata, t.scale, scale_layout="swizzled")


# ------------------------------------------------------------------------- the Buffer setting
def test_scale_layout_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_scale_layout("auto", None, 256, cpu) == ("row_major", 32)
    assert resolve_scale_layout("auto", 128, 256, cpu) == ("row_major", 128)
    assert resolve_scale_layout("row_major", None, 96, cpu) == ("row_major", 32)
    assert resolve_scale_layout("blocked", None, 256, cpu) == ("blocked", 128)
    assert resolve_scale_layout("blocked", 256, 256, cpu) == ("blocked", 256)
    with pytest.raises(ValueError, match="align to be a multiple of 128"):
        resolve_scale_layout("blocked", 32, 256, cpu)
    with pytest.raises(ValueError, match="hidden to be a multiple of 128"):
        resolve_scale_layout("blocked", 128, 96, cpu)
    with pytest.raises(ValueError, match="scale_layout must be"):
        resolve_scale_layout("swizzled", None, 256, cpu)
    # "auto" on sm_100 (the capability query patched: no Blackwell here): blocked with align 128,
    # unless the hidden size or an explicit align rules it out
    import mxep.ep.buffer as buffer_mod
    monkeypatch.setattr(buffer_mod, "has_mx_tensor_cores", lambda device: True)
    assert resolve_scale_layout("auto", None, 7168, cpu) == ("blocked", 128)
    assert resolve_scale_layout("auto", 256, 7168, cpu) == ("blocked", 256)
    assert resolve_scale_layout("auto", 32, 7168, cpu) == ("row_major", 32)
    assert resolve_scale_layout("auto", None, 96, cpu) == ("row_major", 32)
    assert resolve_scale_layout("row_major", None, 7168, cpu) == ("row_major", 32)


def test_buffer_scale_layout_arguments():
    with single_rank_group():
        buf = mxep.Buffer(None, num_experts=4, hidden=128, max_tokens_per_rank=8)
        assert (buf.scale_layout, buf.align) == ("row_major", 32)          # the CPU default
        blk = mxep.Buffer(None, num_experts=4, hidden=128, max_tokens_per_rank=8, scale_layout="blocked")
        assert (blk.scale_layout, blk.align, blk.capacity) == ("blocked", 128, 640)   # 8 + 4 * 128, rounded up
        assert "scale_layout='blocked'" in repr(blk)
        with pytest.raises(ValueError, match="align to be a multiple of 128"):
            mxep.Buffer(None, num_experts=4, hidden=128, max_tokens_per_rank=8, align=32, scale_layout="blocked")
        with pytest.raises(ValueError, match="hidden to be a multiple of 128"):
            mxep.Buffer(None, num_experts=4, hidden=96, max_tokens_per_rank=8, scale_layout="blocked")


# ------------------------------------------------------------ symmetric-memory kernels, row level
def _world(case: Case, layout: str, device, config=POISON) -> SimulatedWorld:
    return SimulatedWorld(case.world, case.num_experts, case.hidden, case.max_tokens, case.align, case.scale_mode,
                          device=device, config=config, scale_layout=layout)


def _row_cases(world: int) -> list[Case]:
    # cases_for_world's kinds rotate over the ranks (uniform, skewed, one expert, empty experts;
    # rows not multiples of 128: every group ends mid-tile), then a rank that sends nothing
    # while the others send everything to one expert (floor scales)
    # (the interpreter pays per row and per pad row: two cases per world)
    first, *_, last = cases_for_world(world, hidden=(128,), aligns=(128,), max_tokens=24, rows=(9, 5))
    return [first, Case(world, last.num_experts, 256, last.max_tokens, 128, last.routing, last.rows, last.seed,
                        last.scale_mode)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_world_blocked_scales(world, device):
    for i, case in enumerate(_row_cases(world)):
        counts, xs = case.inputs(device)
        rm = _world(case, "row_major", device).dispatch(xs, counts)
        for zero_copy in ((False, True) if i else (False,)):   # zero-copy: the tokens are the region
            sim = _world(case, "blocked", device)
            bl = sim.dispatch(xs, counts, zero_copy=zero_copy)
            for r in range(world):
                check_dispatch(case, r, rm[r].tokens, rm[r].group_end_offsets, rm[r].tokens_per_expert, counts, xs)
                check_dispatch(case, r, bl[r].tokens, bl[r].group_end_offsets, bl[r].tokens_per_expert, counts, xs)
                check_blocked(bl[r].tokens, rm[r].tokens, bl[r].group_end_offsets)
            # the combine does not care how the scales were laid out
            _, outs, _ = case.upstream(sim.capacity, device)
            ys = sim.combine(outs, [b.handle for b in bl])
            for y, e in zip(ys, expected_combine(case, [o.cpu() for o in outs], counts)):
                assert torch.equal(y.cpu(), e)


@pytest.mark.parametrize("config", [
    EPConfig(dispatch=KernelTiles(1, 64, 4, 8), poison_outputs=True),
    EPConfig(dispatch=KernelTiles(4, 64, 4, 8), copy=KernelTiles(2, 32, 4, 8), spread_parts=1, poison_outputs=True),
    EPConfig(dispatch=KernelTiles(2, 256, 4, 8), copy=KernelTiles(16, 64, 4, 8), spread_parts=3, poison_outputs=True),
], ids=["dispatch1x64", "blocks4x64-copy2x32", "dispatch2x256-copy16x64"])
def test_blocked_scales_kernel_tunings(config):
    """Column chunks of 64 elements (2 scales: a 4-byte word of the blocked layout is written by
    two work items), row blocks, copy-out tiles narrower than a row's scales."""
    case = Case(3, 6, 256, 20, 128, ("skewed", "none", "uniform"), (19, 0, 13), seed=11)
    counts, xs = case.inputs()
    rm = _world(case, "row_major", "cpu", config).dispatch(xs, counts)
    bl = _world(case, "blocked", "cpu", config).dispatch(xs, counts)
    for r in range(3):
        check_dispatch(case, r, bl[r].tokens, bl[r].group_end_offsets, bl[r].tokens_per_expert, counts, xs)
        check_blocked(bl[r].tokens, rm[r].tokens, bl[r].group_end_offsets)


# ---------------------------------------------------------- symmetric-memory kernels, token level
TOKEN_CASES = [  # (W, E, H, T, k, kind, empty_rank, expert_capacity)
    (1, 4, 128, 9, 2, "holes", None, None),
    (2, 8, 128, 9, 3, "holes", None, None),
    (3, 6, 256, 7, 2, "skewed", 1, None),
    (4, 8, 128, 6, 2, "one_rank", 3, None),
    (2, 4, 128, 12, 2, "skewed", None, 5),     # capacity_factor drops
]


def _token_inputs(case):
    W, E, H, T, k, kind, empty, _ = case
    return _inputs(5 + W + k, W, E, H, T, k, kind, empty)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", TOKEN_CASES, ids=lambda c: f"W{c[0]}-E{c[1]}-k{c[4]}-{c[5]}-cap{c[7]}")
def test_simulated_token_dispatch_blocked_scales(case, device):
    W, E, H, T, k, kind, empty, cap = case
    xs, idx, ws = _token_inputs(case)
    on = lambda ts: [t.to(device) for t in ts]   # noqa: E731
    worlds_ = {lay: SimulatedWorld(W, E, H, T, 128, top_k=k, config=POISON, device=device, expert_capacity=cap,
                                   scale_layout=lay) for lay in ("row_major", "blocked")}
    out = {lay: w.dispatch_tokens(on(xs), on(idx), on(ws)) for lay, w in worlds_.items()}
    if cap is None:   # the row-major layout of align 128 against the oracle of the sorted expansion
        rows, counts = _expansion(xs, idx, E, k)
        ref = simulate_dispatch_mxfp8(rows, counts, 128)
        for r in range(W):
            end = int(ref[r].group_end_offsets[-1])
            o = out["row_major"][r]
            assert torch.equal(o.group_end_offsets.cpu(), ref[r].group_end_offsets)
            assert torch.equal(o.tokens.qdata.view(torch.uint8)[:end].cpu(), ref[r].qdata.view(torch.uint8))
            assert torch.equal(o.tokens.scale.view(torch.uint8)[:end].cpu(), ref[r].scale.view(torch.uint8))
    else:
        assert sum(int(((o.handle.state.pair_owner >= 0) & (o.handle.state.pair_rows < 0)).sum())
                   for o in out["blocked"]) > 0, "the case must drop pairs"
    for r in range(W):
        a, b = out["row_major"][r], out["blocked"][r]
        assert torch.equal(a.group_end_offsets, b.group_end_offsets)
        check_blocked(b.tokens, a.tokens, b.group_end_offsets)
        assert torch.equal(a.handle.state.pair_rows, b.handle.state.pair_rows)


# --------------------------------------------------------------- Buffers: both transports, both levels
def _buffer_pair(case_args, group=None, symm=False, **kw):
    bufs = {}
    for lay in ("row_major", "blocked"):
        buf = mxep.Buffer(group, scale_layout=lay, align=128, config=POISON, **case_args, **kw)
        if symm:
            buf.transport = SymmMemTransport.over_local_memory(buf.regions, buf.config, group=buf.group)
        bufs[lay] = buf
    return bufs


def _buffer_blocked_body(rank, world, symm=False):
    """Row level: the full public-API scenario (run_buffer_case: forward, reuse, backward,
    combine, zero-copy) on a blocked Buffer against the oracle, and its scales against torchao's
    rearrange of a row-major Buffer's. Token level: -1 slots, a rank without tokens, and
    capacity_factor drops."""
    group = None
    case = Case(world, 2 * world, 128, 20, 128, ("empty_experts", "none", "skewed", "uniform")[:world],
                tuple(min(20, 7 + 5 * r) if r != 1 else 0 for r in range(world)), seed=3, scale_layout="blocked")
    args = dict(num_experts=case.num_experts, hidden=case.hidden, max_tokens_per_rank=case.max_tokens)
    bufs = _buffer_pair(args, group, symm)
    run_buffer_case(bufs["blocked"], case, rank, torch.device("cpu"))
    counts, xs = case.inputs()
    res = {lay: b.dispatch(xs[rank], counts[rank]) for lay, b in bufs.items()}
    check_blocked(res["blocked"].tokens, res["row_major"].tokens, res["blocked"].group_end_offsets)

    for cf, kind in ((None, "holes"), (0.6, "skewed")):
        E, H, T, k = 2 * world, 256, 10, 2
        xs, idx, ws = _inputs(41 + world, world, E, H, T, k, kind, 1 if world > 1 else None)
        bufs = _buffer_pair(dict(num_experts=E, hidden=H, max_tokens_per_rank=T), group, symm, top_k=k,
                            capacity_factor=cf)
        x = xs[rank].clone().requires_grad_(True)
        out = {lay: b.dispatch_tokens(x, idx[rank], ws[rank]) for lay, b in bufs.items()}
        check_blocked(out["blocked"].tokens, out["row_major"].tokens, out["blocked"].group_end_offsets)
        assert int(out["blocked"].num_dropped) == int(out["row_major"].num_dropped)
        # the straight-through gradient reads through the blocked tokens like the row-major ones
        end = int(out["blocked"].group_end_offsets[-1])
        grads = []
        for lay in ("row_major", "blocked"):
            x.grad = None
            out[lay].tokens.dequantize()[:end].float().sum().backward(retain_graph=True)
            grads.append(x.grad.clone())
        assert torch.equal(*grads)
    if world > 1 and not symm:   # every rank must pass the same layout (compared at construction)
        with pytest.raises(ValueError, match="different scale_layout"):
            mxep.Buffer(group, num_experts=2 * world, hidden=128, max_tokens_per_rank=4, align=128,
                        scale_layout="blocked" if rank == 0 else "row_major")
    return True


for _w in (2, 4):   # one shared gloo world per size for the session (tests/support/worlds.py)
    worlds.register(_w, "ep/blocked-scales", _buffer_blocked_body)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_buffer_blocked_scales_gloo(world):
    """The collective transport (gloo ranks): blocked scales scattered straight to their words."""
    if world == 1:
        with single_rank_group():
            assert _buffer_blocked_body(0, 1)
    else:
        assert all(worlds.results(world, "ep/blocked-scales"))


def test_buffer_blocked_scales_symm_mem_one_rank():
    """The symmetric-memory transport's code path (one rank over local memory), both levels."""
    with single_rank_group():
        assert _buffer_blocked_body(0, 1, symm=True)


def test_blocked_token_ops_compile():
    """torch.compile(fullgraph=True) of dispatch_tokens -> combine_tokens -> backward on a
    blocked Buffer equals eager (the layout reaches the traced MXFP8Tensor as a constant)."""
    from test_token_dispatch import _one_rank_token_step, _token_forward

    with single_rank_group():
        E, H, T, k = 8, 128, 11, 3
        xs, idx, ws = _inputs(3, 1, E, H, T, k, "holes")
        buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, scale_layout="blocked")
        g = torch.Generator().manual_seed(4)
        eo = torch.randn(buf.capacity, H, generator=g).bfloat16()
        dy = torch.randn(xs[0].shape[0], H, generator=g).bfloat16()
        eager = _one_rank_token_step(buf, xs[0], idx[0], ws[0], eo, dy)
        compiled = torch.compile(_token_forward, fullgraph=True, backend="aot_eager")
        for u, v in zip(eager, _one_rank_token_step(buf, xs[0], idx[0], ws[0], eo, dy, forward=compiled)):
            assert torch.equal(u, v) if u.dtype != torch.float32 else torch.allclose(u, v, rtol=1e-4, atol=1e-4)
