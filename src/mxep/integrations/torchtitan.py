"""mxep as torchtitan's expert-parallel token dispatcher (torchtitan 0.3.0).

torchtitan's ``RoutedExperts`` calls a pluggable dispatcher (``models/common/token_dispatcher.py``)::

    routed_input_RD, num_tokens_per_local_expert_e, metadata = dispatcher.dispatch(
        x_TD, topk_scores_TK, topk_expert_ids_TK, num_local_tokens_per_expert_E)
    routed_output_RD = GroupedExperts(routed_input_RD, num_tokens_per_local_expert_e)
    out_TD = dispatcher.combine(routed_output_RD, metadata, x_TD)       # scores applied, reduced

:class:`MXEPTokenDispatcher` implements it on mxep's token-level fused dispatch
(:meth:`mxep.Buffer.dispatch_tokens` / :meth:`~mxep.Buffer.combine_tokens`):

* dispatch: every token is quantized to MXFP8 once, at its source, crosses to each rank that owns
  one of its experts at most once and lands in the expert-major layout, each local expert's group
  padded to ``align`` (32) rows. ``routed_input_RD`` is the :class:`mxep.MXFP8Tensor`
  ``[capacity, D]`` (worst-case rows, fixed by the Buffer: ``capacity = W * T * min(k, L) + L *
  align``; rows past the last group end are never read); ``num_tokens_per_local_expert_e`` is
  the PADDED rows per local expert (int32 ``[L]``, ``diff`` of the group ends, computed on the
  device: no host sync), so ``cumsum`` in ``GroupedExperts`` gives back the group ends, like
  ``TorchAOTokenDispatcher``'s padded counts. ``num_local_tokens_per_expert_E`` is not needed
  (mxep's plan counts on the device).
* experts: torchtitan's ``GroupedExperts`` calls ``torch._grouped_mm`` on the MXFP8Tensor;
  :class:`mxep.MXFP8Tensor` handles ``aten._grouped_mm`` itself: one Triton dequantize pass of
  the received rows (up to the last group end) and the bf16 grouped GEMM, the same as
  :func:`mxep.grouped_mm_mxfp8`'s default path (Hopper has no MX tensor cores). No other bf16
  copy of the tokens is made, and autograd saves the MXFP8 bytes (1.03 bytes per element, not
  2) for the weight gradients. torchtitan's ``GroupedExperts`` multiplies the tokens by ``w1``
  and ``w3`` separately, so the tokens are dequantized once per GEMM (twice in the forward,
  twice in the backward's weight gradients); a fused ``w13`` (torchtitan's ``fused_swiglu``
  override, or :class:`mxep.MoE`) dequantizes once.
* combine: each owner reduces a token's rows over its local experts in fp32, gate-weighted with
  ``topk_scores_TK`` (which travelled with the tokens), and sends one bf16 partial per (token,
  rank) back; gradients flow to ``x_TD`` (bf16, straight-through the quantization), the expert
  outputs and ``topk_scores_TK`` (so to the router).

One :class:`mxep.Buffer` per EP group and settings is shared by every MoE layer (a Buffer
serves any number of calls; its memory is sized once for the worst case). It is created in
``init_buffer`` (torchtitan calls it through ``wire_meshes`` when it parallelizes the model; on
a one-rank world the dispatcher's constructor calls it) when ``hidden_dim`` and
``num_max_tokens_per_rank`` are known, else at the first dispatch from ``x_TD``'s shape (eager
only: under ``torch.compile`` the Buffer must exist before tracing). Without an EP mesh (EP = 1)
the group is this rank alone.

Selecting it in a torchtitan job (either way):

* the override (applied by torchtitan to the config tree before the model is built)::

      --override.imports 'mxep.integrations.torchtitan.mxep_dispatcher={"num_max_tokens_per_rank": 16384}'

  (``num_max_tokens_per_rank`` = ``local_batch_size * seq_len / (cp * tp)``; it may be left
  out in eager runs, and is required with ``--compile.enable``). It replaces the standard
  dispatcher (``comm_backend="standard"``) of every ``RoutedExperts``;
* in code: :func:`use_mxep_dispatcher` on a model config (before ``build()``) or a built model.

torchtitan's MXFP8 expert training (``MXFP8GroupedExpertsConverter``, torchao) on mxep's dispatch.
The converter swaps the standard dispatcher for its padded one (``TorchAOTokenDispatcher``:
permute and pad each expert's group to ``pad_multiple`` rows, host sync for the splits) and the
experts for a subclass whose ``_grouped_mm`` quantizes every input to MXFP8 in torchao
(``_quantize_then_scaled_grouped_mm``). With mxep the tokens are already MXFP8, so the one
supported way to combine the two is: the converter first, then mxep with ``mxfp8_experts=True``
(torchtitan applies a job's converters in its model registry and overrides later in the Trainer,
so the override form follows that order by itself)::

    --module deepseek_v3 --config deepseek_v3_debugmodel_mxfp8 \\
    --override.imports 'mxep.integrations.torchtitan.mxep_dispatcher={"mxfp8_experts": true, "num_max_tokens_per_rank": 16384}'

(a config whose ``model_registry(..., converters=[..., MXFP8GroupedExpertsConverter.Config(...)])``
converts the experts, as torchtitan's ``*_mxfp8`` configs do)

or, in code, ``use_mxep_dispatcher(model_config_after_the_converter, mxfp8_experts=True, ...)``
(a built model works too: the experts module's class is swapped in place, same parameters).
Then:

* the dispatcher is mxep's (the converter's padded one is replaced), its Buffer's ``align`` is the
  converter's ``pad_multiple`` (32 by default; 128 for sm_100's CuTeDSL quantization kernel: a
  larger multiple of it may be passed as ``align``) and its ``scale_mode`` the recipe's (RCEIL
  for ``mxfp8_rceil``; another one is refused);
* the experts are the converter's class made mxep-aware (:func:`mxep_mxfp8_experts_cls`): the
  ``w1`` and ``w3`` GEMMs receive the dispatched :class:`mxep.MXFP8Tensor` and hand its bytes to
  torchao's MXFP8 grouped GEMM as a pre-quantized ``MXTensor`` (no copy, no second
  quantization): its forward and its input gradient are torchao's recipe (grad_output quantized
  along dim 0, weights along dim 1), its weight gradient is bf16 from the dequantized tokens
  (``wgrad_with_hp``, which pre-quantized inputs require; the converter's own recipe quantizes
  both operands of it along the token dimension). The tokens' gradient is bf16, straight through
  to the dispatch. The ``w2`` GEMM (bf16 SwiGLU output) is the converter's, unchanged.
  Kernels: the recipe's ``kernel_preference`` on sm_100 (``torch._scaled_grouped_mm``, the
  scales rearranged into the blocked layout first), torchao's emulated ones (dequantize + bf16
  grouped GEMM) below sm_100 and on CPU;
* other orders are refused with a message: without ``mxfp8_experts`` mxep refuses the
  converter's padded dispatcher; with it on experts the converter did not make, mxep says to apply
  the converter first; the converter applied after mxep refuses mxep's dispatcher (torchtitan's
  ``swap_token_dispatcher``).

Tested (CPU, gloo, torchao 0.18.0 emulated, ``tests/integrations/test_torchtitan_mxfp8.py``):
torchtitan's MoE with the converter's experts on its padded dispatcher against the same on
mxep's, EP 1 / 2 / 4, eager and ``torch.compile(fullgraph=True)`` (``aot_eager``): output
>= 40 dB SQNR (measured 51-60 dB), input gradient >= 30 dB (measured: bit-identical), weight
gradients >= 25 dB (router and ``w2``: bit-identical; ``w1`` / ``w3``, bf16 against MXFP8 weight
gradients: 31.4-31.6 dB); torchao
quantizes the tokens 4 times per step on the converter's path (``w1``, ``w3`` forward and weight
gradients) and never on mxep's. Not run: the sm_100 kernels (no Blackwell here).

Which torch: torchtitan 0.3.0 imports ``torch.distributed.fsdp.DataParallelMeshDims``
(``torchtitan/models/deepseek_v3/mtp.py``), missing in torch 2.11 (where torchtitan does not
import); torch 2.13 has it and is what this path is tested with (downstream compatibility shims
say it arrived in 2.12; not checked against torch's own history here).

Compile: the dispatch and combine are registered ops (opaque nodes) and the MXFP8Tensor is a
traceable subclass, so torchtitan's per-block ``torch.compile(fullgraph=True)`` traces the MoE
layer whole (tested: ``aot_eager`` at EP 1, 2, 4; ``inductor`` on CPU at EP 1). Both SPMD
backends of torchtitan work (``partial_dtensor``, and its default ``spmd_types``).

Limits: the collective transport (gloo, or NCCL without symmetric memory) and the symmetric-memory
transport (one NVLink node) of :class:`mxep.Buffer`; expert tensor parallelism is not supported
(experts must be whole on their rank). Not tested yet:
GPUs; torchtitan's CUDA-graph capture of the step (its config check admits only MinimalAsyncEP
and non-blocking HybridEP at EP > 1, the standard dispatcher included: pass
``--training.disable_cuda_graphs``).

Activation checkpointing: torchtitan's ``SelectiveAC`` saves the outputs of the ops in its save
list; that list names DeepEP's and HybridEP's ops, not mxep's, so a plain ``SelectiveAC`` would
recompute (communicate again) the dispatch and combine in the backward. :class:`MXEPSelectiveAC`
is ``SelectiveAC`` with ``torch.ops.mxep.dispatch_tokens`` / ``combine_tokens`` added
(``MXEPSelectiveAC.Config()`` where a job sets ``SelectiveAC.Config()``); full AC recomputes
everything, as it does for the standard dispatcher.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.distributed as dist

try:
    from torchtitan.config.configurable import Configurable
    from torchtitan.config.override import override
    from torchtitan.models.common.moe import RoutedExperts
    from torchtitan.models.common.token_dispatcher import (AllToAllTokenDispatcher, BaseEPTokenDispatcher,
                                                           LocalTokenDispatcher)
except ImportError as e:   # pragma: no cover - exercised only where torchtitan is missing
    raise ImportError(
        "mxep.integrations.torchtitan needs torchtitan (tested with torchtitan==0.3.0): "
        "`pip install torchtitan==0.3.0` (it keeps an installed torch >= 2.11), or "
        "`pip install -e .[test]` in an mxep checkout"
    ) from e

from torchtitan.distributed.activation_checkpoint import SelectiveAC

from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

from mxep._utils import has_mx_tensor_cores
from mxep.ep.buffer import Buffer
from mxep.ep.transport.base import DispatchHandle
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.spec import BLOCK_SIZE

__all__ = ["MXEPTokenDispatcher", "MXEPDispatchMetadata", "MXEPSelectiveAC", "mxep_dispatcher", "mxep_save_ops",
           "mxep_mxfp8_experts_cls", "use_mxep_dispatcher"]

# The dispatcher configs that mxep replaces: torchtitan's standard ones (comm_backend="standard"
# builds an AllToAllTokenDispatcher, which falls back to the local one at EP = 1). Padded
# (TorchAO) and the other EP backends are left to their owners.
_STANDARD = (AllToAllTokenDispatcher.Config, LocalTokenDispatcher.Config)

# One Buffer per (EP group, settings): every MoE layer of a model shares it.
_BUFFERS: dict[tuple, Buffer] = {}
# EP = 1 on a world of several ranks: this rank's own group (made once, collectively).
_SELF_GROUP: list = []


@dataclass(frozen=True, kw_only=True)
class MXEPDispatchMetadata:
    """What :meth:`MXEPTokenDispatcher.combine` needs from its dispatch."""

    handle: DispatchHandle
    topk_scores_TK: torch.Tensor  # noqa: N815  (fp32 [T, K]: receives the router's gradient)


def _this_rank_group():
    if not _SELF_GROUP:
        group, _ = dist.new_subgroups(group_size=1)   # collective: every rank makes its own
        _SELF_GROUP.append(group)
    return _SELF_GROUP[0]


class MXEPTokenDispatcher(BaseEPTokenDispatcher):
    """torchtitan EP token dispatcher on mxep's fused MXFP8 dispatch (module docstring).

    Config fields (besides ``num_experts`` and ``top_k``): ``hidden_dim`` (the model dim ``D``)
    and ``num_max_tokens_per_rank`` (``T``, the most tokens one rank passes to one dispatch)
    size the Buffer; ``None`` takes them from the first dispatch's ``x_TD`` (eager only).
    ``align`` (group padding, 32 for MXFP8), ``scale_mode`` (``"rceil"`` / ``"floor"``),
    ``transport`` (``"auto"`` / ``"symm_mem"`` / ``"nvshmem"`` / ``"collective"``), ``capacity_factor`` (None:
    dropless; ``f``: every expert keeps at most ``f`` times its balanced share of rows, the rest
    dropped deterministically) and ``debug`` are :class:`mxep.Buffer`'s.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseEPTokenDispatcher.Config):
        hidden_dim: int | None = None
        num_max_tokens_per_rank: int | None = None
        align: int = 32
        scale_mode: str = "rceil"
        transport: str = "auto"
        capacity_factor: float | None = None
        debug: bool = False

    def __init__(self, config: Config):
        super().__init__(config)
        self.hidden_dim = config.hidden_dim
        self.num_max_tokens_per_rank = config.num_max_tokens_per_rank
        self.align = config.align
        self.scale_mode = config.scale_mode
        self.transport = config.transport
        self.capacity_factor = config.capacity_factor
        self.debug = config.debug
        self.buffer: Buffer | None = None
        if dist.is_initialized() and dist.get_world_size() == 1:
            # EP = 1 for sure, and torchtitan wires no mesh then (it parallelizes nothing): make
            # the Buffer now, so that a compiled model finds it
            self.init_buffer()

    # ------------------------------------------------------------------ buffer
    def _group(self):
        if not dist.is_initialized():
            raise RuntimeError(
                "MXEPTokenDispatcher needs torch.distributed to be initialized (torchtitan's Trainer does it; "
                "a single process can use dist.init_process_group('gloo', rank=0, world_size=1, ...))")
        if self.ep_mesh is not None:
            return self.ep_mesh.get_group()
        return dist.group.WORLD if dist.get_world_size() == 1 else _this_rank_group()

    def _make_buffer(self, hidden: int, max_tokens: int) -> Buffer:
        group = self._group()
        key = (group, self.num_experts, hidden, max_tokens, self.top_k, self.align, self.scale_mode,
               self.transport, self.capacity_factor, self.debug)
        buf = _BUFFERS.get(key)
        if buf is None:
            # the Buffer's own device (its default), also where torchtitan builds the model under
            # torch.device("meta"): its memory must be real
            nccl = dist.get_backend(group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
            with torch.device(device):
                buf = Buffer(group, num_experts=self.num_experts, hidden=hidden, max_tokens_per_rank=max_tokens,
                             top_k=self.top_k, align=self.align, scale_mode=self.scale_mode,
                             transport=self.transport, debug=self.debug, device=device,
                             capacity_factor=self.capacity_factor)
            _BUFFERS[key] = buf
        return buf

    def init_buffer(self) -> None:
        """Get this EP group's Buffer (made on the first call for these settings; collective)
        when ``hidden_dim`` and ``num_max_tokens_per_rank`` are known; else the first dispatch
        makes it."""
        if self.hidden_dim is not None and self.num_max_tokens_per_rank is not None:
            self.buffer = self._make_buffer(self.hidden_dim, self.num_max_tokens_per_rank)

    def _buffer_for(self, x_TD: torch.Tensor) -> Buffer:
        if self.buffer is not None:
            return self.buffer
        if torch.compiler.is_compiling():
            raise RuntimeError(
                "MXEPTokenDispatcher: the mxep.Buffer must exist before torch.compile traces the model: set "
                "hidden_dim and num_max_tokens_per_rank (the override's kwargs or use_mxep_dispatcher's) so "
                "that init_buffer() makes it, or run one eager step first")
        self.buffer = self._make_buffer(self.hidden_dim or x_TD.shape[1],
                                        self.num_max_tokens_per_rank or x_TD.shape[0])
        return self.buffer

    # ------------------------------------------------------------------ dispatch / combine
    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_scores_TK: torch.Tensor,
        topk_expert_ids_TK: torch.Tensor,
        num_local_tokens_per_expert_E: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, MXEPDispatchMetadata]:
        """-> ``(tokens, padded_rows_per_local_expert, metadata)``: ``tokens`` the MXFP8Tensor
        ``[capacity, D]`` (expert-major, groups padded to ``align`` rows, pad rows zero),
        ``padded_rows_per_local_expert`` int32 ``[E // ep]`` (their ``cumsum`` is the group ends).
        No host sync."""
        del num_local_tokens_per_expert_E   # mxep's plan counts on the device
        buf = self._buffer_for(x_TD)
        scores = topk_scores_TK.to(torch.float32)
        res = buf.dispatch_tokens(x_TD.to(torch.bfloat16), topk_expert_ids_TK, scores)
        ends = res.group_end_offsets
        padded_rows_e = torch.diff(ends, prepend=ends.new_zeros(1))
        return res.tokens, padded_rows_e, MXEPDispatchMetadata(handle=res.handle, topk_scores_TK=scores)

    # pyrefly: ignore [bad-override]
    def combine(self, routed_output_RD: torch.Tensor, metadata: MXEPDispatchMetadata,
                x_TD: torch.Tensor) -> torch.Tensor:
        """``out_TD[t] = sum_j topk_scores_TK[t, j] * routed_output_RD[row(t, j)]`` (fp32
        reduction, bf16 result cast to ``x_TD``'s dtype)."""
        assert self.buffer is not None, "combine before dispatch"
        y = self.buffer.combine_tokens(routed_output_RD.to(torch.bfloat16), metadata.handle,
                                       metadata.topk_scores_TK)
        return y.to(x_TD.dtype)


