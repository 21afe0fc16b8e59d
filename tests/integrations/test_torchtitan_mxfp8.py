"""torchtitan's MXFP8 expert training on mxep's dispatcher (``use_mxep_dispatcher(...,
mxfp8_experts=True)``): torchtitan 0.3.0's ``MoE`` module converted by its own
``MXFP8GroupedExpertsConverter`` (torchao's MXFP8 grouped GEMMs, recipe ``mxfp8_emulated_rceil``:
torchao's emulated kernels, the only ones that run without sm_100), built twice from one config
and seed: once as torchtitan leaves it (the converter's padded ``TorchAOTokenDispatcher``, whose
experts quantize the bf16 tokens), once with mxep's dispatcher (the tokens quantized once, in the
dispatch, and handed to torchao's GEMM pre-quantized). Expert parallelism through torchtitan's
own ``Module.parallelize`` (``partial_dtensor``) on 1, 2 and 4 CPU gloo ranks, eager and
``torch.compile(fullgraph=True, backend="aot_eager")``.

Two things are patched, both in ``_body`` and undone there:

* the converter's ``__init__`` refuses to be built below sm_100 (``has_cuda_capability(10, 0)``):
  that one check is patched to pass while the converter is built (``convert`` is torchtitan's,
  unchanged);
* torchao's ``fill_indices_wrapper`` (the Triton kernel of the padded dispatcher's
  ``permute_and_pad``) does not run under the Triton interpreter (it loops over a range with
  tensor bounds): it is replaced by torchao's own CPU reference ``fill_indices_cpu``, as a custom
  op so that ``torch.compile`` traces it.

Checked: outputs and gradients within MXFP8 tolerance of each other (SQNR over all ranks),
floors >= 40 dB for the output, >= 30 dB for the input gradient, >= 25 dB for the weight
gradients. Both paths quantize the tokens with RCEIL and run the same emulated GEMMs; measured
(CPU, torch 2.13, torchao 0.18.0; EP 1 / 2 / 4, eager = compiled): output 50.9 / 54.5 / 59.7 dB
(mxep's combine reduces in fp32, the standard one in bf16); input gradient, router and ``w2``
gradients bit-identical (inf dB: the same torchao dgrad and ``w2`` GEMM on both paths); ``w1`` /
``w3`` gradients 31.4-31.6 dB (mxep's path computes them in bf16 from the dispatched tokens,
``wgrad_with_hp``; the converter's quantizes both operands along the token dimension). Pad 128
(EP 1, eager): the same numbers. And the count of torchao quantize
calls on the tokens (wrapping ``to_mx`` and the sm_100 entry points where the converter's path
calls them): the standard path quantizes the tokens 4 times per step (``w1`` and ``w3`` forward,
and their weight gradients along dim 1), mxep's path never.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

if os.environ.get("CI") != "true":   # CI installs torchtitan (pyproject [test], scripts/ensure_deps.py --test)
    pytest.importorskip("torchtitan", reason="torchtitan is not installed (pip install torchtitan==0.3.0)")
pytest.importorskip("torchao", reason="torchao is not installed (the MXFP8 experts path needs it)")

from support import worlds
from support.titan import global_grad, plain_moe_config, torchtitan_ep_dims  # noqa: E402

from mxep.testing import sqnr_db  # noqa: E402

D, F, E, K = 64, 96, 8, 2        # hidden, expert FFN hidden (!= D: the counts tell A from h), experts, top-k
B, S = 1, 32                     # tokens per rank: T = B * S
T = B * S
SQNR_Y, SQNR_GX, SQNR_WEIGHT = 40.0, 30.0, 25.0
WORLDS = (1, 2, 4)


@torch.library.custom_op("mxep_test::torchao_fill_indices", mutates_args=())
def _fill_indices(tokens_per_expert_group: torch.Tensor, start_index_values: torch.Tensor,
                  write_offsets: torch.Tensor, experts_per_rank: int, num_ranks: int, max_len: int) -> torch.Tensor:
    """torchao's ``fill_indices_cpu`` (its reference of the Triton kernel) as an op: int32 ``[max_len]``."""
    from torchao.prototype.moe_training.ep.kernels import fill_indices_cpu
    return fill_indices_cpu(tokens_per_expert_group, start_index_values, write_offsets, experts_per_rank,
                            num_ranks, max_len)


