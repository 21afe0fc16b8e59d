"""Host cost of issuing one dispatch / combine and each of their stages, on a GPU or on a CPU.

The fused path never waits on the GPU, so the host only has to issue launches; where issuing
costs more than the GPU work (small batches, eager calls), the host is the limit. This prints
the host time per call of the full calls and of each stage's launch, then (``--profile``) a
cProfile of the full dispatch. A one-rank world: every stage is the symmetric-memory
transport's (plan, push, copy-out, combine push / copy-out, pull), with no peer to wait for.

* ``--device cuda`` (the default where a GPU is visible): a one-rank NCCL group on GPU 0,
  symmetric memory; host time = time to enqueue, the GPU idle before each measurement.
* ``--device cpu``: no GPU needed. mxep's Python work plus Triton's launch path (argument
  binding, cache-key lookup) through the compile-only sm_90 driver of scripts/compile_sm90.py
  (every launch compiles once, then returns without running), on a symmetric-memory transport
  whose memory is one plain CPU allocation (``SymmMemTransport.over_local_memory``: barriers
  are no-ops, so they cost nothing here). Everything the host does per call except the CUDA
  driver's launch itself and the barriers. The outputs are garbage; the host path is the real
  one. TRITON_INTERPRET must be unset.

    python scripts/host_cost.py [--device cpu|cuda] [--config c] [--ep-config '{"spread_parts": 8}'] [--profile]
    python scripts/host_cost.py --moe [--device cpu|cuda] [--tokens 512,2048,4096] [--shape issue|small]

``--moe``: one ``mxep.MoE`` forward + backward at world 1 (the GPU's transport: symmetric memory,
no peer), the issue's shape by default on a GPU (H 7168, F 2048, 32 experts, top-8; ``--shape
small`` on the CPU: H 256, F 128, the same experts and top-k, host work is the same): the host
issue time of the step (``perf_counter`` around ``y = moe(x); y.backward(dy)``, the GPU idle
before it, not synced inside; median of ``--iters``), with the MX weight cache warm and rebuilt
(an optimizer step per step); the per-call split (host time of each part of the step, timed by
wrapping those functions: dispatch and its phases, the expert GEMMs, the SwiGLU, the combine, the
backwards, the router and autograd's own work as the rest); and the torch ops and Triton
launches of one step by where they come from (``mxep.testing.host_cost``). On the CPU
(compile-only driver, below) ``torch._grouped_mm`` is replaced by an allocation of its output:
the CPU would do the GEMMs' math, which a GPU launch does not cost the host.

Shapes: one of the benchmark configs (mxep.testing.cases, default (c), the latency config:
H=7168, 1024 rows, 256 experts); the token-level rows use the config's tokens and top-k (a
``Buffer(top_k=k)``). On the CPU those rows also count the torch ops' own work on CPU tensors
(zero fills of the layout, the backward's row tables) and the torch routing, which the
compile-only driver runs beside the routing kernels' compile (their outputs feed gathers): read
them as upper bounds there. Kernel settings: ``--ep-config`` (EPConfig field overrides).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time


def per_call_us(fn, iters: int, sync=None) -> float:
    """Host time per call of ``fn`` over ``iters`` calls (after warm-up: compiles); ``sync``
    drains the device before and after (the host time to enqueue from an idle GPU)."""
    for _ in range(5):
        fn()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    dt = (time.perf_counter() - t0) / iters * 1e6
    if sync:
        sync()
    return dt


def per_row_us(rows, iters: int, sync, fresh) -> list:
    """``per_call_us`` of every ``(name, fn)`` row, each after ``fresh()`` (untimed: a dispatch):
    a combine takes the handle of its Buffer's last dispatch, and the rows before it dispatched."""
    out = []
    for name, fn in rows:
        fresh()
        out.append((name, per_call_us(fn, iters, sync)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda where a GPU is visible, else cpu (compile-only driver)")
    p.add_argument("--config", default="c", help="benchmark config a, b or c (shapes)")
    p.add_argument("--ep-config", default="{}", help="EPConfig field overrides (JSON), see benchmarks/bench_dispatch.py --help")
    p.add_argument("--iters", type=int, default=None, help="calls per measurement (default: 200 on cuda, 300 on cpu)")
    p.add_argument("--profile", action="store_true", help="also a cProfile of 50 full dispatches (--moe: of 20 steps)")
    p.add_argument("--moe", action="store_true", help="an mxep.MoE forward + backward at world 1 (see above)")
    p.add_argument("--tokens", default="512", help="--moe: comma list of token counts per step")
    p.add_argument("--shape", choices=("auto", "issue", "small"), default="auto",
                   help="--moe: issue = H 7168, F 2048, 32 experts, top-8; small = H 256, F 128 (auto: issue on cuda)")
    args = p.parse_args()
    if args.moe:
        moe_main(args)
        return

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        import compile_sm90   # the compile-only sm_90 driver: must be installed before any launch

        compile_sm90.install()
    import dataclasses

    import torch.distributed as dist

    import mxep
    from mxep.ep.transport.symm_mem import SymmMemTransport
    from mxep.testing.cases import CONFIGS
    from mxep.testing.launch import free_port
    from mxep.testing.overrides import ep_config, parse_ep_config

    cfg = CONFIGS[args.config]
    E, H, n = cfg.experts, cfg.hidden, cfg.rows
    overrides = parse_ep_config(args.ep_config)
    iters = args.iters or (200 if device == "cuda" else 300)
    init = f"tcp://127.0.0.1:{free_port()}"
    if device == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=init, rank=0, world_size=1, device_id=torch.device("cuda", 0))
        dev = torch.device("cuda", 0)
        buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=n, config=ep_config(overrides, dev, H))
        sync = torch.cuda.synchronize
    else:
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        dev = torch.device("cpu")
        base = ep_config(overrides, dev, H)
        # the GPU's launch sizes and waits on CPU tensors (scripts/compile_sm90.py)
        config = compile_sm90.sm90_config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        compile_sm90.GPU_LAUNCH["hw_cast"] = config.hw_cast
        buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=n, config=config)
        # the symmetric-memory phases on CPU memory (the Buffer itself chose the collective transport)
        buf.transport = SymmMemTransport.over_local_memory(buf.regions, config, device=dev, group=buf.group)
        sync = None
    assert buf.transport_name == "symm_mem", buf
    counts = torch.full((E,), n // E, device=dev)
    counts[0] += n - int(counts.sum())
    x = torch.randn(n, H, device=dev).bfloat16()
    xg = x.clone().requires_grad_(True)
    eo = torch.randn(buf.capacity, H, device=dev).bfloat16()
    peer = buf.transport
    print(f"# host cost per call, {device} ({'compile-only sm_90 driver, CPU memory' if device == 'cpu' else torch.cuda.get_device_name()}), "
          f"config ({cfg.name}): H={H}, n={n}, E={E}, one rank; {buf.config}")
    with torch.no_grad():
        res = buf.dispatch(x, counts)
        last = {"res": res}   # the latest dispatch, whose handle the combine rows take
        plan = res.handle.state
        mx_out = peer.push_mxfp8(x, plan, "rceil")
        cb_out = peer.push_bf16_combine(eo, plan, n)
        counts_i32 = counts.to(torch.int32)
        zin = buf.combine_input()
        rows = [
            ("dispatch (no_grad)", lambda: buf.dispatch(x, counts)),
            ("dispatch zero-copy (no_grad)", lambda: buf.dispatch(x, counts, zero_copy=True)),
            ("combine (no_grad)", lambda: buf.combine(eo, last["res"].handle)),
            ("combine of the zero-copy input (no_grad)", lambda: buf.combine(zin, last["res"].handle)),
            ("plan launch (counts exchange + plan)", lambda: peer.exchange_and_plan(counts_i32, n, buf.align)),
            ("push_mxfp8 launch", lambda: peer.push_mxfp8(x, plan, "rceil")),
            ("copy_out_mxfp8 launch (data + scales)", lambda: peer.copy_out_mxfp8(plan, mx_out)),
            ("combine push launch", lambda: peer.push_bf16_combine(eo, plan, n)),
            ("combine copy-out launch", lambda: peer.copy_out_combine(plan, cb_out)),
            ("pull combine launch", lambda: peer.pull_combine(plan, n)),
            ("symm barrier" + (" (no-op here)" if device == "cpu" else ""), lambda: buf.transport._barrier()),
            ("MXFP8Tensor construction", lambda: mxep.MXFP8Tensor(res.tokens.qdata, res.tokens.scale)),
            ("torch.empty_like(x)", lambda: torch.empty_like(x)),
        ]
        # (the stage launches above run out of the protocol's order: one rank has no peer to wait for)
        measured = per_row_us(rows, iters, sync, lambda: last.update(res=buf.dispatch(x, counts)))
    measured.insert(0, ("dispatch (autograd)", per_call_us(lambda: buf.dispatch(xg, counts), iters, sync)))
    measured += token_level_rows(cfg, dev, config if device == "cpu" else buf.config, iters, sync, device == "cpu")
    for name, us in measured:
        print(f"{name:45s} {us:8.1f} us host/call")
    if args.profile:
        prof = cProfile.Profile()
        with torch.no_grad():
            prof.enable()
            for _ in range(50):
                buf.dispatch(x, counts)
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    dist.destroy_process_group()


def token_level_rows(cfg, dev, config, iters: int, sync, local: bool) -> list:
    """The token-level calls of the same config (``cfg.tokens`` tokens, top-``cfg.topk``, uniform
    routing) on a ``Buffer(top_k=k)``: routing, dispatch_tokens, combine_tokens, and a layer's
    forward + backward of the two (autograd)."""
    import torch

    import mxep
    from mxep.ep.routing import route_tokens
    from mxep.ep.transport.symm_mem import SymmMemTransport

    E, H, T, k = cfg.experts, cfg.hidden, cfg.tokens, cfg.topk
    buf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T, top_k=k, config=config)
    if local:
        buf.transport = SymmMemTransport.over_local_memory(buf.regions, config, device=dev, group=buf.group)
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(T, E, generator=g).argsort(1)[:, :k].to(torch.int32).to(dev)
    w = torch.rand(T, k, generator=g).to(dev)
    x = torch.randn(T, H, generator=g).to(dev, torch.bfloat16)
    eo = torch.randn(buf.capacity, H, device=dev).bfloat16()
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    eog = eo.clone().requires_grad_(True)
    dy = torch.randn(T, H, device=dev).bfloat16()

    def layer():
        res = buf.dispatch_tokens(xg, idx, wg)
        buf.combine_tokens(eog, res.handle).backward(dy)

    with torch.no_grad():
        last = {}
        rows = [("route_tokens (token-level)", lambda: route_tokens(idx, E, 1)),
                ("dispatch_tokens (no_grad)", lambda: buf.dispatch_tokens(x, idx, w)),
                ("combine_tokens (no_grad)", lambda: buf.combine_tokens(eo, last["res"].handle))]
        out = per_row_us(rows, iters, sync, lambda: last.update(res=buf.dispatch_tokens(x, idx, w)))
    out.append(("dispatch_tokens + combine_tokens, fwd + bwd", per_call_us(layer, max(iters // 4, 10), sync)))
    return out


class PartTimer:
    """Host time spent inside selected functions during a step: each ``(owner, attr, label)``
    target is wrapped (a module function or a class method) to add its ``perf_counter``
    duration to ``totals[label]``; nested targets are timed inside their parents."""

    def __init__(self, targets):
        self.targets, self.totals, self.saved = targets, {}, []

    def __enter__(self):
        import functools
        import inspect
        import time

        for owner, attr, label in self.targets:
            original = getattr(owner, attr)
            raw = inspect.getattr_static(owner, attr)   # (a staticmethod is put back as one)
            self.totals.setdefault(label, 0.0)

            def wrapped(*a, __f=original, __label=label, **kw):
                t0 = time.perf_counter()
                try:
                    return __f(*a, **kw)
                finally:
                    self.totals[__label] += time.perf_counter() - t0

            functools.update_wrapper(wrapped, original)
            self.saved.append((owner, attr, raw))
            setattr(owner, attr, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self.saved):
            setattr(owner, attr, original)
        self.saved = []


def host_floor(dev, sync, n: int = 200) -> str:
    """This machine's host cost of issuing one torch op and one Triton launch (the GPU idle
    before; median of 5 rounds of ``n``): tiny tensors (the GPU finishes each at once) and
    4096 x 7168 bf16 ones (the GPU busy behind the host). A step's host floor is about its op
    count times the first plus its launch count times the second: the part no restructuring of
    mxep's Python can remove."""
    import statistics

    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def _touch(p):
        tl.store(p + tl.program_id(0), 1.0)

    small = torch.zeros(8, device=dev)
    big = torch.zeros(4096, 7168, device=dev, dtype=torch.bfloat16)

    def rate(fn) -> float:
        fn()
        out = []
        for _ in range(5):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            out.append((time.perf_counter() - t0) / n * 1e6)
        sync()
        return statistics.median(out)

    op_small = rate(lambda: small.add_(1))
    op_big = rate(lambda: big.add_(1))
    launch = rate(lambda: _touch[(1,)](small))
    return (f"host floor of this machine: {op_small:.1f} us per torch op (tiny tensors), {op_big:.1f} us per "
            f"torch op with the GPU busy behind it (4096 x 7168 bf16 add_), {launch:.1f} us per Triton launch "
            f"(a one-store kernel)")


def moe_main(args) -> None:
    """``--moe``: host issue time, per-call split and op / launch counts of one mxep.MoE step."""
    import dataclasses
    import statistics
    import time

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = args.shape if args.shape != "auto" else ("issue" if device == "cuda" else "small")
    if device == "cpu":
        import compile_sm90

        import mxep.ep.routing as routing
        launch_route = routing._route_triton
        compile_sm90.install()
        # the routing kernels' outputs feed only kernels on the layer's path: launch (compile)
        # them as they are instead of compile_sm90's torch values
        routing._route_triton = launch_route

        def grouped_mm_shape_only(a, b, offs=None, **kw):   # the math is the GPU's, not the host's
            if a.dim() == 2 and b.dim() == 2:
                return torch.empty(offs.shape[0], a.shape[0], b.shape[1], dtype=a.dtype)
            return torch.empty(a.shape[0], b.shape[-1], dtype=a.dtype)

        torch._grouped_mm = grouped_mm_shape_only
        torch.set_num_threads(1)
    import torch.distributed as dist

    import mxep
    import mxep.moe.fused as fused
    from mxep.ep.transport.symm_mem import SymmMemTransport
    from mxep.ep.transport.symm_mem import transport as symm
    from mxep.moe.layer import MoE
    from mxep.testing.host_cost import count_moe_step, moe_step
    from mxep.testing.launch import free_port

    H, F = (7168, 2048) if shape == "issue" else (256, 128)
    E, k = 32, 8
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    iters = args.iters or (50 if device == "cuda" else 100)
    init = f"tcp://127.0.0.1:{free_port()}"
    if device == "cuda":
        torch.cuda.set_device(0)
        dev = torch.device("cuda", 0)
        dist.init_process_group("nccl", init_method=init, rank=0, world_size=1, device_id=dev)
        sync = torch.cuda.synchronize
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
        sync = None
    T = max(tokens)
    torch.manual_seed(0)
    moe = mxep.MoE(H, F, E, k, max_tokens_per_rank=T, device=dev)
    buf = moe.buffer
    if device == "cpu":   # the GPU's launch sizes on CPU tensors, the symmetric-memory transport over CPU memory
        base = buf.config
        config = compile_sm90.sm90_config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        compile_sm90.GPU_LAUNCH["hw_cast"] = config.hw_cast
        buf.config = config
        buf.transport = SymmMemTransport.over_local_memory(buf.regions, config, device=dev, group=buf.group)
    assert buf.transport_name == "symm_mem", buf
    what = "compile-only sm_90 driver, CPU memory, _grouped_mm shape-only" if device == "cpu" else \
        torch.cuda.get_device_name()
    print(f"# mxep.MoE forward + backward, world 1, {device} ({what}): H {H}, F {F}, {E} experts, top-{k}; "
          f"median host issue time of {iters} steps, the GPU idle before each")
    if device == "cuda":
        print(host_floor(dev, sync))
    Tr = type(buf.transport)
    parts = [
        (MoE, "route", "router forward"),
        (Tr, "dispatch_tokens", "dispatch_tokens"),
        (symm, "route_tokens", "  routing (2 launches)"),
        (Tr, "exchange_and_plan", "  counts exchange + plan (1 launch)"),
        (symm, "pair_tables", "  pair tables (1 launch)"),
        (Tr, "push_tokens_mxfp8", "  token push (1 launch)"),
        (Tr, "expand_tokens", "  expand (1 launch)"),
        (fused, "expert_gemm_forward", "expert GEMMs forward (x2)"),
        (fused, "swiglu_quantize_forward", "SwiGLU + quantize forward"),
        (Tr, "combine_tokens", "combine_tokens"),
        (MoE, "_gemm_weights", "MX weight cache (lookup / rebuild)"),
        (Tr, "combine_tokens_backward", "combine backward"),
        (fused, "expert_gemm_backward", "expert GEMMs backward (x2)"),
        (fused, "swiglu_backward", "SwiGLU backward"),
        (Tr, "dispatch_tokens_backward", "dispatch backward"),
        (fused.TokenLayer, "forward", "TokenLayer.forward (all of the above in the forward)"),
        (fused.TokenLayer, "backward", "TokenLayer.backward (all of the above in the backward)"),
    ]
    for n in tokens:
        g = torch.Generator(device=dev).manual_seed(n)
        x = torch.randn(n, H, generator=g, device=dev).bfloat16().requires_grad_(True)
        dy = torch.randn(n, H, generator=g, device=dev).bfloat16()
        for rebuild in (False, True):
            for _ in range(3):
                moe_step(moe, x, dy, rebuild)
            times, fwd = [], []
            for _ in range(iters):
                if sync:
                    sync()
                for p in moe.parameters():
                    p.grad = None
                x.grad = None
                if rebuild:
                    moe.clear_mx_weight_cache()
                t0 = time.perf_counter()
                y = moe(x)
                t1 = time.perf_counter()
                y.backward(dy)
                t2 = time.perf_counter()
                times.append((t2 - t0) * 1e6)
                fwd.append((t1 - t0) * 1e6)
            if sync:
                sync()
            with PartTimer(parts) as timer:
                for _ in range(iters):
                    if sync:
                        sync()
                    moe_step(moe, x, dy, rebuild)
            if sync:
                sync()
            step = statistics.median(times)
            print(f"\n## {n} tokens, MX weight cache {'rebuilt every step' if rebuild else 'warm'}: host issue time "
                  f"{step:8.1f} us per step (forward {statistics.median(fwd):.1f} us, backward "
                  f"{statistics.median(times) - statistics.median(fwd):.1f} us)")
            print("per-call split (host us per step; the wrappers add about 1 us per call):")
            for label, total in timer.totals.items():
                print(f"  {total / iters * 1e6:8.1f}  {label}")
            work = count_moe_step(moe, x.detach(), dy, rebuild_cache=rebuild)
            print(f"ops and launches of one step: {work.table()}")
    if args.profile:
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            moe_step(moe, x, dy)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