# ---------------------------------------------------------------------------------------------
# torchtitan's MXFP8 experts (MXFP8GroupedExpertsConverter) on mxep's dispatch
_TORCHAO_EXTRA = ("the MXFP8 experts path needs torchao (tested with torchao==0.18.0): `pip install torchao`, "
                  "or the torchao extra of mxep")


def _torchao():
    """torchao's pieces that the MXFP8 experts path calls, imported on first use (torchao is an
    optional dependency: nothing else of this module needs it)."""
    try:
        from torchao.prototype.moe_training.mxfp8_grouped_mm import _to_mxfp8_then_scaled_grouped_mm
        from torchao.prototype.mx_formats.config import ScaleCalculationMode
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.quantization.quantize_.common import KernelPreference
    except ImportError as e:   # pragma: no cover - exercised only where torchao is missing
        raise ImportError(_TORCHAO_EXTRA) from e
    return _to_mxfp8_then_scaled_grouped_mm, MXTensor, KernelPreference, ScaleCalculationMode


def _mxfp8_experts_classes() -> tuple:
    """The experts classes that torchtitan's MXFP8 converter made so far (its cache: one per
    experts class it converted); empty without torchao."""
    try:
        from torchtitan.components.quantization.mx import _mxfp8_experts_cache
    except ImportError:   # pragma: no cover - torchtitan's quantization imports torchao lazily
        return ()
    return tuple(_mxfp8_experts_cache.values())