@_fill_indices.register_fake
def _(tokens_per_expert_group, start_index_values, write_offsets, experts_per_rank, num_ranks, max_len):
    return tokens_per_expert_group.new_empty(max_len, dtype=torch.int32)


def _converted_config(world: int, mxep: bool, pad_multiple: int = 32):
    """torchtitan's MoE config after its MXFP8 converter (emulated recipe), sharded for EP, then
    (``mxep``) mxep selected on the config: the order of a torchtitan job (the model registry
    applies converters, ``update_from_config`` the sharding, then the Trainer the overrides)."""
    from unittest import mock

    import spmd_types as spmd
    import torchtitan.components.quantization.mx as tt_mx
    from torchtitan.models.common.moe_sharding import set_moe_sharding_config

    cfg = plain_moe_config(E, D, F, K)
    # the converter's sm_100 check, and only it, passes on CPU
    with mock.patch.object(tt_mx, "has_cuda_capability", lambda major, minor: True):
        converter = tt_mx.MXFP8GroupedExpertsConverter.Config(recipe_name="mxfp8_emulated_rceil",
                                                               pad_multiple=pad_multiple).build()
    cfg = converter.convert(cfg)
    if world > 1:
        set_moe_sharding_config(cfg, enable_ep=True, enable_sp=False,
                                expert_param_layout={"w1_EFD": spmd.S(1), "w2_EDF": spmd.S(2), "w3_EFD": spmd.S(1)})
    if mxep:
        from mxep.integrations.torchtitan import use_mxep_dispatcher
        assert use_mxep_dispatcher(cfg, num_max_tokens_per_rank=T, mxfp8_experts=True) == ["routed_experts"]
    return cfg


class _QuantizeCounter:
    """Wraps torchao's quantize entry points that the MXFP8 grouped GEMM calls (``to_mx``, the
    emulated one; ``MXTensor.to_mx``; the sm_100 CuTeDSL / Triton casts) and counts the calls
    whose input is the tokens: a 2-D ``[M, D]`` activation in a forward GEMM (``A``; the SwiGLU
    output ``h`` is ``[M, F]``, the weights 3-D), or the ``[D, M]`` transposed activation in the
    weight gradient of a GEMM whose input is ``[M, D]`` (``w1``, ``w3``)."""

    def __init__(self):
        import torchao.prototype.moe_training.mxfp8_grouped_mm as mm
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        self.mm, self.mxtensor = mm, MXTensor
        self.total = self.tokens = 0
        self.phase, self.wgrad_input_dim = None, None
        self.saved = {}

    def _count(self, x):
        self.total += 1
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            if self.phase == "fwd" and x.shape[-1] == D:
                self.tokens += 1
            elif self.phase == "wgrad" and self.wgrad_input_dim == D and x.shape[0] == D:
                self.tokens += 1

    def __enter__(self):
        mm = self.mm

        def quantize(fn):
            def wrapped(x, *a, **k):
                self._count(x)
                return fn(x, *a, **k)
            return wrapped

        def phase(name, fn):
            def wrapped(*a, **k):
                prev = self.phase, self.wgrad_input_dim
                self.phase = name
                if name == "wgrad":
                    self.wgrad_input_dim = a[1].shape[-1]   # _compute_wgrad(grad_output, input_act, ...)
                try:
                    return fn(*a, **k)
                finally:
                    self.phase, self.wgrad_input_dim = prev
            return wrapped

        for n in ("to_mx", "mxfp8_quantize_2d_1x32_cutedsl", "triton_to_mxfp8_dim0", "_to_mxfp8_dim1_kernel_wrapper"):
            self.saved[n] = getattr(mm, n)
            setattr(mm, n, quantize(self.saved[n]))
        for n, p in (("_compute_fwd", "fwd"), ("_compute_dgrad", "dgrad"), ("_compute_wgrad", "wgrad")):
            self.saved[n] = getattr(mm, n)
            setattr(mm, n, phase(p, self.saved[n]))
        self.saved["MXTensor.to_mx"] = self.mxtensor.__dict__["to_mx"]
        self.mxtensor.to_mx = staticmethod(quantize(self.mxtensor.to_mx))
        return self

    def __exit__(self, *exc):
        for n, fn in self.saved.items():
            if n == "MXTensor.to_mx":
                self.mxtensor.to_mx = fn
            else:
                setattr(self.mm, n, fn)

    def reset(self):
        self.total = self.tokens = 0



