"""mxep as torchtitan's EP token dispatcher (``mxep.integrations.torchtitan``): torchtitan 0.3.0's
own ``MoE`` module (router, ``RoutedExperts``, ``GroupedExperts``), built twice from one config
and seed, once with its standard dispatcher (``AllToAllTokenDispatcher``: local reorder at EP =
1, all-to-all + permute at EP > 1) and once with ``MXEPTokenDispatcher``; expert parallelism
through torchtitan's own ``Module.parallelize`` (ParallelDims, ``partial_dtensor`` backend:
the one whose all-to-all runs on gloo), on 1, 2 and 4 CPU ranks, eager and under
``torch.compile(fullgraph=True)`` as torchtitan compiles its blocks (``aot_eager``: CPU). The
eager cases select mxep on the config (``use_mxep_dispatcher(config)``, what the override does),
the compiled ones swap it into the built, parallelized model (``use_mxep_dispatcher(model)``).

The mxep path quantizes the dispatched tokens to MXFP8, so it is compared with the bf16 standard
path within MXFP8 tolerance (SQNR over all ranks): >= 25 dB for the output and the input
gradient, >= 21 dB for the weight gradients (experts' w1 / w2 / w3, router gate). One spawn per
world size runs every case (start-up is the cost on a 2-core machine).
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

if os.environ.get("CI") != "true":   # CI installs torchtitan (pyproject [test], scripts/ensure_deps.py --test)
    pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install torchtitan==0.3.0)")

from support.dist import run_distributed  # noqa: E402
from support.titan import global_grad, plain_moe_config, torchtitan_ep_dims  # noqa: E402

from mxep.testing import sqnr_db  # noqa: E402

D, F, E, K = 64, 32, 8, 2        # hidden, expert FFN hidden, experts, top-k
B, S = 1, 32                     # tokens per rank: T = B * S
T = B * S
SQNR_ACT, SQNR_WEIGHT = 25.0, 21.0


def _moe_config(mxep: bool, world: int):
    import spmd_types as spmd
    from torchtitan.models.common.moe_sharding import set_moe_sharding_config

    cfg = plain_moe_config(E, D, F, K)
    if mxep:
        from mxep.integrations.torchtitan import use_mxep_dispatcher
        assert use_mxep_dispatcher(cfg, num_max_tokens_per_rank=T) == ["routed_experts"]
    if world > 1:
        set_moe_sharding_config(cfg, enable_ep=True, enable_sp=False,
                                expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    return cfg



def _collecting_aot_eager(graphs: list, frames: list):
    """``aot_eager`` that keeps the forward and backward graphs it runs and counts the frames."""
    from torch._dynamo.backends.common import aot_autograd

    def keep(gm, example_inputs):
        graphs.append(gm)
        return gm

    aot = aot_autograd(fw_compiler=keep, bw_compiler=keep)

    def backend(gm, example_inputs):
        frames.append(gm)
        return aot(gm, example_inputs)

    return backend


def _fp8_consumers(graphs: list) -> dict:
    """In compiled forward + backward graphs: the dequantize passes (``mxep.dequantize_mxfp8``
    nodes) and every other node that reads an fp8 tensor (a fallback dequantization would)."""
    import operator

    fp8 = (torch.float8_e4m3fn, torch.float8_e8m0fnu)
    found = {"op": 0, "fallback": 0}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            if node.target is torch.ops.mxep.dequantize_mxfp8.default:
                found["op"] += 1
            elif any(isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dtype in fp8
                     for a in node.all_input_nodes):
                found["fallback"] += 1
    return found


def _body(rank: int, world: int, modes: tuple) -> dict:
    import torch._dynamo
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend

    import mxep.format.mxfp8 as mxfp8_mod
    from mxep.integrations.torchtitan import MXEPTokenDispatcher, use_mxep_dispatcher

    # what torchtitan's apply_compile sets before compiling its blocks
    torch._dynamo.config.capture_scalar_outputs = True
    pd = torchtitan_ep_dims(world)

    # count the dequantize passes: the grouped GEMMs' (dequantize_mxfp8_op) and any fallback of
    # an op that MXFP8Tensor does not handle (the torch expression, a full extra pass)
    calls = {"op": 0, "fallback": 0}
    op, fallback = mxfp8_mod.dequantize_mxfp8_op, mxfp8_mod.dequantize_mxfp8_reference

    def counting(name, fn):
        def wrapped(*a, **k):
            calls[name] += 1
            return fn(*a, **k)
        return wrapped

    torch.manual_seed(100 + rank)
    x = torch.randn(B, S, D).bfloat16()
    dy = torch.randn(B, S, D).bfloat16()
    out = {}
    for mode in modes:
        if mode == "spmd_types":
            continue
        for path in ("std", "mxep"):
            torch.manual_seed(0)   # same weights in both paths and on every rank
            # mxep selected on the config (eager) or swapped into the built, parallelized model
            moe = _moe_config(path == "mxep" and mode == "eager", world).build()
            moe.init_states()
            moe = moe.bfloat16()
            if pd is not None:
                moe.parallelize(pd)
            if path == "mxep" and mode == "compile":
                assert use_mxep_dispatcher(moe, num_max_tokens_per_rank=T) == ["routed_experts"]
            disp = moe.routed_experts.token_dispatcher
            assert isinstance(disp, MXEPTokenDispatcher) == (path == "mxep")
            fn, graphs, frames = moe, [], []
            if mode == "compile":
                torch._dynamo.reset()
                fn = torch.compile(moe, fullgraph=True, backend=_collecting_aot_eager(graphs, frames))
            xi = x.clone().requires_grad_(True)
            calls.update(op=0, fallback=0)
            mxfp8_mod.dequantize_mxfp8_op = counting("op", op)
            mxfp8_mod.dequantize_mxfp8_reference = counting("fallback", fallback)
            try:
                y = fn(xi)
                y.backward(dy)
            finally:
                mxfp8_mod.dequantize_mxfp8_op, mxfp8_mod.dequantize_mxfp8_reference = op, fallback
            ge = moe.routed_experts.inner_experts
            res = {"y": y.detach().float(), "gx": xi.grad.float(),
                   "g_router": global_grad(moe.router.gate.weight, world),
                   **{n: global_grad(getattr(ge, n), world) for n in ("w1_EFD", "w2_EDF", "w3_EFD")},
                   "frames": len(frames), "calls": dict(calls) if mode == "eager" else _fp8_consumers(graphs)}
            if path == "mxep" and mode == "eager":
                # the dispatcher's contract, checked on a fresh call: MXFP8 tokens, padded counts
                with torch.no_grad():
                    scores, ids, _ = moe.router(x.detach(), moe.expert_bias_E)
                    tokens, padded, meta = disp.dispatch(x.detach().view(T, D), scores.view(T, K), ids.view(T, K),
                                                         torch.zeros(E, dtype=torch.int64))
                res["layout"] = {"type": type(tokens).__name__, "shape": tuple(tokens.shape),
                                 "padded": padded.tolist(), "ends": meta.handle.group_end_offsets.tolist(),
                                 "received": meta.handle.tokens_per_expert.tolist(), "capacity": disp.buffer.capacity}
            out[(mode, path)] = res
    if "eager" in modes and world == 2:
        # the NVSHMEM transport (on gloo: its exchange's stand-in) behind the same dispatcher:
        # the compiled model with the dispatcher swapped in, as the "compile" path builds it
        torch.manual_seed(0)
        moe = _moe_config(False, world).build()
        moe.init_states()
        moe = moe.bfloat16()
        moe.parallelize(pd)
        assert use_mxep_dispatcher(moe, num_max_tokens_per_rank=T, transport="nvshmem") == ["routed_experts"]
        assert moe.routed_experts.token_dispatcher.buffer is None or \
            moe.routed_experts.token_dispatcher.buffer.transport_name == "nvshmem"
        xi = x.clone().requires_grad_(True)
        y = moe(xi)
        y.backward(dy)
        assert moe.routed_experts.token_dispatcher.buffer.transport_name == "nvshmem"
        out[("eager", "mxep_nvshmem")] = {"y": y.detach().float(), "gx": xi.grad.float()}
    if "spmd_types" in modes and world > 1:
        # torchtitan's default SPMD backend (its standard dispatcher's all-to-all does not run on
        # gloo there: the reference stays the partial_dtensor run above)
        from torchtitan.distributed.utils import get_spmd_context
        par2 = ParallelismConfig(data_parallel_shard_degree=world, expert_parallel_degree=world,
                                 spmd_backend="spmd_types")
        set_spmd_backend(par2.spmd_backend)
        pd2 = ParallelDims.from_config(par2, world)
        pd2.build_mesh()
        torch.manual_seed(0)
        moe = _moe_config(True, world).build()
        moe.init_states()
        moe = moe.bfloat16()
        moe.parallelize(pd2)
        xi = x.clone().requires_grad_(True)
        with get_spmd_context(parallel_dims=pd2)():
            y = moe(xi)
            y.backward(dy)
        import torch.distributed as dist

        def gathered(p):   # spmd_types keeps this rank's experts as a plain [E / W, ...] tensor
            g = p.grad.float().contiguous()
            assert g.shape[0] == E // world, g.shape
            parts = [torch.empty_like(g) for _ in range(world)]
            dist.all_gather(parts, g)
            return torch.cat(parts)

        ge = moe.routed_experts.inner_experts
        out[("spmd_types", "mxep")] = {"y": y.detach().float(), "gx": xi.grad.float(),
                                       **{n: gathered(getattr(ge, n)) for n in ("w1_EFD", "w2_EDF", "w3_EFD")}}
    return out


@functools.lru_cache(maxsize=None)
def _results(world: int) -> tuple:
    modes = ("eager", "compile") + (("spmd_types",) if world == 2 else ())
    return tuple(run_distributed(_body, world, modes, timeout=300))


def _cat(results, key, name):
    return torch.cat([r[key][name].flatten() for r in results])


@pytest.mark.parametrize("mode", ["eager", "compile"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_mxep_dispatcher_matches_standard(world, mode):
    """Output, input gradient and weight gradients of torchtitan's MoE with mxep's dispatcher
    against its standard dispatcher (bf16), within MXFP8 tolerance, on every rank."""
    results = _results(world)
    std, mx = (mode, "std"), (mode, "mxep")
    for name, floor in (("y", SQNR_ACT), ("gx", SQNR_ACT)):
        got = sqnr_db(_cat(results, mx, name), _cat(results, std, name))
        assert got >= floor, f"{name}: SQNR {got:.1f} dB < {floor} dB (world {world}, {mode})"
    for name in ("g_router", "w1_EFD", "w2_EDF", "w3_EFD"):
        got = sqnr_db(results[0][mx][name], results[0][std][name])   # global gradients: every rank has them
        assert got >= SQNR_WEIGHT, f"{name}: SQNR {got:.1f} dB < {SQNR_WEIGHT} dB (world {world}, {mode})"
    for r in results:
        assert torch.isfinite(r[mx]["y"]).all() and torch.isfinite(r[mx]["gx"]).all()
        # GroupedExperts' three torch._grouped_mm calls: w1 and w3 read the MXFP8 tokens (one
        # dequantize pass each, forward) and their weight gradients again (backward); nothing
        # else ever dequantizes them (no fallback pass of an unhandled op). Eager: the calls;
        # compiled: the nodes of the forward and backward graphs.
        assert r[mx]["calls"] == {"op": 4, "fallback": 0}, r[mx]["calls"]
        if mode == "compile":
            assert r[mx]["frames"] == 1 and r[std]["frames"] == 1   # fullgraph: one graph each
        else:   # eager mxep is deterministic and equals the compiled run
            for name in ("y", "gx"):
                assert torch.allclose(r[mx][name], r[("compile", "mxep")][name], rtol=1e-2, atol=1e-2)


def test_mxep_dispatcher_on_the_nvshmem_transport():
    """EP = 2, the dispatcher on ``transport="nvshmem"`` (gloo: the exchange's stand-in): the
    output bit for bit the collective transport's; the input gradient to fp32 rounding (the
    gate-weight gradients are kernel dot products on one, torch's on the other)."""
    for r in _results(2):
        assert torch.equal(r[("eager", "mxep_nvshmem")]["y"], r[("eager", "mxep")]["y"])
        assert torch.allclose(r[("eager", "mxep_nvshmem")]["gx"], r[("eager", "mxep")]["gx"], rtol=1e-2, atol=1e-3)


def test_mxep_dispatcher_under_spmd_types_backend():
    """torchtitan's default SPMD backend (``spmd_types``) at EP = 2: the same numbers as the
    ``partial_dtensor`` run (mxep does not depend on the backend's collectives)."""
    results = _results(2)
    for name in ("y", "gx"):
        assert torch.equal(_cat(results, ("eager", "mxep"), name), _cat(results, ("spmd_types", "mxep"), name))
    for name in ("w1_EFD", "w2_EDF", "w3_EFD"):
        assert torch.equal(results[0][("eager", "mxep")][name], results[0][("spmd_types", "mxep")][name])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dispatch_returns_padded_mxfp8_layout(world):
    """``dispatch`` hands GroupedExperts the MXFP8Tensor ``[capacity, D]`` and the PADDED rows per
    local expert (multiples of 32, empty experts 32), whose cumsum is the layout's group ends."""
    for r in _results(world):
        lay = r[("eager", "mxep")]["layout"]
        L = E // world
        assert lay["type"] == "MXFP8Tensor" and lay["shape"] == (lay["capacity"], D)
        assert len(lay["padded"]) == L and all(p % 32 == 0 and p >= 32 for p in lay["padded"])
        assert torch.tensor(lay["padded"]).cumsum(0).tolist() == lay["ends"]
        assert all(p >= n for p, n in zip(lay["padded"], lay["received"]))
    # every (token, expert) pair of every rank is received exactly once
    assert sum(sum(r[("eager", "mxep")]["layout"]["received"]) for r in _results(world)) == world * T * K


def test_override_and_config_selection():
    """The torchtitan override (``--override.imports mxep.integrations.torchtitan.mxep_dispatcher``)
    swaps the standard dispatcher of every MoE layer of a model config, with ``hidden_dim`` from
    the experts; other dispatchers are refused."""
    from torchtitan.config.override import OverrideConfig, apply_overrides
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher
    from torchtitan.models.deepseek_v3 import model_registry

    from mxep.integrations.torchtitan import MXEPTokenDispatcher, use_mxep_dispatcher

    model_cfg = model_registry("debugmodel").model
    lines = apply_overrides(OverrideConfig(imports=[("mxep.integrations.torchtitan.mxep_dispatcher",
                                                     {"num_max_tokens_per_rank": 4096})]), model_cfg)
    moe_layers = [layer.moe for layer in model_cfg.layers if layer.moe is not None]
    assert len(lines) == len(moe_layers) == 5
    for moe in moe_layers:
        d = moe.routed_experts.token_dispatcher
        assert isinstance(d, MXEPTokenDispatcher.Config)
        assert (d.num_experts, d.top_k, d.hidden_dim, d.num_max_tokens_per_rank, d.align) == (8, 3, 256, 4096, 32)
    # applying it again changes nothing; a non-standard (padded TorchAO) dispatcher is refused
    assert use_mxep_dispatcher(model_cfg) == [f"layers.{i}.moe.routed_experts" for i in range(1, 6)]
    moe_layers[0].routed_experts.token_dispatcher = TorchAOTokenDispatcher.Config(num_experts=8, top_k=3,
                                                                                   pad_multiple=32)
    with pytest.raises(ValueError, match="standard token dispatcher"):
        use_mxep_dispatcher(model_cfg)


def test_torchtitan_imported_lazily():
    """``import mxep`` / ``mxep.integrations`` never import torchtitan; without it the integration
    module says how to install it."""
    code = ("import sys, mxep, mxep.integrations\n"
            "assert 'torchtitan' not in sys.modules, 'imported eagerly'\n"
            "sys.modules['torchtitan'] = None\n"
            "try:\n"
            "    from mxep.integrations import use_mxep_dispatcher\n"
            "except ImportError as e:\n"
            "    assert 'pip install torchtitan==0.3.0' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no ImportError')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "..", "src"),
                                                       os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_grouped_mm_on_mxfp8_tensor_is_grouped_mm_mxfp8():
    """``torch._grouped_mm`` on an MXFP8Tensor (what torchtitan's GroupedExperts calls) is
    ``mxep.grouped_mm_mxfp8``: the same forward rows and the same bf16 gradients of the tokens
    (straight-through) and of the weights, with rows past the last group end ignored."""
    import mxep
    from mxep.format.mxfp8 import quantize_straight_through

    torch.manual_seed(0)
    cap, K, N = 96, 64, 48
    ends = torch.tensor([32, 32, 64], dtype=torch.int32)        # an empty group; rows 64.. unused
    x = torch.randn(cap, K).bfloat16()
    w = torch.randn(3, N, K).bfloat16()
    dy = torch.randn(cap, N).bfloat16()
    got = []
    for via_aten in (True, False):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        tokens = quantize_straight_through(xi)
        if via_aten:
            y = torch._grouped_mm(tokens, wi.transpose(-2, -1), offs=ends)
        else:
            y = mxep.grouped_mm_mxfp8(tokens, wi, ends)
        y.backward(dy)
        got.append((y[:64], xi.grad[:64], wi.grad))
    for a, b in zip(*got):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-2), (a.float() - b.float()).abs().max()
    assert torch.equal(got[0][0], got[1][0])   # the forward rows: the same dequantize + GEMM


def _sac_body(rank, world):
    """A block (dispatch -> experts -> combine) under torchtitan's selective AC: with
    MXEPSelectiveAC the dispatch runs once per step (its output is saved), with the plain
    SelectiveAC it runs again in the backward's recompute; the gradients are the same."""
    import torch.nn as nn
    from torchtitan.distributed.activation_checkpoint import SelectiveAC

    import mxep
    from mxep.integrations.torchtitan import MXEPSelectiveAC

    buf = mxep.Buffer(None, num_experts=E, hidden=D, max_tokens_per_rank=T, top_k=K)
    calls = {"n": 0}
    inner = buf.transport.dispatch_tokens

    def counted(*a, **k):
        calls["n"] += 1
        return inner(*a, **k)

    buf.transport.dispatch_tokens = counted

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, x):
            g = torch.Generator().manual_seed(3)
            idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(x.shape[0])])
            gates = torch.softmax(x.float()[:, :K], -1)
            res = buf.dispatch_tokens(x, idx, gates)
            out = (res.tokens.dequantize() * self.w).bfloat16()
            return buf.combine_tokens(out, res.handle, gates)

    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    out = {}
    for name, cfg in (("mxep", MXEPSelectiveAC.Config()), ("plain", SelectiveAC.Config())):
        block = cfg.build()._wrap_block(Block())
        calls["n"] = 0
        xi = x.clone().requires_grad_(True)
        y = block(xi)
        y.float().sum().backward()
        out[name] = (calls["n"], xi.grad.clone())
    return out["mxep"][0] == 1 and out["plain"][0] == 2 and torch.equal(out["mxep"][1], out["plain"][1])


def test_selective_ac_saves_mxep_communication():
    assert all(run_distributed(_sac_body, 1, timeout=120))