def _grouped_mm_prequantized(tokens: MXFP8Tensor, B_t: torch.Tensor, offs: torch.Tensor, op_config) -> torch.Tensor:
    """torchao's MXFP8 grouped GEMM on mxep's dispatched tokens, without quantizing them again.

    Args:
        tokens: the dispatch's MXFP8Tensor ``[capacity, K]`` (e4m3 ``qdata``, row-major e8m0
            ``scale [capacity, K / 32]``), expert-major, each group padded to a multiple of 32
            rows; rows past ``offs[-1]`` are never read.
        B_t: bf16 ``[L, K, N]``, per-group column-major (``w.transpose(-2, -1)`` of ``[L, N, K]``).
        offs: int32 ``[L]`` group end offsets (on the device).
        op_config: the experts' ``MXFP8TrainingOpConfig`` (the converter's recipe).

    Returns:
        ``[capacity, N]`` in ``op_config.out_dtype`` (bf16). Backward: torchao's recipe with
        ``wgrad_with_hp=True`` (which pre-quantized inputs require): the input gradient from the
        MXFP8 grad_output and weights, the weight gradient in bf16 from the dequantized tokens;
        the tokens' gradient is bf16 and goes straight through to the dispatch.
    """
    from mxep.integrations.torchao import grouped_mm_prequantized

    _, _, KernelPreference, _ = _torchao()
    # the recipe's kernels (torch._scaled_grouped_mm with blocked scales) exist only on sm_100+;
    # elsewhere torchao's emulated path (dequantize + bf16 grouped GEMM)
    pref = op_config.kernel_preference if has_mx_tensor_cores(tokens.device) else KernelPreference.EMULATED
    return grouped_mm_prequantized(tokens, B_t, offs, op_config.out_dtype, pref, op_config.scale_calculation_mode)


