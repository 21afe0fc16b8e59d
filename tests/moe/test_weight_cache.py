"""MX weights quantized once per weight version (mxep.gemm.MXWeightCache, mxep.MoE(mx_weight_cache)).

* The cache alone: hit while the parameter is unchanged, rebuilt after an in-place update, a
  new ``.data`` or ``clear()``; the gradient passes straight through; the form follows the
  GEMM implementation (bf16 values of the MXFP8 weight for "dequant", an MXFP8Tensor for
  "fused").
* In the layer (one-process gloo world, as the MoE docstring example): outputs and gradients
  bit-identical with the cache on and off, over two accumulated micro-batches, an in-place
  update and an optimizer step; the weight quantize kernel runs once per weight version
  (counted by wrapping the launcher), and the weights are never dequantized in a forward or
  backward while cached.
Run on CPU under TRITON_INTERPRET=1.
"""
import pytest
import torch
import torch.distributed as dist

import mxep
import mxep.format.dequantize as dequantize_mod
import mxep.format.quantize as quantize_mod
import mxep.gemm.weight_cache as weight_cache_mod
from mxep.gemm import MXWeightCache
from support.dist import free_port

H, FF, E, K = 64, 32, 4, 2          # world 1: L = 4 local experts; w13 [4, 64, 64], w2 [4, 64, 32]
N_TOK = 8


@pytest.fixture(scope="module")
def gloo_world():
    """A one-process gloo group for the module (torn down after it)."""
    mine = not dist.is_initialized()
    if mine:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    if mine:
        dist.destroy_process_group()


class _Calls:
    """Wrap the quantize / dequantize / round-trip launchers; record the weight-shaped calls (the
    cache's one-pass round trip counts as one quantization and one dequantization)."""

    def __init__(self, monkeypatch, weights):
        self.weights = weights            # name -> parameter
        self.quantized: list[str] = []    # one name per weight quantization
        self.dequantized: list[str] = []  # one name per weight dequantization
        self.round_trips: list[str] = []  # one name per one-pass round trip (the cache's build)
        quantize, dequantize = quantize_mod.to_mxfp8_rows, dequantize_mod.dequantize_mxfp8_rows
        round_trip = weight_cache_mod.mxfp8_round_trip

        def rt(x2d, *a, **kw):
            names = [n for n, w in self.weights().items() if x2d.data_ptr() == w.data_ptr()]
            self.round_trips += names
            self.quantized += names
            self.dequantized += names
            return round_trip(x2d, *a, **kw)

        def q(x2d, *a, **kw):
            self.quantized += [n for n, w in self.weights().items() if x2d.data_ptr() == w.data_ptr()]
            return quantize(x2d, *a, **kw)

        def dq(qdata, scale, *a, **kw):
            self.dequantized += [n for n, w in self.weights().items()
                                 if tuple(qdata.shape) == (w.shape[0] * w.shape[1], w.shape[2])]
            return dequantize(qdata, scale, *a, **kw)

        monkeypatch.setattr(quantize_mod, "to_mxfp8_rows", q)
        monkeypatch.setattr(dequantize_mod, "dequantize_mxfp8_rows", dq)
        monkeypatch.setattr(weight_cache_mod, "mxfp8_round_trip", rt)


def _weights():
    g = torch.Generator().manual_seed(3)
    router = torch.randn(E, H, generator=g) / H ** 0.5
    w13 = (torch.randn(E, 2 * FF, H, generator=g) / H ** 0.5).bfloat16()
    w2 = (torch.randn(E, H, FF, generator=g) / FF ** 0.5).bfloat16()
    xs = [torch.randn(N_TOK, H, generator=g).bfloat16() for _ in range(3)]
    dys = [torch.randn(N_TOK, H, generator=g).bfloat16() for _ in range(3)]
    return router, w13, w2, xs, dys


def _moe(cache: bool) -> mxep.MoE:
    router, w13, w2, _, _ = _weights()
    moe = mxep.MoE(H, FF, E, K, max_tokens_per_rank=N_TOK, mx_weight_cache=cache)
    with torch.no_grad():
        moe.router.copy_(router)
        moe.w13.copy_(w13)
        moe.w2.copy_(w2)
    return moe


def _step(moe, x, dy):
    x = x.clone().requires_grad_(True)
    y = moe(x)
    y.backward(dy)
    return y.detach(), x.grad