def _body(rank: int, world: int) -> dict:
    import torch._dynamo
    import torchao.prototype.moe_training.ep.kernels as ao_ep_kernels
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

    from mxep.integrations.torchtitan import MXEPTokenDispatcher, use_mxep_dispatcher

    pd = torchtitan_ep_dims(world)

    torch.manual_seed(100 + rank)
    x = torch.randn(B, S, D).bfloat16()
    dy = torch.randn(B, S, D).bfloat16()
    out = {}
    saved_fill, saved_scalar = ao_ep_kernels.fill_indices_wrapper, torch._dynamo.config.capture_scalar_outputs
    ao_ep_kernels.fill_indices_wrapper = lambda *a, **k: torch.ops.mxep_test.torchao_fill_indices(*a[:6])
    torch._dynamo.config.capture_scalar_outputs = True   # what torchtitan's apply_compile sets
    try:
        with _QuantizeCounter() as counter:
            for mode, pad in _cases(world):
                for path in ("std", "mxep"):
                    torch.manual_seed(0)   # same weights in both paths and on every rank
                    # mxep selected on the config (eager) or swapped into the built model (compile)
                    moe = _converted_config(world, path == "mxep" and mode == "eager", pad).build()
                    moe.init_states()
                    moe = moe.bfloat16()
                    if pd is not None:
                        moe.parallelize(pd)
                    if path == "mxep" and mode == "compile":
                        assert use_mxep_dispatcher(moe, num_max_tokens_per_rank=T,
                                                   mxfp8_experts=True) == ["routed_experts"]
                    disp = moe.routed_experts.token_dispatcher
                    ge = moe.routed_experts.inner_experts
                    fn = moe
                    if mode == "compile":
                        torch._dynamo.reset()
                        fn = torch.compile(moe, fullgraph=True, backend="aot_eager")
                    xi = x.clone().requires_grad_(True)
                    counter.reset()
                    y = fn(xi)
                    y.backward(dy)
                    res = {"y": y.detach().float(), "gx": xi.grad.float(),
                           "g_router": global_grad(moe.router.gate.weight, world),
                           **{n: global_grad(getattr(ge, n), world) for n in ("w1_EFD", "w2_EDF", "w3_EFD")},
                           "quantize": {"tokens": counter.tokens, "total": counter.total},
                           "dispatcher": type(disp).__name__, "experts": type(ge).__name__,
                           "padded_dispatcher": isinstance(disp, TorchAOTokenDispatcher)}
                    if isinstance(disp, MXEPTokenDispatcher):
                        res["buffer"] = {"align": disp.buffer.align, "scale_mode": disp.buffer.scale_mode}
                        with torch.no_grad():   # the layout the experts received: groups padded to align
                            scores, ids, _ = moe.router(x, moe.expert_bias_E)
                            _, padded, _ = disp.dispatch(x.view(T, D), scores.view(T, K), ids.view(T, K),
                                                         torch.zeros(E, dtype=torch.int64))
                        res["padded"] = padded.tolist()
                    out[(mode, pad, path)] = res
    finally:
        ao_ep_kernels.fill_indices_wrapper = saved_fill
        torch._dynamo.config.capture_scalar_outputs = saved_scalar
        torch._dynamo.reset()
    return out


