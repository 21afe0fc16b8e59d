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
    p.add_argument("--profile", action="store_true", help="also a cProfile of 50 full dispatches")
    args = p.parse_args()

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


if __name__ == "__main__":
    main()
