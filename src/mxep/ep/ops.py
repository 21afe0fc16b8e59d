"""The Buffer's differentiable operations: one autograd Function per direction and level, each
calling the Buffer's transport forward and backward.

* row level (:class:`DispatchRows`, :class:`CombineRows`): the dispatch's forward quantizes to
  MXFP8 and moves rows into the expert-major padded layout, its backward moves the bf16
  gradient back along the same routes (a combine: straight-through for the quantization, pad
  rows dropped); the combine's forward moves rows back to their sources, its backward moves the
  bf16 gradient into the dispatch layout (a bf16 dispatch, pad rows zero).
* token level (:class:`DispatchTokens`, :class:`CombineTokens`): the same through four
  registered ops (``mxep::dispatch_tokens``, ``mxep::combine_tokens`` and their backwards), so
  that ``torch.compile`` keeps each as one opaque node with static output shapes (the Buffer's
  settings fix them) and traces the Functions around them (``fullgraph=True``). The per-call
  state crosses the ops' boundary as a list of tensors
  (:meth:`~mxep.ep.transport.base.TokenState.as_list` / ``from_list``).

Every Function names its Buffer by its string id (``Buffer._id``; a string, which torch.compile
always treats as a constant, where an int would turn symbolic once a second Buffer shows up).
"""
from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch

from mxep._utils import call_op
from mxep.format.mxfp8 import MXFP8Tensor
from mxep.format.spec import BLOCK_SIZE

if TYPE_CHECKING:
    from mxep.ep.buffer import Buffer

__all__ = ["DispatchRows", "CombineRows", "DispatchTokens", "CombineTokens", "register_buffer"]

_LIVE_BUFFERS: "weakref.WeakValueDictionary[str, Buffer]" = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register_buffer(buf: "Buffer") -> str:
    """A new id naming ``buf`` in the ops (held weakly)."""
    buffer_id = f"buffer{next(_NEXT_ID)}"
    _LIVE_BUFFERS[buffer_id] = buf
    return buffer_id


def _buffer(buffer_id: str) -> "Buffer":
    buf = _LIVE_BUFFERS.get(buffer_id)
    if buf is None:
        raise RuntimeError(f"mxep: Buffer {buffer_id} no longer exists")
    return buf


def _checked(buf: "Buffer", op: str, out):
    """``out``, after ``buf.check(op)`` in debug mode (a host sync: debug only)."""
    if buf.debug:
        buf.check(op)   # debug-only: host sync
    return out


# ---------------------------------------------------------------------------------- row level
class DispatchRows(torch.autograd.Function):
    """``(x bf16 [n, H], buffer_id, handle, zero_copy)`` -> MXFP8Tensor ``[cap, H]``; the
    backward sends the bf16 gradient of the tokens back to ``x`` (a combine)."""

    @staticmethod
    def forward(ctx, x, buffer_id, handle, zero_copy=False):
        ctx.buffer_id, ctx.handle = buffer_id, handle
        buf = _buffer(buffer_id)
        return _checked(buf, "dispatch", buf.transport.dispatch_mxfp8(x.contiguous(), handle, buf.scale_mode, zero_copy))

    @staticmethod
    def backward(ctx, grad_tokens):
        # (the backward never reads the tokens: a zero-copy dispatch's may be gone by now)
        if grad_tokens is None:
            return None, None, None, None
        buf = _buffer(ctx.buffer_id)
        return buf.transport.combine_bf16(grad_tokens.to(torch.bfloat16).contiguous(), ctx.handle), None, None, None


class CombineRows(torch.autograd.Function):
    """``(expert_out bf16 [cap, H], buffer_id, handle)`` -> bf16 ``[n, H]``; the backward sends
    the bf16 gradient into the dispatch layout (pad rows zero)."""

    @staticmethod
    def forward(ctx, expert_out, buffer_id, handle):
        ctx.buffer_id, ctx.handle = buffer_id, handle
        buf = _buffer(buffer_id)
        return _checked(buf, "combine", buf.transport.combine_bf16(expert_out.contiguous(), handle))

    @staticmethod
    def backward(ctx, grad_y):
        if grad_y is None:
            return None, None, None
        buf = _buffer(ctx.buffer_id)
        return buf.transport.dispatch_bf16(grad_y.to(torch.bfloat16).contiguous(), ctx.handle), None, None


# -------------------------------------------------------------------------------- token level
# Each op's Python body is a plain function, registered as a custom op for torch.compile; eager
# calls on plain tensors call the body directly (mxep._utils.call_op: the same function without
# the custom-op layers around it, some 20 us of host time per call).
def _dispatch_tokens_impl(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                          buffer_id: str) -> list[torch.Tensor]:
    buf = _buffer(buffer_id)
    d = _checked(buf, "dispatch_tokens", buf.transport.dispatch_tokens(x, topk_idx, topk_weights, buf.scale_mode,
                                                                       buf.align))
    return [d.qdata.view(torch.float8_e4m3fn), d.scale.view(torch.float8_e8m0fnu), d.group_end_offsets,
            d.tokens_per_expert, d.num_dropped, d.routing_errors, *d.state.as_list()]


_dispatch_tokens_op = torch.library.custom_op("mxep::dispatch_tokens", _dispatch_tokens_impl, mutates_args=())