_MXEP_EXPERTS: dict[type, type] = {}


def mxep_mxfp8_experts_cls(mxfp8_cls: type) -> type:
    """The mxep variant of a torchtitan MXFP8 experts class (what ``MXFP8GroupedExpertsConverter``
    made from ``GroupedExperts`` or another experts class with the ``_grouped_mm`` seam).

    Its ``_grouped_mm(A, B_t, offs)`` hands an :class:`mxep.MXFP8Tensor` ``A`` (the dispatched
    tokens: ``w1`` and ``w3``) to torchao's MXFP8 grouped GEMM as a pre-quantized ``MXTensor``
    (:func:`_grouped_mm_prequantized`: no second quantization), and a bf16 ``A`` (the SwiGLU
    output: ``w2``) to the converter's own ``_quantize_then_scaled_grouped_mm``, unchanged.
    """
    if mxfp8_cls not in _MXEP_EXPERTS:
        class MXEPMXFP8GroupedExperts(mxfp8_cls):  # type: ignore[valid-type, misc]
            @dataclass(kw_only=True, slots=True)
            class Config(mxfp8_cls.Config):  # type: ignore[misc, name-defined]
                pass

            def _grouped_mm(self, *, A, B_t, offs):
                if isinstance(A, MXFP8Tensor):
                    return _grouped_mm_prequantized(A, B_t, offs, self._mxfp8_op_config)
                return super()._grouped_mm(A=A, B_t=B_t, offs=offs)

        MXEPMXFP8GroupedExperts.__name__ = MXEPMXFP8GroupedExperts.__qualname__ = f"MXEP{mxfp8_cls.__name__}"
        _MXEP_EXPERTS[mxfp8_cls] = MXEPMXFP8GroupedExperts
    return _MXEP_EXPERTS[mxfp8_cls]