for _w in WORLDS:
    worlds.register(_w, "integrations/torchtitan-mxfp8", _body)

def _cases(world: int) -> tuple:
    """(mode, pad_multiple): eager and compiled with the converter's default padding; at EP = 1
    also eager with the 128 rows that sm_100's CuTeDSL quantization kernel wants."""
    return (("eager", 32), ("compile", 32)) + ((("eager", 128),) if world == 1 else ())


CASES = [(w, c) for w in WORLDS for c in _cases(w)]
CASE_IDS = [f"{w}-{m}-pad{p}" for w, (m, p) in CASES]


def _cat(results, key, name):
    return torch.cat([r[key][name].flatten() for r in results])


def sqnr_table(world: int) -> dict:
    """``{(mode, pad): {name: dB}}``: mxep's path against the standard one (reported below)."""
    results = worlds.results(world, "integrations/torchtitan-mxfp8")
    table = {}
    for mode, pad in _cases(world):
        std, mx = (mode, pad, "std"), (mode, pad, "mxep")
        row = {n: sqnr_db(_cat(results, mx, n), _cat(results, std, n)) for n in ("y", "gx")}
        row.update({n: sqnr_db(results[0][mx][n], results[0][std][n])   # global: every rank has them
                    for n in ("g_router", "w1_EFD", "w2_EDF", "w3_EFD")})
        table[(mode, pad)] = row
    return table


@pytest.mark.parametrize("world,case", CASES, ids=CASE_IDS)
def test_mxfp8_experts_on_mxep_dispatcher_match_converter(world, case):
    """torchtitan's MXFP8 experts on mxep's dispatcher against the same experts on the converter's
    padded dispatcher: output, input gradient and weight gradients within MXFP8 tolerance
    (module docstring: >= 40 / 30 / 25 dB), on every rank."""
    row = sqnr_table(world)[case]
    print(f"\nSQNR dB, world {world}, {case}: " + ", ".join(f"{n} {db:.1f}" for n, db in row.items()))
    floors = {"y": SQNR_Y, "gx": SQNR_GX, "g_router": SQNR_WEIGHT, "w1_EFD": SQNR_WEIGHT, "w2_EDF": SQNR_WEIGHT,
              "w3_EFD": SQNR_WEIGHT}
    low = {n: round(db, 1) for n, db in row.items() if db < floors[n]}
    assert not low, f"SQNR below the floor (world {world}, {case}): {low}; all: {row}"
    for r in worlds.results(world, "integrations/torchtitan-mxfp8"):
        mx = r[(*case, "mxep")]
        assert torch.isfinite(mx["y"]).all() and torch.isfinite(mx["gx"]).all()


@pytest.mark.parametrize("world,case", CASES, ids=CASE_IDS)
def test_mxep_path_never_quantizes_the_tokens(world, case):
    """The converter's path quantizes the bf16 tokens in torchao (``w1`` and ``w3`` forward, and
    their weight gradients along the token dimension); mxep's hands torchao the dispatched MXFP8
    tokens and never calls a torchao quantize on them. Eager: 4 calls against 0, and every other
    quantize call (weights, ``h``, gradients) is the same on both paths; compiled: the calls made
    while tracing the forward and backward graphs (> 0 against 0)."""
    for r in worlds.results(world, "integrations/torchtitan-mxfp8"):
        std, mx = r[(*case, "std")]["quantize"], r[(*case, "mxep")]["quantize"]
        assert mx["tokens"] == 0, (std, mx)
        if case[0] == "eager":
            assert std["tokens"] == 4, std
            # the rest alike, but for the grad_output of w1 and w3 along dim 1, which the
            # converter's MXFP8 weight gradients quantize and mxep's bf16 ones (wgrad_with_hp) do not
            assert std["total"] - std["tokens"] - 2 == mx["total"], (std, mx)
        else:
            assert std["tokens"] > 0, std