@_dispatch_tokens_op.register_fake
def _(x, topk_idx, topk_weights, buffer_id):
    buf = _buffer(buffer_id)
    cap, H, L = buf.capacity, buf.hidden, buf.num_local_experts
    state = buf.transport.token_state_like(x.shape[0], topk_idx.shape[1], x.device)
    return [x.new_empty((cap, H), dtype=torch.float8_e4m3fn),
            x.new_empty((cap, H // BLOCK_SIZE), dtype=torch.float8_e8m0fnu),
            x.new_empty((L,), dtype=torch.int32), x.new_empty((L,), dtype=torch.int32),
            x.new_empty((), dtype=torch.int64), x.new_empty((2,), dtype=torch.int32), *state.as_list()]


def _state(buf: "Buffer", tensors):
    return buf.transport.token_state_type.from_list(tensors)


def _combine_tokens_impl(expert_out: torch.Tensor, buffer_id: str, state: list[torch.Tensor]) -> torch.Tensor:
    buf = _buffer(buffer_id)
    return _checked(buf, "combine_tokens", buf.transport.combine_tokens(expert_out, _state(buf, state), buf.align))


_combine_tokens_op = torch.library.custom_op("mxep::combine_tokens", _combine_tokens_impl, mutates_args=())


@_combine_tokens_op.register_fake
def _(expert_out, buffer_id, state):
    return expert_out.new_empty((_state(_buffer(buffer_id), state).num_tokens, expert_out.shape[1]))


def _dispatch_tokens_backward_impl(grad_tokens: torch.Tensor, buffer_id: str,
                                   state: list[torch.Tensor]) -> torch.Tensor:
    buf = _buffer(buffer_id)
    return buf.transport.dispatch_tokens_backward(grad_tokens, _state(buf, state), buf.align)


_dispatch_tokens_backward_op = torch.library.custom_op("mxep::dispatch_tokens_backward",
                                                       _dispatch_tokens_backward_impl, mutates_args=())


@_dispatch_tokens_backward_op.register_fake
def _(grad_tokens, buffer_id, state):
    return grad_tokens.new_empty((_state(_buffer(buffer_id), state).num_tokens, grad_tokens.shape[1]))


def _combine_tokens_backward_impl(dy: torch.Tensor, expert_out: torch.Tensor, buffer_id: str,
                                  state: list[torch.Tensor]) -> list[torch.Tensor]:
    buf = _buffer(buffer_id)
    return list(buf.transport.combine_tokens_backward(dy, expert_out, _state(buf, state), buf.align))


_combine_tokens_backward_op = torch.library.custom_op("mxep::combine_tokens_backward",
                                                      _combine_tokens_backward_impl, mutates_args=())


@_combine_tokens_backward_op.register_fake
def _(dy, expert_out, buffer_id, state):
    return [torch.empty_like(expert_out), torch.empty_like(_state(_buffer(buffer_id), state).pair_weights)]


class DispatchTokens(torch.autograd.Function):
    """``(x bf16 [t, H], topk_idx, topk_weights, buffer_id, scale_layout)`` -> ``(MXFP8Tensor tokens [cap, H],
    group_end_offsets, tokens_per_expert, num_dropped, routing_errors, *state)``; the backward
    sends the bf16 gradient of the tokens back (``mxep::dispatch_tokens_backward``)."""

    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, buffer_id, scale_layout="row_major"):
        q, s, group_end_offsets, tokens_per_expert, dropped, errors, *state = call_op(
            _dispatch_tokens_op, _dispatch_tokens_impl, x, topk_idx, topk_weights, buffer_id,
            tensors=(x, topk_idx, topk_weights))
        ctx.buffer_id = buffer_id
        # The backward reads only the tokens' gradient: no zero tensors for the 16 outputs
        # without one (16 allocations and fills per call otherwise).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*state)
        ctx.mark_non_differentiable(group_end_offsets, tokens_per_expert, dropped, errors, *state)
        # (the Buffer's scale layout comes in as a constant string argument: torch.compile traces
        # this forward and must not look the Buffer up)
        return (MXFP8Tensor(q, s, torch.bfloat16, scale_layout=scale_layout), group_end_offsets, tokens_per_expert,
                dropped, errors, *state)

    @staticmethod
    def backward(ctx, grad_tokens, *unused):
        if grad_tokens is None:
            return None, None, None, None, None
        grad_tokens = grad_tokens.to(torch.bfloat16).contiguous()
        state = list(ctx.saved_tensors)
        grad_x = call_op(_dispatch_tokens_backward_op, _dispatch_tokens_backward_impl, grad_tokens, ctx.buffer_id, state,
                         tensors=(grad_tokens, *state))
        return grad_x, None, None, None, None


class CombineTokens(torch.autograd.Function):
    """``(expert_out bf16 [cap, H], topk_weights, buffer_id, *state)`` -> bf16 ``[t, H]``; the
    backward gives the gradients of ``expert_out`` and ``topk_weights``
    (``mxep::combine_tokens_backward``)."""

    @staticmethod
    def forward(ctx, expert_out, topk_weights, buffer_id, *state):
        ctx.buffer_id = buffer_id
        ctx.save_for_backward(expert_out, *state)
        return call_op(_combine_tokens_op, _combine_tokens_impl, expert_out, buffer_id, list(state),
                       tensors=(expert_out, *state))

    @staticmethod
    def backward(ctx, dy):
        expert_out, *state = ctx.saved_tensors   # (read once: checkpointing unpacks each only once)
        none = (None,) * len(state)
        if dy is None:
            return (None, None, None) + none
        dy = dy.to(torch.bfloat16).contiguous()
        grad_eo, grad_w = call_op(_combine_tokens_backward_op, _combine_tokens_backward_impl, dy, expert_out,
                                  ctx.buffer_id, state, tensors=(dy, expert_out, *state))
        return (grad_eo, grad_w if ctx.needs_input_grad[1] else None, None) + none