def _mxep_experts_config(experts_cfg):
    """The mxep variant of a converted experts config (same fields); ``None`` if ``experts_cfg``
    is not one that torchtitan's MXFP8 converter made."""
    owner = type(experts_cfg)._owner
    if owner in _MXEP_EXPERTS.values():
        return experts_cfg
    if owner not in _mxfp8_experts_classes():
        return None
    new_cls = mxep_mxfp8_experts_cls(owner).Config
    return new_cls(**{f.name: getattr(experts_cfg, f.name) for f in fields(experts_cfg)})


def _recipe_scale_mode(op_config) -> str:
    """mxep's scale mode for the recipe's e8m0 scale rounding (the tokens must be quantized as
    the recipe would have quantized them)."""
    _, _, _, ScaleCalculationMode = _torchao()
    modes = {ScaleCalculationMode.RCEIL: "rceil", ScaleCalculationMode.FLOOR: "floor"}
    if op_config.scale_calculation_mode not in modes:
        raise ValueError(f"mxep quantizes with RCEIL or FLOOR scales; the MXFP8 recipe uses "
                         f"{op_config.scale_calculation_mode}")
    return modes[op_config.scale_calculation_mode]


# ---------------------------------------------------------------------------------------------
# Selection
def _recipe_op_config(recipe_name: str):
    """torchao's op config of a torchtitan MXFP8 recipe name (what the converted experts build)."""
    _torchao()
    from torchao.prototype.moe_training.config import MXFP8TrainingOpConfig, MXFP8TrainingRecipe
    return MXFP8TrainingOpConfig.from_recipe(MXFP8TrainingRecipe(recipe_name))