@pytest.mark.parametrize("world", WORLDS)
def test_selection_keeps_mxfp8_experts_and_pads_as_the_converter_asks(world):
    """With ``mxfp8_experts=True`` the dispatcher is mxep's (not the converter's padded one), the
    experts are the converter's MXFP8 class made mxep-aware, the Buffer's ``align`` is the
    converter's ``pad_multiple`` and its scale mode the recipe's (RCEIL); on the config (eager)
    and swapped into the built, parallelized model (compile)."""
    for r in worlds.results(world, "integrations/torchtitan-mxfp8"):
        for mode, pad in _cases(world):
            std, mx = r[(mode, pad, "std")], r[(mode, pad, "mxep")]
            assert std["padded_dispatcher"] and std["experts"] == "MXFP8GroupedExperts"
            assert mx["dispatcher"] == "MXEPTokenDispatcher" and mx["experts"] == "MXEPMXFP8GroupedExperts"
            assert not mx["padded_dispatcher"]
            assert mx["buffer"] == {"align": pad, "scale_mode": "rceil"}
            assert len(mx["padded"]) == E // world and all(p % pad == 0 and p >= pad for p in mx["padded"])


def test_selection_errors():
    """The one supported order: the converter first, then mxep with ``mxfp8_experts=True``.
    Without the flag the converter's padded dispatcher is refused (the message says to pass it);
    with it on unconverted experts, mxep says to apply the converter first; a scale mode or
    alignment other than the recipe's is refused; the converter itself refuses mxep's dispatcher
    (torchtitan's ``swap_token_dispatcher``)."""
    from unittest import mock

    import torchtitan.components.quantization.mx as tt_mx

    from mxep.integrations.torchtitan import use_mxep_dispatcher

    with pytest.raises(ValueError, match="standard token dispatcher.*mxfp8_experts=True"):
        use_mxep_dispatcher(_converted_config(1, False))
    with pytest.raises(ValueError, match="apply the converter first"):
        use_mxep_dispatcher(plain_moe_config(E, D, F, K), mxfp8_experts=True)
    with pytest.raises(ValueError, match="recipe"):
        use_mxep_dispatcher(_converted_config(1, False), scale_mode="floor", mxfp8_experts=True)
    with pytest.raises(ValueError, match="pad_multiple"):
        use_mxep_dispatcher(_converted_config(1, False, pad_multiple=128), align=32, mxfp8_experts=True)
    cfg = _converted_config(1, False)
    assert use_mxep_dispatcher(cfg, mxfp8_experts=True) == ["routed_experts"]
    assert use_mxep_dispatcher(cfg, mxfp8_experts=True) == ["routed_experts"]   # again: no change
    with mock.patch.object(tt_mx, "has_cuda_capability", lambda major, minor: True):
        converter = tt_mx.MXFP8GroupedExpertsConverter.Config().build()
    with pytest.raises(ValueError, match="requires a token dispatcher that supports"):
        converter.convert(_plain_moe_with_mxep())


def _plain_moe_with_mxep():
    from mxep.integrations.torchtitan import use_mxep_dispatcher
    cfg = plain_moe_config(E, D, F, K)
    use_mxep_dispatcher(cfg)
    return cfg


