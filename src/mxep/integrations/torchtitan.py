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

Compile: the dispatch and combine are registered ops (opaque nodes) and the MXFP8Tensor is a
traceable subclass, so torchtitan's per-block ``torch.compile(fullgraph=True)`` traces the MoE
layer whole (tested: ``aot_eager`` at EP 1, 2, 4; ``inductor`` on CPU at EP 1). Both SPMD
backends of torchtitan work (``partial_dtensor``, and its default ``spmd_types``).

Limits: the collective transport (gloo, or NCCL without symmetric memory) and the symmetric-memory
transport (one NVLink node) of :class:`mxep.Buffer`; expert tensor parallelism is not supported
(experts must be whole on their rank); torchtitan's MXFP8 expert converter (torchao, sm_100) is
not combined with it (it expects bf16 tokens and its own padded dispatcher). Not tested yet:
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

from dataclasses import dataclass
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

from mxep.ep.buffer import Buffer
from mxep.ep.transport.base import DispatchHandle

__all__ = ["MXEPTokenDispatcher", "MXEPDispatchMetadata", "MXEPSelectiveAC", "mxep_dispatcher", "mxep_save_ops",
           "use_mxep_dispatcher"]

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
    ``transport`` (``"auto"`` / ``"symm_mem"`` / ``"collective"``), ``capacity_factor`` (None:
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
# Selection
def _mxep_config(old, hidden_dim: int | None, **settings) -> MXEPTokenDispatcher.Config:
    """The mxep config replacing ``old`` (a standard dispatcher or its config: exact types, so
    the padded TorchAO one and the other EP backends are refused)."""
    if type(old) not in _STANDARD + tuple(c._owner for c in _STANDARD):
        raise ValueError(
            f"mxep replaces torchtitan's standard token dispatcher (comm_backend='standard'), got "
            f"{type(old).__qualname__}")
    return MXEPTokenDispatcher.Config(num_experts=old.num_experts, top_k=old.top_k, hidden_dim=hidden_dim,
                                      **settings)


@override(
    target=RoutedExperts.Config,
    description="mxep: fused MXFP8 expert-parallel token dispatch / combine",
)
def mxep_dispatcher(
    cfg: RoutedExperts.Config,
    *,
    num_max_tokens_per_rank: int | None = None,
    align: int = 32,
    scale_mode: str = "rceil",
    transport: str = "auto",
    debug: bool = False,
) -> RoutedExperts.Config:
    """torchtitan override: every ``RoutedExperts`` gets :class:`MXEPTokenDispatcher` in place of
    its standard dispatcher; ``hidden_dim`` comes from its experts' config (``dim``). Activate with
    ``--override.imports mxep.integrations.torchtitan.mxep_dispatcher`` (kwargs as a JSON object
    after ``=``, e.g. ``'...mxep_dispatcher={"num_max_tokens_per_rank": 16384}'``). The config is
    changed in place (other overrides of its children keep their effect)."""
    if not isinstance(cfg.token_dispatcher, MXEPTokenDispatcher.Config):
        cfg.token_dispatcher = _mxep_config(
            cfg.token_dispatcher, getattr(cfg.inner_experts, "dim", None),
            num_max_tokens_per_rank=num_max_tokens_per_rank, align=align, scale_mode=scale_mode,
            transport=transport, debug=debug)
    return cfg


def use_mxep_dispatcher(model: Any, *, num_max_tokens_per_rank: int | None = None, align: int = 32,
                        scale_mode: str = "rceil", transport: str = "auto", debug: bool = False) -> list[str]:
    """Swap the standard token dispatcher of every ``RoutedExperts`` for :class:`MXEPTokenDispatcher`.

    Args:
        model: a torchtitan model config (``Decoder.Config``, ``MoE.Config``, ...: before
            ``build()``) or a built ``nn.Module``. On a built model that is already parallelized
            the new dispatchers are wired to the old ones' EP mesh (and their Buffer made: a
            collective, call it on every rank); otherwise ``parallelize`` wires them (or, at EP =
            1, the first dispatch makes the Buffer, unless the process group has one rank, where
            it is made now).
        num_max_tokens_per_rank, align, scale_mode, transport, debug: as in
            :class:`MXEPTokenDispatcher`.

    Returns:
        The FQNs of the ``RoutedExperts`` that now have it (swapped, or already had it). Raises
        ``ValueError`` if there is none, or if one has a dispatcher other than the standard one.
    """
    settings = dict(num_max_tokens_per_rank=num_max_tokens_per_rank, align=align, scale_mode=scale_mode,
                    transport=transport, debug=debug)
    swapped = []
    if isinstance(model, Configurable.Config):
        for fqn, cfg, _, _ in model.traverse(RoutedExperts.Config):
            mxep_dispatcher(cfg, **settings)
            swapped.append(fqn)
    elif isinstance(model, torch.nn.Module):
        for fqn, mod in model.named_modules():
            if not isinstance(mod, RoutedExperts):
                continue
            if isinstance(mod.token_dispatcher, MXEPTokenDispatcher):   # already swapped
                swapped.append(fqn)
                continue
            old = mod.token_dispatcher
            w1 = getattr(mod.inner_experts, "w1_EFD", None)
            hidden = int(w1.shape[-1]) if w1 is not None else None
            new = _mxep_config(old, hidden, **settings).build()
            ep_mesh = getattr(old, "ep_mesh", None)
            if ep_mesh is not None:
                new.wire_meshes(ep_mesh=ep_mesh)
            mod.token_dispatcher = new
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