def _mxep_config(old, hidden_dim: int | None, *, mxfp8_experts: bool = False, op_config=None,
                 align: int | None = None, scale_mode: str | None = None,
                 **settings) -> MXEPTokenDispatcher.Config:
    """The mxep config replacing ``old`` (a dispatcher or its config). Without ``mxfp8_experts``:
    the standard one only (exact types, so the padded TorchAO one and the other EP backends are
    refused). With it: the padded TorchAO one that torchtitan's MXFP8 converter put there (its
    ``pad_multiple`` becomes the Buffer's ``align``), or the standard one (``align`` 32); the
    scale mode is the recipe's (``op_config``, torchao's ``MXFP8TrainingOpConfig``)."""
    standard = _STANDARD + tuple(c._owner for c in _STANDARD)
    padded = (TorchAOTokenDispatcher.Config, TorchAOTokenDispatcher)
    pad_multiple = BLOCK_SIZE
    if mxfp8_experts and type(old) in padded:
        pad_multiple = old.pad_multiple
    elif type(old) not in standard:
        hint = ""
        if type(old) in padded:
            hint = (" (this one is what torchtitan's MXFP8GroupedExpertsConverter puts there: select mxep with "
                    "mxfp8_experts=True to keep the converter's MXFP8 experts on mxep's dispatch)")
        raise ValueError(
            f"mxep replaces torchtitan's standard token dispatcher (comm_backend='standard'), got "
            f"{type(old).__qualname__}{hint}")
    if align is None:
        align = pad_multiple
    if align % pad_multiple or align % BLOCK_SIZE:
        raise ValueError(f"align={align}: the MXFP8 experts need groups padded to a multiple of "
                         f"{pad_multiple} rows (the converter's pad_multiple) and of {BLOCK_SIZE}")
    if mxfp8_experts:
        recipe_mode = _recipe_scale_mode(op_config)
        if scale_mode is not None and scale_mode != recipe_mode:
            raise ValueError(f"scale_mode={scale_mode!r}, but the MXFP8 recipe rounds its "
                             f"scales with {recipe_mode!r}: the tokens must be quantized as it would")
        scale_mode = recipe_mode
    return MXEPTokenDispatcher.Config(num_experts=old.num_experts, top_k=old.top_k, hidden_dim=hidden_dim,
                                      align=align, scale_mode=scale_mode or "rceil", **settings)