def _grads(moe):
    return [p.grad.clone() for p in (moe.router, moe.w13, moe.w2)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert torch.equal(u, v), f"tensor {i} differs: max |diff| {(u.float() - v.float()).abs().max()}"


# --------------------------------------------------------------------------- the cache alone
def test_cache_hits_until_the_weight_changes(monkeypatch):
    w = torch.nn.Parameter((torch.randn(2, 64, 96) / 8).bfloat16())
    ref = mxep.to_mxfp8(w.detach()).dequantize()
    calls = _Calls(monkeypatch, lambda: {"w": w})
    cache = MXWeightCache()
    a = cache(w, "dequant")
    b = cache(w, "dequant")
    assert cache.builds == 1 and calls.quantized == ["w"] and calls.dequantized == ["w"]
    assert calls.round_trips == ["w"]                                 # built in one pass
    assert torch.equal(a, b) and a.dtype == torch.bfloat16 and not isinstance(a, mxep.MXFP8Tensor)
    assert torch.equal(a, ref)                                        # the MXFP8 weight's values
    assert cache.nbytes == w.numel() * 2                              # one bf16 copy: the parameter's size

    g = torch.randn(w.shape).bfloat16()
    (a.float() * g.float()).sum().backward()
    assert torch.equal(w.grad, g)                                     # straight through, unquantized
    assert cache.tensors()[0].grad_fn is None                         # the cached tensor stays a plain one

    with torch.no_grad():
        w.add_(1e-2)                                                  # bumps w._version
    c = cache(w, "dequant")
    assert cache.builds == 2 and not torch.equal(c, a)
    w.data = w.data.clone()                                           # a new tensor: a new address
    cache(w, "dequant")
    assert cache.builds == 3
    cache.clear()
    cache(w, "dequant")
    assert cache.builds == 4 and calls.quantized == ["w"] * 4


def test_cache_fused_form_is_mxfp8():
    w = torch.nn.Parameter((torch.randn(2, 40, 64) / 8).bfloat16())
    cache = MXWeightCache()
    t = cache(w, "fused")
    assert isinstance(t, mxep.MXFP8Tensor) and t.requires_grad
    ref = mxep.to_mxfp8(w.detach())
    assert torch.equal(t.qdata.view(torch.uint8), ref.qdata.view(torch.uint8))
    assert cache.nbytes == w.numel() + w.numel() // 32
    cache(w, "fused")
    assert cache.builds == 1
    cache(w, "dequant")                                               # another form: rebuilt
    assert cache.builds == 2


# --------------------------------------------------------------------------- in the layer
def test_moe_cache_on_off_bit_identical_and_quantize_once(gloo_world, monkeypatch):
    """Two micro-batches of gradient accumulation, an in-place update, an optimizer step, a
    load_state_dict: the cached layer matches the uncached one bit for bit at every step and
    quantizes (and dequantizes) each weight once per version; the uncached one dequantizes each
    weight in both GEMM passes of every step."""
    on, off = _moe(True), _moe(False)
    calls = _Calls(monkeypatch, lambda: {"w13": on.w13, "w2": on.w2})
    _, _, _, xs, dys = _weights()

    def both(i, ref=off):
        """One step of each layer; the weight dequantizations of each."""
        n = len(calls.dequantized)
        got = _step(on, xs[i], dys[i])
        m = len(calls.dequantized)
        _assert_same(got, _step(ref, xs[i], dys[i]))
        return sorted(calls.dequantized[n:m]), sorted(calls.dequantized[m:])

    # gradient accumulation: 2 micro-batches, one quantization of each weight
    assert both(0) == (["w13", "w2"], ["w13", "w13", "w2", "w2"])     # built once; off: forward + backward
    assert both(1) == ([], ["w13", "w13", "w2", "w2"])                # cached: no weight dequantization
    _assert_same(_grads(on), _grads(off))
    assert sorted(calls.quantized) == ["w13", "w2"]

    # in-place update under no_grad: only w13 is quantized again
    with torch.no_grad():
        on.w13.add_(1e-3)
        off.w13.add_(1e-3)
    assert both(2)[0] == ["w13"]
    assert sorted(calls.quantized) == ["w13", "w13", "w2"]

    # an optimizer step updates both
    for m in (on, off):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        m.zero_grad()
    both(0)
    _assert_same(_grads(on), _grads(off))
    assert sorted(calls.quantized) == ["w13", "w13", "w13", "w2", "w2"]

    # load_state_dict copies into the parameters: invalidated too (values back to the start)
    fresh = _moe(False)
    on.load_state_dict(fresh.state_dict())
    on.zero_grad()
    both(1, ref=fresh)
    _assert_same(_grads(on), _grads(fresh))
    assert sorted(calls.quantized) == ["w13"] * 4 + ["w2"] * 3
    assert on._w13_cache.builds == 4 and on._w2_cache.builds == 3


def test_moe_two_forwards_quantize_once(gloo_world, monkeypatch):
    moe = _moe(True)
    calls = _Calls(monkeypatch, lambda: {"w13": moe.w13, "w2": moe.w2})
    _, _, _, xs, _ = _weights()
    with torch.no_grad():
        y0, y1 = moe(xs[0]), moe(xs[0])
    assert torch.equal(y0, y1)
    assert sorted(calls.quantized) == ["w13", "w2"]
    moe.clear_mx_weight_cache()
    with torch.no_grad():
        assert torch.equal(moe(xs[0]), y0)
    assert sorted(calls.quantized) == ["w13", "w13", "w2", "w2"]