def test_override_selects_mxfp8_experts_on_a_converted_model():
    """The override form (``--override.imports 'mxep.integrations.torchtitan.mxep_dispatcher=
    {"mxfp8_experts": true, ...}'``) on torchtitan's deepseek_v3 debugmodel converted as its
    ``deepseek_v3_debugmodel_mxfp8`` config does (``pad_multiple=128``): every MoE layer gets
    mxep's dispatcher with ``align`` 128 and the mxep-aware MXFP8 experts; the experts' other
    config fields (dims, init, sharding) are kept."""
    from dataclasses import fields
    from unittest import mock

    import torchtitan.components.quantization.mx as tt_mx
    from torchtitan.config.override import OverrideConfig, apply_overrides
    from torchtitan.models.deepseek_v3 import model_registry

    from mxep.integrations.torchtitan import MXEPTokenDispatcher

    with mock.patch.object(tt_mx, "has_cuda_capability", lambda major, minor: True):
        model_cfg = model_registry("debugmodel", converters=[
            tt_mx.MXFP8GroupedExpertsConverter.Config(pad_multiple=128)]).model
    before = [layer.moe.routed_experts.inner_experts for layer in model_cfg.layers if layer.moe is not None]
    lines = apply_overrides(OverrideConfig(imports=[("mxep.integrations.torchtitan.mxep_dispatcher",
                                                     {"mxfp8_experts": True, "num_max_tokens_per_rank": 4096})]),
                            model_cfg)
    moe_layers = [layer.moe for layer in model_cfg.layers if layer.moe is not None]
    assert len(lines) == len(moe_layers) == 5
    for moe, old in zip(moe_layers, before):
        d, ex = moe.routed_experts.token_dispatcher, moe.routed_experts.inner_experts
        assert isinstance(d, MXEPTokenDispatcher.Config)
        assert (d.num_experts, d.top_k, d.hidden_dim, d.align, d.scale_mode) == (8, 3, 256, 128, "rceil")
        assert type(ex)._owner.__name__ == "MXEPMXFP8GroupedExperts" and isinstance(ex, type(old))
        assert all(getattr(ex, f.name) == getattr(old, f.name) for f in fields(old))


def test_prequantized_grouped_mm_is_torchaos_recipe():
    """The experts' GEMM on mxep's tokens (``_grouped_mm_prequantized``, emulated) against
    torchao's own ``_to_mxfp8_then_scaled_grouped_mm`` (emulated, ``wgrad_with_hp=True``) on the
    same token values in bf16 (exactly MXFP8-representable: torchao's quantization of them gives
    the same values): forward, input gradient (straight through to the bf16 tokens) and weight
    gradient all bit-identical; an empty group, rows past the last group end ignored."""
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
    from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm
    from torchao.quantization.quantize_.common import KernelPreference

    from mxep.format.mxfp8 import quantize_straight_through
    from mxep.integrations.torchtitan import _grouped_mm_prequantized

    torch.manual_seed(0)
    cap, k, n = 128, 64, 96
    ends = torch.tensor([32, 32, 96], dtype=torch.int32)        # an empty group; rows 96.. unused
    x = torch.randn(cap, k).bfloat16()
    w = (torch.randn(3, n, k) * 0.1).bfloat16()
    dy = torch.randn(cap, n).bfloat16()
    dy[96:] = 0   # what the combine's backward gives rows that hold no token
    op_config = MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe("mxfp8_emulated_rceil"))

    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    tokens = quantize_straight_through(xi)
    y = _grouped_mm_prequantized(tokens, wi.transpose(-2, -1), ends, op_config)
    y.backward(dy)

    xr = tokens.dequantize().detach().requires_grad_(True)
    wr = w.clone().requires_grad_(True)
    yr = _to_mxfp8_then_scaled_grouped_mm(xr, wr.transpose(-2, -1), ends, kernel_preference=KernelPreference.EMULATED,
                                          wgrad_with_hp=True)
    yr.backward(dy)
    assert torch.equal(y[:96], yr[:96])
    assert torch.equal(xi.grad[:96], xr.grad[:96])
    assert torch.equal(wi.grad, wr.grad)