def _mxfp8_experts_error(fqn: str, experts) -> ValueError:
    return ValueError(
        f"mxfp8_experts=True: {fqn or 'the model'}'s experts ({type(experts).__qualname__}) were not converted by "
        f"torchtitan's MXFP8GroupedExpertsConverter: apply the converter first (model_registry(..., converters="
        f"[MXFP8GroupedExpertsConverter.Config()]) or the job's converters), then select mxep")


@override(
    target=RoutedExperts.Config,
    description="mxep: fused MXFP8 expert-parallel token dispatch / combine",
)
def mxep_dispatcher(
    cfg: RoutedExperts.Config,
    *,
    num_max_tokens_per_rank: int | None = None,
    align: int | None = None,
    scale_mode: str | None = None,
    transport: str = "auto",
    debug: bool = False,
    mxfp8_experts: bool = False,
) -> RoutedExperts.Config:
    """torchtitan override: every ``RoutedExperts`` gets :class:`MXEPTokenDispatcher` in place of
    its standard dispatcher; ``hidden_dim`` comes from its experts' config (``dim``). Activate with
    ``--override.imports mxep.integrations.torchtitan.mxep_dispatcher`` (kwargs as a JSON object
    after ``=``, e.g. ``'...mxep_dispatcher={"num_max_tokens_per_rank": 16384}'``). The config is
    changed in place (other overrides of its children keep their effect).

    ``mxfp8_experts=True`` (after torchtitan's ``MXFP8GroupedExpertsConverter``, which the model
    registry applies before any override): the converter's padded dispatcher is replaced too
    (``align`` = its ``pad_multiple``, ``scale_mode`` = its recipe's), and its experts by
    :func:`mxep_mxfp8_experts_cls`'s variant, which feeds mxep's MXFP8 tokens to torchao's
    grouped GEMM without quantizing them again (module docstring)."""
    if isinstance(cfg.token_dispatcher, MXEPTokenDispatcher.Config):
        if mxfp8_experts and _mxep_experts_config(cfg.inner_experts) is None:
            raise _mxfp8_experts_error("", cfg.inner_experts)
        return cfg
    op_config = None
    if mxfp8_experts:
        new_experts = _mxep_experts_config(cfg.inner_experts)
        if new_experts is None:
            raise _mxfp8_experts_error("", cfg.inner_experts)
        op_config = _recipe_op_config(new_experts.recipe_name)
    cfg.token_dispatcher = _mxep_config(
        cfg.token_dispatcher, getattr(cfg.inner_experts, "dim", None), mxfp8_experts=mxfp8_experts,
        op_config=op_config, num_max_tokens_per_rank=num_max_tokens_per_rank, align=align,
        scale_mode=scale_mode, transport=transport, debug=debug)
    if mxfp8_experts:
        cfg.inner_experts = new_experts
    return cfg


def use_mxep_dispatcher(model: Any, *, num_max_tokens_per_rank: int | None = None, align: int | None = None,
                        scale_mode: str | None = None, transport: str = "auto", debug: bool = False,
                        mxfp8_experts: bool = False) -> list[str]:
    """Swap the standard token dispatcher of every ``RoutedExperts`` for :class:`MXEPTokenDispatcher`.

    Args:
        model: a torchtitan model config (``Decoder.Config``, ``MoE.Config``, ...: before
            ``build()``) or a built ``nn.Module``. On a built model that is already parallelized
            the new dispatchers are wired to the old ones' EP mesh (and their Buffer made: a
            collective, call it on every rank); otherwise ``parallelize`` wires them (or, at EP =
            1, the first dispatch makes the Buffer, unless the process group has one rank, where
            it is made now).
        num_max_tokens_per_rank, transport, debug: as in :class:`MXEPTokenDispatcher`.
        align: group padding; ``None``: 32, or with ``mxfp8_experts`` the converter's
            ``pad_multiple``.
        scale_mode: ``None``: ``"rceil"``, or with ``mxfp8_experts`` the recipe's (another one is
            refused).
        mxfp8_experts: the model was converted by torchtitan's ``MXFP8GroupedExpertsConverter``
            (apply it first): keep its MXFP8 experts, replace its padded dispatcher by mxep's and
            its experts by :func:`mxep_mxfp8_experts_cls`'s variant (on a built model, the
            experts module's class is swapped in place: same parameters).

    Returns:
        The FQNs of the ``RoutedExperts`` that now have it (swapped, or already had it). Raises
        ``ValueError`` if there is none, or if one has a dispatcher other than the standard one
        (the converter's padded one with ``mxfp8_experts``), or experts the converter did not
        make while ``mxfp8_experts`` is set.
    """
    settings = dict(num_max_tokens_per_rank=num_max_tokens_per_rank, align=align, scale_mode=scale_mode,
                    transport=transport, debug=debug)
    swapped = []
    if isinstance(model, Configurable.Config):
        for fqn, cfg, _, _ in model.traverse(RoutedExperts.Config):
            try:
                mxep_dispatcher(cfg, mxfp8_experts=mxfp8_experts, **settings)
            except ValueError as e:
                raise ValueError(f"{fqn}: {e}") from None
            swapped.append(fqn)
    elif isinstance(model, torch.nn.Module):
        for fqn, mod in model.named_modules():
            if not isinstance(mod, RoutedExperts):
                continue
            experts = mod.inner_experts
            new_experts_cls = None
            if mxfp8_experts:
                if type(experts) in _MXEP_EXPERTS.values():
                    new_experts_cls = type(experts)
                elif type(experts) in _mxfp8_experts_classes():
                    new_experts_cls = mxep_mxfp8_experts_cls(type(experts))
                else:
                    raise _mxfp8_experts_error(fqn, experts)
            if isinstance(mod.token_dispatcher, MXEPTokenDispatcher):   # already swapped
                if new_experts_cls is not None:
                    experts.__class__ = new_experts_cls
                swapped.append(fqn)
                continue
            old = mod.token_dispatcher
            w1 = getattr(experts, "w1_EFD", None)
            hidden = int(w1.shape[-1]) if w1 is not None else None
            op_config = experts._mxfp8_op_config if mxfp8_experts else None
            try:
                new = _mxep_config(old, hidden, mxfp8_experts=mxfp8_experts, op_config=op_config, **settings).build()
            except ValueError as e:
                raise ValueError(f"{fqn}: {e}") from None
            ep_mesh = getattr(old, "ep_mesh", None)
            if ep_mesh is not None:
                new.wire_meshes(ep_mesh=ep_mesh)
            mod.token_dispatcher = new
            if new_experts_cls is not None:
                # same module, same parameters: only its _grouped_mm seam changes
                experts.__class__ = new_experts_cls
            swapped.append(fqn)
    else:
        raise TypeError(f"use_mxep_dispatcher takes a torchtitan model config or nn.Module, got {type(model).__name__}")
    if not swapped:
        raise ValueError("use_mxep_dispatcher: no RoutedExperts (torchtitan MoE layer) found")
    return swapped


def mxep_save_ops() -> set:
    """The registered mxep ops whose outputs selective activation checkpointing must save
    (communication: recomputing them would send the tokens again)."""
    return {torch.ops.mxep.dispatch_tokens.default, torch.ops.mxep.combine_tokens.default}


class MXEPSelectiveAC(SelectiveAC):
    """torchtitan's per-op selective activation checkpointing, saving mxep's dispatch and
    combine outputs like DeepEP's and HybridEP's (:func:`mxep_save_ops`)."""

    @dataclass(kw_only=True, slots=True)
    class Config(SelectiveAC.Config):
        pass

    def get_save_ops(self) -> set:
        return set(super().get_save_ops()) | mxep_save_ops()
